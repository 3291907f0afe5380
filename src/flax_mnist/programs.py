"""What a run compiles and starts from: the optimizer and loss (the config's, or a caller's),
each seed's initial state and shuffle key, the device mesh, MNIST on device, and the layer
implementation when the config asks to measure it."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

import jax
import optax
from etils import epath
from flax import nnx

from flax_mnist import autotune, data, layers, models, optim, sharding, steps, workdir
from flax_mnist.config import RunSpec, config_to_dict, impl_candidates
from flax_mnist.errors import ConfigError

Say = Callable[[str], None]
State = dict[str, Any]  # {"params", "model_state", "opt_state"}


@dataclasses.dataclass(frozen=True)
class Custom:
  """What a caller passes from Python instead of the config: an optax optimizer, a loss."""

  optimizer: optax.GradientTransformation | None = None
  loss_fn: steps.LossFn | None = None

  def record(self, config_dict: dict[str, Any]) -> dict[str, Any]:
    """config.json says where the config was overridden (a resume then checks these too)."""
    if self.optimizer is not None:
      config_dict["optimizer"] = "custom"
    if self.loss_fn is not None:
      config_dict["loss"] = f"custom: {getattr(self.loss_fn, '__name__', repr(self.loss_fn))}"
    return config_dict


def describe(model: nnx.Module) -> str:
  """The Keras-like summary of a stack of layers; the parameter count of any other module."""
  if hasattr(model, "layers"):
    return models.summary(model)
  trainable, non_trainable = models.count_params(model)
  return f"Model {type(model).__name__}: {trainable:,} trainable, {non_trainable:,} other params"


class Programs:
  """The model's graphdefs, the optimizer, each seed's initial state and shuffle key."""

  def __init__(
    self,
    config: Mapping[str, Any],
    spec: RunSpec,
    mesh: jax.sharding.Mesh | None,
    steps_per_epoch: int,
    custom: Custom,
    say: Say,
    image_shape: tuple[int, ...] = data.IMAGE_SHAPE,
  ):
    self.tx = custom.optimizer or optim.make_optimizer(config, steps_per_epoch)
    self.loss_fn = custom.loss_fn or steps.smoothed_cross_entropy(config["label_smoothing"])
    self.templates: list[State] = []
    self.shuffle_keys: list[jax.Array] = []
    kwargs = config_to_dict(config.get("model_kwargs") or {})
    for seed in spec.seeds:
      model = models.init_model(
        spec.model,
        seed,
        impl=spec.impl,
        dropout_rng_impl=spec.dropout_rng_impl,
        model_kwargs=kwargs,
        compute_dtype=spec.compute_dtype,
      )
      self.train_graphdef, params, model_state = nnx.split(model, nnx.Param, ...)
      state = {"params": params, "model_state": model_state, "opt_state": self.tx.init(params)}
      self.templates.append(sharding.replicate(state, mesh))
      self.shuffle_keys.append(
        sharding.replicate(jax.random.fold_in(jax.random.key(seed), 2), mesh)
      )
    say(describe(model))
    model.eval()
    self.eval_graphdef = nnx.graphdef(model)
    check_logits(spec.model, self.eval_graphdef, self.templates[0], image_shape)


def check_logits(
  name: str, eval_graphdef: nnx.GraphDef, state: State, image_shape: tuple[int, ...]
) -> None:
  """The model maps a batch of images to one logit per class, checked on shapes alone before
  anything is compiled: logits (N,) or (N, 5) would otherwise end in a traceback or a false
  "diverged", and (N, 11) would train silently."""
  images = jax.ShapeDtypeStruct((2, *image_shape), jax.numpy.float32)
  apply = lambda params, model_state, x: nnx.merge(eval_graphdef, params, model_state)(x)
  try:
    logits = jax.eval_shape(apply, state["params"], state["model_state"], images)
  except Exception as error:  # noqa: BLE001 (a user's model may raise anything on call)
    lines = str(error).strip().splitlines()
    reason = f"{type(error).__name__}: {lines[0][:200] if lines else ''}"
    raise ConfigError(
      f"model {name!r}: calling it on images of shape {images.shape} raised {reason}"
    ) from error
  expected = (images.shape[0], data.NUM_CLASSES)
  if getattr(logits, "shape", None) != expected:
    got = getattr(logits, "shape", type(logits).__name__)
    raise ConfigError(
      f"model {name!r}: returns logits of shape {got} for images of shape {images.shape}, "
      f"expected {expected} (one logit per class of {data.NUM_CLASSES})"
    )


def put_data(
  config: Mapping[str, Any], mesh: jax.sharding.Mesh | None, say: Say
) -> tuple[tuple[jax.Array, ...], dict[str, str]]:
  """MNIST on device (replicated over the mesh): (train images, train labels, test images, test
  labels), and the record of what it is (``data``: sizes and fingerprint, a resume field;
  ``data_source``: where it was read)."""
  mnist = data.load_mnist(config["data_dir"] or None, tfds_data_dir=config["tfds_data_dir"] or None)
  say(f"data: {mnist.source}: {len(mnist.train):,} train, {len(mnist.test):,} test images")
  record = {"data": mnist.identity(), "data_source": mnist.source}
  arrays = (mnist.train.images, mnist.train.labels, mnist.test.images, mnist.test.labels)
  if mesh is None:
    return tuple(jax.device_put(array) for array in arrays), record
  return tuple(sharding.replicate(arrays, mesh)), record


def make_mesh(spec: RunSpec) -> jax.sharding.Mesh | None:
  """The (seed, data) mesh, or None for one device in one process: then nothing is annotated
  and the program is exactly the single-device one."""
  if spec.seed_devices * spec.data_devices == 1 and spec.process_count == 1:
    return None
  return sharding.make_mesh(spec.seed_devices, spec.data_devices)


def measure_impl(
  config: Mapping[str, Any],
  spec: RunSpec,
  directories: list[epath.Path],
  arrays: tuple[jax.Array, ...],
  say: Say,
) -> tuple[RunSpec, dict[str, float]]:
  """``impl="measure"``: the implementation a workdir recorded when it started (a resumed run
  never measures again: implementations differ in the last float bits), else the fastest of
  this platform's candidates, timed on a few real training steps of the model."""
  for directory in directories:
    file = directory / workdir.CONFIG_FILE
    recorded = (workdir.read_config(directory) or {}).get("impl")
    if recorded in layers.IMPLS:
      say(f"impl {recorded} (recorded in {file} when the run started; not measured again)")
      return dataclasses.replace(spec, impl=recorded), {}
  impl, timings = autotune.choose_impl(
    spec.model,
    impl_candidates(),
    batch_size=config["batch_size"],
    dropout_rng_impl=spec.dropout_rng_impl,
    images=arrays[0],
    labels=arrays[1],
    model_kwargs=config_to_dict(config.get("model_kwargs") or {}),
  )
  say(
    "impl measured: "
    + ", ".join(f"{name} {1e3 * sec:.1f} ms/step" for name, sec in timings.items())
    + f": {impl}"
  )
  return dataclasses.replace(spec, impl=impl), timings
