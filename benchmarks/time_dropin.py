"""Your own layers at the family's speed: ms per training step of cnn_pool built four ways.

  python benchmarks/time_dropin.py [--steps 8] [--repeats 5] [--json FILE] [--markdown FILE]

The notebook's cnn_pool in stock flax.nnx layers (``examples/dropin_layers.py``, mode "stock"),
inside the trainer's compiled epoch (a ``lax.scan``) and as a Python loop of one jitted step per
batch; in flax_mnist.nn's drop-ins (mode "dropin": ``nn.Conv`` + ``nn.max_pool``) and with
``nn.conv_pool`` (mode "fused"); and the family's own cnn_pool under s2d and im2col. Adam 1e-3
(Keras's), batches of 512 real MNIST images, interleaved runs, the fastest kept
(``autotune.time_models``). Run nothing else meanwhile.
"""

import functools
import sys
from pathlib import Path

import jax
from absl import app, flags
from flax import nnx

from flax_mnist import autotune, benchmark, data, log, models, optim
from flax_mnist import config as config_lib

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
import dropin_layers  # noqa: E402

_STEPS = flags.DEFINE_integer("steps", 8, "Batches of 512 per timed epoch.")
_REPEATS = flags.DEFINE_integer("repeats", 5, "Timed runs per variant (the fastest is kept).")
_JSON = flags.DEFINE_string("json", None, "Write the figures to this JSON file.")
_MARKDOWN = flags.DEFINE_string("markdown", None, "Write the table to this Markdown file.")

VARIANTS = {
  "stock nnx.Conv + nnx.max_pool, compiled epoch (scan)": "stock",
  "stock nnx.Conv + nnx.max_pool, Python loop of jitted steps": "stock",
  "drop-in nn.Conv + nn.max_pool": "dropin",
  "drop-in nn.Conv with nn.conv_pool": "fused",
}
LOOPED = ("stock nnx.Conv + nnx.max_pool, Python loop of jitted steps",)


def main(argv: list[str]) -> None:
  del argv
  mnist = data.load_mnist()
  count = 512 * _STEPS.value
  images = jax.device_put(mnist.train.images[:count])
  labels = jax.device_put(mnist.train.labels[:count])
  rngs = lambda: nnx.Rngs(params=0, dropout=1)
  builders = {
    name: functools.partial(dropin_layers.cnn_pool, mode=mode, rngs=rngs())
    for name, mode in VARIANTS.items()
  }
  for impl in ("s2d", "im2col"):
    builders[f"family cnn_pool, {impl}"] = functools.partial(
      models.init_model, "cnn_pool", 0, impl=impl, dropout_rng_impl="rbg"
    )
  seconds = autotune.time_models(
    builders,
    steps=_STEPS.value,
    repeats=_REPEATS.value,
    tx=optim.make_optimizer(config_lib.default_config()),
    images=images,
    labels=labels,
    python_loop=LOOPED,
  )
  environment = log.environment()
  ms = {name: 1e3 * value for name, value in seconds.items()}
  family = ms["family cnn_pool, s2d"]
  rows = ["| cnn_pool built with | ms/step | x family (s2d) |", "| --- | ---: | ---: |"]
  rows += [f"| {name} | {value:.1f} | {value / family:.2f} |" for name, value in ms.items()]
  result = {"environment": environment, "steps": _STEPS.value, "ms_per_step": ms}
  paths = {"json_path": _JSON.value, "markdown_path": _MARKDOWN.value}
  benchmark.save_step_table(rows, result, repeats=_REPEATS.value, steps=_STEPS.value, **paths)


if __name__ == "__main__":
  app.run(main)
