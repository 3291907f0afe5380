"""Where a training step's time goes: per-XLA-op times of the real compiled epoch, from a trace.

  python benchmarks/profile_ops.py --model cnn_pool --steps 10 [--impl s2d] [--top 15] [--show 3]

Traces ``steps.make_train_epoch`` on the first ``steps`` batches of MNIST with jax.profiler
(a Perfetto trace, no TensorBoard needed), sums each op's time, and prints the top ops per step
with their output shape and the JAX operation they come from (``--show N``: and the fused HLO
computation of the N slowest). Run nothing else meanwhile.
"""

import collections
import gzip
import json
import re
import tempfile
from pathlib import Path

import jax
from absl import app, flags
from flax import nnx

from flax_mnist import config as config_lib
from flax_mnist import data, models, optim, steps

_MODEL = flags.DEFINE_enum("model", "cnn_pool", models.model_names(), "Model to profile.")
_IMPL = flags.DEFINE_enum(
  "impl", "auto", list(config_lib.IMPLS), "Implementation (config.resolve_impl)."
)
_DROPOUT_RNG_IMPL = flags.DEFINE_enum(
  "dropout_rng_impl",
  "auto",
  list(config_lib.DROPOUT_RNG_IMPLS),
  "PRNG of the dropout masks (config.resolve_dropout_rng_impl).",
)
_STEPS = flags.DEFINE_integer("steps", 10, "Batches of 512 in the profiled epoch.")
_TOP = flags.DEFINE_integer("top", 15, "How many ops to list.")
_SHOW = flags.DEFINE_integer("show", 0, "Print the fused HLO computation of this many top ops.")
_BY_LAYER = flags.DEFINE_bool("by_layer", False, "Also sum the op times per layer.")
_DATA_DIR = flags.DEFINE_string(
  "data_dir", None, "IDX directory (default: $FLAX_MNIST_DATA_DIR, then TFDS)."
)


def main(argv: list[str]) -> None:
  del argv
  config = config_lib.default_config()
  impl = config_lib.resolve_impl(_IMPL.value)
  mnist = data.load_mnist(_DATA_DIR.value)
  count = 512 * _STEPS.value
  images, labels = (
    jax.device_put(mnist.train.images[:count]),
    jax.device_put(mnist.train.labels[:count]),
  )
  model = models.init_model(
    _MODEL.value,
    config.seed,
    impl=impl,
    dropout_rng_impl=config_lib.resolve_dropout_rng_impl(_DROPOUT_RNG_IMPL.value),
  )
  graphdef, params, model_state = nnx.split(model, nnx.Param, ...)
  tx = optim.make_optimizer(config)
  epoch = steps.make_train_epoch(graphdef, tx, config.batch_size)
  state = steps.TrainState(params, model_state, tx.init(params))
  arguments = (state, images, labels, jax.random.key(0))
  compiled = epoch.lower(*arguments).compile()
  jax.block_until_ready(compiled(*arguments))  # Warm up.
  with tempfile.TemporaryDirectory() as trace_dir:
    with jax.profiler.trace(trace_dir, create_perfetto_trace=True):
      jax.block_until_ready(compiled(*arguments))
    trace = json.loads(
      gzip.decompress(next(Path(trace_dir).rglob("*perfetto_trace.json.gz")).read_bytes())
    )
  events = trace["traceEvents"] if isinstance(trace, dict) else trace
  totals = collections.Counter()
  for event in events:
    name = event.get("name", "")
    if event.get("ph") == "X" and "dur" in event and not name.startswith(("$", "Thunk", "Pjit")):
      totals[name] += event["dur"]
  hlo = compiled.as_text().splitlines()
  per_step = lambda microseconds: microseconds / 1e3 / _STEPS.value
  print(
    f"{_MODEL.value}, impl {impl}: {per_step(sum(totals.values())):.2f} ms of ops "
    f"per step of 512 ({jax.devices()[0].device_kind})"
  )
  for name, microseconds in totals.most_common(_TOP.value):
    line = next((text for text in hlo if f"%{name} = " in text), "")
    shape = line.split("=", 1)[1].split("(")[0].strip()[:36] if line else ""
    origin = re.search(r'op_name="([^"]+)"', line)
    origin = origin.group(1).split("closed_call/")[-1][:60] if origin else ""
    print(f"{per_step(microseconds):7.2f} ms  {name[:28]:28s} {shape:36s} {origin}")
  if _BY_LAYER.value:
    layers = collections.Counter()
    for name, microseconds in totals.items():
      line = next((text for text in hlo if f"%{name} = " in text), "")
      layers[_layer_of(line, models.layer_names(model))] += microseconds
    print("\nper layer (forward and backward):")
    for layer, microseconds in layers.most_common():
      print(f"{per_step(microseconds):7.2f} ms  {layer}")
  for name, _ in totals.most_common(_SHOW.value):
    print(f"\n{name}:\n{_fused_computation(hlo, name)}")


def _layer_of(line: str, layer_names: list[str]) -> str:
  """The layer an HLO op comes from, by the named scope (``Classifier``) in its metadata."""
  origin = re.search(r'op_name="([^"]+)"', line)
  if not origin:
    return "(no metadata: runtime, copies)"
  scopes = [scope for scope in re.split(r"[/()]", origin.group(1)) if scope in layer_names]
  if scopes:
    return scopes[-1]
  if "shuffle" in origin.group(1) or "gather" in origin.group(1):
    return "(shuffle, batch gather)"
  return "(loss, optimizer, metrics)"


def _fused_computation(hlo: list[str], name: str) -> str:
  """The HLO computation that op ``name`` calls (a fusion's body), or its own line."""
  line = next((text for text in hlo if f"%{name} = " in text), "")
  called = re.search(r"calls=%([\w.\-]+)", line)
  if not called:
    return line.strip()
  start = next(i for i, text in enumerate(hlo) if text.startswith(f"%{called.group(1)} "))
  end = next(i for i in range(start, len(hlo)) if hlo[i].startswith("}"))
  return "\n".join(text[:160] for text in hlo[start : end + 1])


if __name__ == "__main__":
  app.run(main)
