"""Trains the family from several seeds and writes the comparison report.

  python scripts/compare.py --models mlp,cnn,cnn_pool,cnn_pool_bn --seeds 5 --epochs 20 \
      --out reports/seed_comparison

trains every model from seeds 0..4 with its experiment config, configs/<model>.py (one compiled
program per model), into --workdir (default runs/seed_comparison/<model>/seed_<seed>,
resumable), then writes into --out: results.json (every per-seed, per-epoch figure, settings,
versions, platform, the command), report.md (tables, pairwise tests, the notebook's questions
answered from the numbers) and the PNG plots. Re-running with the same --workdir trains nothing
that is already done and rewrites the report.

  python scripts/compare.py --render_only --out reports/seed_comparison

writes report.md and the plots again from --out's results.json alone, training nothing (after a
change to the report's wording or plots).
"""

import shlex
import sys
from pathlib import Path

import _cli
from absl import flags

from flax_mnist import models, study
from flax_mnist.study.run import run_comparison

_MODELS = flags.DEFINE_list(
  "models", models.model_names(), "Models to compare, each trained with configs/<model>.py."
)
_SEEDS = flags.DEFINE_integer("seeds", 5, "Number of seeds (0, 1, ..., N-1).", lower_bound=1)
_EPOCHS = flags.DEFINE_integer("epochs", 20, "Epochs per seed.", lower_bound=1)
_OUT = flags.DEFINE_string(
  "out", "reports/seed_comparison", "Directory for results.json, report.md, PNGs."
)
_WORKDIR = flags.DEFINE_string(
  "workdir", "runs/seed_comparison", "Training workdirs (checkpoints, logs)."
)
_DATA_DIR = flags.DEFINE_string(
  "data_dir", None, "IDX directory (default: each config's, then $FLAX_MNIST_DATA_DIR, then TFDS)."
)
_RENDER_ONLY = flags.DEFINE_bool(
  "render_only",
  False,
  "Write report.md and the plots again from --out's results.json; no training.",
)
_TRAINING_FLAGS = ("models", "seeds", "epochs", "workdir", "data_dir")


def _configs(names: list[str]) -> dict:
  """Each model's experiment config, configs/<model>.py, with --data_dir if given."""
  _cli.check_model_names(names)
  configs = {name: _cli.model_config(name) for name in names}
  if _DATA_DIR.value:
    for config in configs.values():
      config.data_dir = _DATA_DIR.value
  return configs


def main() -> None:
  out = Path(_OUT.value)
  if _RENDER_ONLY.value:
    given = [f"--{name}" for name in _TRAINING_FLAGS if flags.FLAGS[name].present]
    if given:
      _cli.fail(f"--render_only renders --out's results.json as it is; drop {', '.join(given)}")
    path = study.render_from_results(out / study.RESULTS_FILE)
    print(f"wrote {path} and its plots again from {out / study.RESULTS_FILE}")
    return
  command = "python scripts/compare.py " + " ".join(shlex.quote(arg) for arg in sys.argv[1:])
  configs = _configs(_MODELS.value)
  _cli.check_writable_dir(out, "--out")  # Before hours of training, not after.
  results = run_comparison(configs, range(_SEEDS.value), _EPOCHS.value, _WORKDIR.value)
  path = study.write_report(results, out, command=command)
  print(f"wrote {path} and {len(results['models'])} models' results beside it")


if __name__ == "__main__":
  _cli.run(main)
