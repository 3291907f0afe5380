"""The layer implementations side by side: ms per training step of each model under each layout.

  python benchmarks/time_layouts.py [--models mlp,cnn,cnn_pool,cnn_pool_bn] [--impls s2d,im2col]
      [--steps 8] [--repeats 5] [--json FILE] [--markdown FILE]

Each model's real training epoch (its config's optimizer, rbg dropout as on CPU) over ``steps``
batches of 512 MNIST images is compiled for each layout and run ``repeats`` times, the layouts
interleaved so that the machine's drift hits them alike; each keeps its fastest run
(``autotune.time_impls``). This table decided which layouts the project keeps. Run nothing else
meanwhile.
"""

import jax
from absl import app, flags

from flax_mnist import autotune, benchmark, data, layers, log, models, optim
from flax_mnist import config as config_lib

_MODELS = flags.DEFINE_list("models", models.model_names(), "Models to time.")
_IMPLS = flags.DEFINE_list("impls", ["s2d", "im2col"], f"Layouts, of {', '.join(layers.IMPLS)}.")
_STEPS = flags.DEFINE_integer("steps", 8, "Batches of 512 per timed epoch.")
_REPEATS = flags.DEFINE_integer("repeats", 5, "Timed runs per layout (the fastest is kept).")
_JSON = flags.DEFINE_string("json", None, "Write the figures to this JSON file.")
_MARKDOWN = flags.DEFINE_string("markdown", None, "Write the table to this Markdown file.")


def main(argv: list[str]) -> None:
  del argv
  mnist = data.load_mnist()
  count = 512 * _STEPS.value
  images, labels = (
    jax.device_put(mnist.train.images[:count]),
    jax.device_put(mnist.train.labels[:count]),
  )
  environment = log.environment()
  result = {"environment": environment, "steps": _STEPS.value, "ms_per_step": {}}
  for name in _MODELS.value:
    config = config_lib.default_config()
    timings = autotune.time_impls(
      name,
      _IMPLS.value,
      batch_size=512,
      steps=_STEPS.value,
      repeats=_REPEATS.value,
      tx=optim.make_optimizer(config),
      dropout_rng_impl="rbg",
      images=images,
      labels=labels,
    )
    result["ms_per_step"][name] = {impl: 1e3 * seconds for impl, seconds in timings.items()}
  header = "| model | " + " | ".join(f"{impl} ms/step" for impl in _IMPLS.value) + " |"
  rows = [header, "|" + " --- |" * (len(_IMPLS.value) + 1)]
  for name, timings in result["ms_per_step"].items():
    rows.append(f"| {name} | " + " | ".join(f"{timings[impl]:.2f}" for impl in _IMPLS.value) + " |")
  paths = {"json_path": _JSON.value, "markdown_path": _MARKDOWN.value}
  benchmark.save_step_table(rows, result, repeats=_REPEATS.value, steps=_STEPS.value, **paths)


if __name__ == "__main__":
  app.run(main)
