"""A speed run: a recipe's mean final test accuracy over seeds, and the seconds each run takes.

  python scripts/speedrun.py --config configs/speedrun.py --seeds 10 --out reports/speedrun/cpu

trains the recipe from seeds 0..N-1 for its fixed number of epochs, evaluates the whole test set
once at the end, and times what a user waits for once the program is compiled (data on device,
training, the final evaluation; the compilation apart). Then, over the same seeds, each of the
config file's ``ablations()`` (one part of the recipe undone) and, with --baseline (default), the
notebook's cnn_pool recipe (configs/cnn_pool.py, its 20 epochs) measured the same way. Writes
results.json (each seed's seed, test_accuracy, seconds, compile_seconds) and report.md into --out.
Run nothing else meanwhile: the seconds are the figure.
"""

import shlex
import sys
from pathlib import Path

import _cli
import jax
from absl import flags
from ml_collections import config_flags

from flax_mnist import log, speedrun, workdir
from flax_mnist.config import load_ablations
from flax_mnist.study import sweep

_CONFIG = config_flags.DEFINE_config_file("config", None, "The recipe (configs/speedrun.py).")
_SEEDS = flags.DEFINE_integer("seeds", 10, "Seeds 0..N-1.", lower_bound=1)
_OUT = flags.DEFINE_string("out", None, "Directory for results.json and report.md.")
_TARGET = flags.DEFINE_float("target", 0.99, "The mean test accuracy the recipe aims at.")
_ABLATE = flags.DEFINE_bool("ablate", True, "Also run the config file's ablations().")
_BASELINE = flags.DEFINE_bool("baseline", True, "Also run the notebook's cnn_pool recipe.")
_cli.require("config", "out")


def main() -> None:
  out = Path(_OUT.value)
  _cli.check_writable_dir(out, "--out")
  command = "python scripts/speedrun.py " + " ".join(shlex.quote(arg) for arg in sys.argv[1:])
  path = flags.FLAGS["config"].config_filename
  recipe = _CONFIG.value
  seeds = range(_SEEDS.value)
  variants = {}
  for name, overrides in (load_ablations(path) if _ABLATE.value else {}).items():
    variants[name] = sweep.with_overrides(recipe, overrides)
  results = {"command": command, "config": path, "target": _TARGET.value}
  results["platform"] = jax.default_backend()
  results["environment"] = log.environment()
  print("== the recipe")
  results["recipe"] = speedrun.run(recipe, seeds)
  results["ablations"] = {}
  for name, variant in variants.items():
    print(f"== {name}")
    results["ablations"][name] = speedrun.run(variant, seeds)
  if _BASELINE.value:
    print("== the notebook's cnn_pool")
    baseline = _cli.model_config("cnn_pool")
    baseline.data_dir = recipe.data_dir
    results["baseline"] = speedrun.run(baseline, seeds)
  workdir.write_json(out / "results.json", results)
  workdir.write_text(out / "report.md", speedrun.render(results))
  print(f"wrote {out / 'report.md'}")


if __name__ == "__main__":
  _cli.run(main)
