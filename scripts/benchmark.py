"""Benchmarks the training path per model, optionally side by side with Keras 3 + TensorFlow.

  python scripts/benchmark.py --models mlp,cnn,cnn_pool,cnn_pool_bn --epochs 5 --json OUT.json
  python scripts/benchmark.py --models cnn --epochs 5 --baseline keras \
      --baseline_python .venv-keras/bin/python
  python scripts/benchmark.py --models cnn_pool --epochs 3 --seeds 5 --seed_parallelism vmap

Prints Markdown tables and writes every figure to --json. Run nothing else on the machine
meanwhile: the figures are wall times.
"""

from pathlib import Path

import _cli
from absl import flags

from flax_mnist import benchmark, config, models, workdir

_MODELS = flags.DEFINE_list("models", models.model_names(), "Models to benchmark.")
_EPOCHS = flags.DEFINE_integer("epochs", 5, "Epochs per model; the median is over epochs 2..N.")
_JSON = flags.DEFINE_string("json", None, "Write every figure to this JSON file.")
_MARKDOWN = flags.DEFINE_string("markdown", None, "Also write the Markdown tables to this file.")
_DATA_DIR = flags.DEFINE_string(
  "data_dir", None, "IDX directory (default: $FLAX_MNIST_DATA_DIR, then TFDS)."
)
_BASELINE = flags.DEFINE_enum("baseline", None, ["keras"], "Also time this framework, same run.")
_IMPL = flags.DEFINE_enum(
  "impl",
  None,
  list(config.IMPLS),
  "Override config.impl (config.resolve_impl), to compare implementations.",
)
_COMPUTE_DTYPE = flags.DEFINE_enum(
  "compute_dtype", None, ["float32", "bfloat16"], "Override config.compute_dtype."
)
_SEEDS = flags.DEFINE_integer(
  "seeds", 1, "Also time this many seeds trained together (train_seeds).", lower_bound=1
)
_SEED_PARALLELISM = flags.DEFINE_enum(
  "seed_parallelism",
  "auto",
  list(config.SEED_PARALLELISMS),
  "How --seeds trains them (auto: loop on CPU, vmap elsewhere).",
)
_BASELINE_PYTHON = flags.DEFINE_string(
  "baseline_python", None, "Interpreter with keras + tensorflow (default: this one)."
)


def main() -> None:
  if _EPOCHS.value < 1:
    _cli.fail(f"--epochs {_EPOCHS.value}: expected at least 1")
  _cli.check_model_names(_MODELS.value)
  for flag in (_JSON, _MARKDOWN):  # Before the measurements, not after.
    if flag.value and Path(flag.value).is_dir():
      _cli.fail(f"--{flag.name} {flag.value}: a directory, expected the path of a file")
    if flag.value:
      _cli.check_writable_dir(Path(flag.value).parent, f"--{flag.name}")
  configs = {name: _cli.model_config(name) for name in _MODELS.value}
  result = benchmark.run(
    configs,
    _EPOCHS.value,
    data_dir=_DATA_DIR.value,
    baseline=_BASELINE.value,
    baseline_python=_BASELINE_PYTHON.value,
    overrides={
      field: flag.value
      for field, flag in (("impl", _IMPL), ("compute_dtype", _COMPUTE_DTYPE))
      if flag.value
    }
    or None,
    num_seeds=_SEEDS.value,
    seed_parallelism=_SEED_PARALLELISM.value,
  )
  markdown = benchmark.to_markdown(result)
  print(markdown)
  if _JSON.value:
    Path(_JSON.value).parent.mkdir(parents=True, exist_ok=True)
    workdir.write_json(_JSON.value, result)
  if _MARKDOWN.value:
    Path(_MARKDOWN.value).parent.mkdir(parents=True, exist_ok=True)
    workdir.write_text(_MARKDOWN.value, markdown)


if __name__ == "__main__":
  _cli.run(main)
