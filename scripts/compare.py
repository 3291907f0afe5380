"""Trains the family from several seeds and writes the comparison report.

  python scripts/compare.py --models mlp,cnn,cnn_pool,cnn_pool_bn --seeds 5 --epochs 20 \
      --out reports/seed_comparison

trains every model from seeds 0..4 (one compiled program per model) into --workdir
(default runs/seed_comparison/<model>/seed_<seed>, resumable), then writes into --out:
results.json (every per-seed, per-epoch figure, settings, versions, platform), report.md (tables,
pairwise tests, the notebook's questions answered from the numbers) and the PNG plots.
Re-running with the same --workdir trains nothing that is already done and rewrites the report.
"""

import shlex
import sys

from absl import app, flags, logging

from flax_mnist import FlaxMnistError, compare, models

_MODELS = flags.DEFINE_list("models", ["mlp", "cnn", "cnn_pool", "cnn_pool_bn"], "Models to compare.")
_SEEDS = flags.DEFINE_integer("seeds", 5, "Number of seeds (0, 1, ..., N-1).", lower_bound=1)
_EPOCHS = flags.DEFINE_integer("epochs", 20, "Epochs per seed.", lower_bound=1)
_OUT = flags.DEFINE_string("out", "reports/seed_comparison", "Directory for results.json, report.md, PNGs.")
_WORKDIR = flags.DEFINE_string("workdir", "runs/seed_comparison", "Training workdirs (checkpoints, logs).")
_DATA_DIR = flags.DEFINE_string("data_dir", None, "IDX directory (default: $FLAX_MNIST_DATA_DIR, then TFDS).")


def main(argv: list[str]) -> None:
  logging.set_verbosity(logging.WARNING)
  sys.stdout.reconfigure(line_buffering=True)
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
  unknown = [name for name in _MODELS.value if name not in models.model_names()]
  if unknown:
    raise app.UsageError(f"--models: unknown {', '.join(unknown)}; expected some of {', '.join(models.model_names())}")
  command = "python scripts/compare.py " + " ".join(shlex.quote(arg) for arg in sys.argv[1:])
  try:
    results = compare.run_comparison(_MODELS.value, list(range(_SEEDS.value)), _EPOCHS.value, _WORKDIR.value,
                                     data_dir=_DATA_DIR.value)
    path = compare.write_report(results, _OUT.value, command=command)
  except FlaxMnistError as error:
    print(f"error: {error}", file=sys.stderr)
    sys.exit(1)
  print(f"wrote {path} and {len(results['models'])} models' results beside it")


if __name__ == "__main__":
  app.run(main)
