"""Trains one model of the family: python scripts/train.py --config configs/cnn.py --workdir runs/cnn

Any config field can be overridden: --config.num_epochs=3 --config.seed=1. Running again with
the same workdir resumes from its latest checkpoint. Several seeds, compiled once:
--config.num_seeds=5 (or --config.seeds="(0,3,7)") trains each into WORKDIR/seed_<seed>/ and
writes the mean and spread over seeds to WORKDIR/seeds.json.
"""

import sys

from absl import app, flags, logging
from ml_collections import config_flags

from flax_mnist import FlaxMnistError, train

_CONFIG = config_flags.DEFINE_config_file("config", None, "Path to a config file in configs/.",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, history and TensorBoard logs.")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv: list[str]) -> None:
  logging.set_verbosity(logging.WARNING)  # orbax logs every save at INFO.
  sys.stdout.reconfigure(line_buffering=True)  # Epoch lines show up at once through a pipe or tee.
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
  try:
    if len(train.seed_list(_CONFIG.value)) > 1:
      train.train_seeds(_CONFIG.value, _WORKDIR.value)
    else:
      train.train_and_evaluate(_CONFIG.value, _WORKDIR.value)
  except FlaxMnistError as error:
    print(f"error: {error}", file=sys.stderr)
    sys.exit(1)


if __name__ == "__main__":
  app.run(main)
