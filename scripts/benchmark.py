"""Benchmarks the training path per model, optionally side by side with Keras 3 + TensorFlow.

  python scripts/benchmark.py --models mlp,cnn,cnn_pool,cnn_pool_bn --epochs 5 --json OUT.json
  python scripts/benchmark.py --models cnn --epochs 5 --baseline keras --baseline_python .venv-keras/bin/python
  python scripts/benchmark.py --models cnn_pool --epochs 3 --seeds 5 --seed_parallelism vmap

Prints Markdown tables and writes every figure to --json. Run nothing else on the machine
meanwhile: the figures are wall times.
"""

import json
import sys
from pathlib import Path

from absl import app, flags, logging

from flax_mnist import FlaxMnistError, benchmark, models

_MODELS = flags.DEFINE_list("models", models.model_names(), "Models to benchmark.")
_EPOCHS = flags.DEFINE_integer("epochs", 5, "Epochs per model; the median is over epochs 2..N.")
_JSON = flags.DEFINE_string("json", None, "Write every figure to this JSON file.")
_MARKDOWN = flags.DEFINE_string("markdown", None, "Also write the Markdown tables to this file.")
_DATA_DIR = flags.DEFINE_string("data_dir", None, "IDX directory (default: $FLAX_MNIST_DATA_DIR, then TFDS).")
_BASELINE = flags.DEFINE_enum("baseline", None, ["keras"], "Also time this framework, same run.")
_IMPL = flags.DEFINE_enum("impl", None, ["auto", "lax", "im2col", "batch_minor"],
                          "Override config.impl (models.resolve_impl), to compare implementations.")
_SEEDS = flags.DEFINE_integer("seeds", 1, "Also time this many seeds trained together (train_seeds).",
                              lower_bound=1)
_SEED_PARALLELISM = flags.DEFINE_enum("seed_parallelism", "auto", ["auto", "loop", "vmap"],
                                      "How --seeds trains them (auto: loop on CPU, vmap elsewhere).")
_BASELINE_PYTHON = flags.DEFINE_string("baseline_python", None,
                                       "Interpreter with keras + tensorflow (default: this one).")


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
  logging.set_verbosity(logging.WARNING)
  if _EPOCHS.value < 1:
    print(f"error: --epochs {_EPOCHS.value}: expected at least 1", file=sys.stderr)
    sys.exit(1)
  try:
    result = benchmark.run(_MODELS.value, _EPOCHS.value, data_dir=_DATA_DIR.value, baseline=_BASELINE.value,
                           baseline_python=_BASELINE_PYTHON.value,
                           overrides={"impl": _IMPL.value} if _IMPL.value else None,
                           num_seeds=_SEEDS.value, seed_parallelism=_SEED_PARALLELISM.value)
  except FlaxMnistError as error:
    print(f"error: {error}", file=sys.stderr)
    sys.exit(1)
  markdown = benchmark.to_markdown(result)
  print(markdown)
  if _JSON.value:
    Path(_JSON.value).parent.mkdir(parents=True, exist_ok=True)
    Path(_JSON.value).write_text(json.dumps(result, indent=2) + "\n")
  if _MARKDOWN.value:
    Path(_MARKDOWN.value).parent.mkdir(parents=True, exist_ok=True)
    Path(_MARKDOWN.value).write_text(markdown)


if __name__ == "__main__":
  app.run(main)
