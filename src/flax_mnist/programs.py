"""What a run compiles and starts from: the optimizer and loss (the config's, or a caller's),
each seed's initial state and shuffle key, and the model's train and eval graphdefs."""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import optax
from flax import nnx

from flax_mnist import models, nn, optim, registry, sharding, steps
from flax_mnist.config import RunConfig
from flax_mnist.errors import ConfigError
from flax_mnist.log import Say
from flax_mnist.steps import TrainState


@dataclasses.dataclass(frozen=True)
class Custom:
  """What a caller passes from Python beside the config: an optax optimizer and a loss (instead
  of the config's), extra metrics."""

  optimizer: optax.GradientTransformation | None = None
  loss_fn: steps.LossFn | None = None
  metrics_fn: steps.MetricsFn | None = None

  def record(self, run: RunConfig) -> RunConfig:
    """The run as config.json records it: where the config was overridden (a resume then
    checks these too)."""
    if self.optimizer is not None:
      run = dataclasses.replace(run, optimizer="custom")
    if self.loss_fn is not None:
      run = dataclasses.replace(
        run, loss=f"custom: {getattr(self.loss_fn, '__name__', repr(self.loss_fn))}"
      )
    return run


class Programs:
  """The model's graphdefs, the optimizer (and its schedule), each seed's initial state and
  shuffle key. ``run`` carries the data's ``input_shape`` and ``num_classes`` (the trainer sets
  them from the data)."""

  def __init__(
    self,
    run: RunConfig,
    mesh: jax.sharding.Mesh | None,
    steps_per_epoch: int,
    custom: Custom,
    say: Say,
  ):
    self.tx = custom.optimizer or optim.make_optimizer(run, steps_per_epoch)
    # The rate by step where the config's schedule moves it (logged per epoch); None for a
    # constant rate (a flat line says nothing) or a caller's optimizer (its rate is its own).
    moves = custom.optimizer is None and run.lr_schedule != "constant"
    self.schedule = optim.make_schedule(run, steps_per_epoch) if moves else None
    self.loss_fn = custom.loss_fn or steps.smoothed_cross_entropy(run.label_smoothing)
    self.templates: list[TrainState] = []
    self.shuffle_keys: list[jax.Array] = []
    for seed in run.seeds:
      model = models.init_model(
        run.model,
        seed,
        impl=run.impl,
        dropout_rng_impl=run.dropout_rng_impl,
        model_kwargs=run.model_kwargs,
        compute_dtype=run.compute_dtype,
        input_shape=run.input_shape,
        num_classes=run.num_classes,
      )
      self.train_graphdef, params, model_state = nnx.split(model, nnx.Param, ...)
      state = TrainState(params, model_state, self.tx.init(params))
      self.templates.append(sharding.replicate(state, mesh))
      shuffle_key = registry.seed_keys(seed, run.dropout_rng_impl).shuffle
      self.shuffle_keys.append(sharding.replicate(shuffle_key, mesh))
    say(models.describe(model, run.input_shape))
    stock = nn.stock_convs(model) if jax.default_backend() == "cpu" else []
    if stock:
      say(
        f"warning: model {run.model!r} holds stock flax.nnx.Conv layers ({', '.join(stock)}): on "
        f"CPU they train {nn.STOCK_CONV_SLOWDOWN_CPU} slower per step than flax_mnist.nn.Conv, a "
        "drop-in with the same arguments and parameters (benchmarks/README.md)"
      )
    model.eval()
    self.eval_graphdef = nnx.graphdef(model)
    check_logits(run.model, self.eval_graphdef, self.templates[0], run.input_shape, run.num_classes)
    self.metrics_fn = custom.metrics_fn
    self.metric_names = metric_names(custom.metrics_fn, run.num_classes)

  def train_epoch(self, run: RunConfig, mesh: jax.sharding.Mesh | None, **options: Any) -> Any:
    """The jitted epoch of these programs under ``run`` (``steps.make_train_epoch``);
    ``options``: its ``progress``, ``over_seeds``, ``step_losses``."""
    return steps.make_train_epoch(
      self.train_graphdef,
      self.tx,
      run.batch_size,
      shuffle=run.shuffle,
      mesh=mesh,
      loss_fn=self.loss_fn,
      max_shift=run.augment["shift"],
      metrics_fn=self.metrics_fn,
      metric_names=self.metric_names,
      **options,
    )


def check_logits(
  name: str,
  eval_graphdef: nnx.GraphDef,
  state: TrainState,
  image_shape: tuple[int, ...],
  num_classes: int,
) -> None:
  """The model maps a batch of images to one logit per class, checked on shapes alone before
  anything is compiled: logits (N,) or (N, 5) would otherwise end in a traceback or a false
  "diverged", and (N, 11) would train silently."""
  images = jax.ShapeDtypeStruct((2, *image_shape), jax.numpy.float32)
  apply = lambda params, model_state, x: nnx.merge(eval_graphdef, params, model_state)(x)
  try:
    logits = jax.eval_shape(apply, state.params, state.model_state, images)
  except Exception as error:  # noqa: BLE001 (a user's model may raise anything on call)
    lines = str(error).strip().splitlines()
    reason = f"{type(error).__name__}: {lines[0][:200] if lines else ''}"
    raise ConfigError(
      f"model {name!r}: calling it on images of shape {images.shape} raised {reason}"
    ) from error
  expected = (images.shape[0], num_classes)
  if getattr(logits, "shape", None) != expected:
    got = getattr(logits, "shape", type(logits).__name__)
    raise ConfigError(
      f"model {name!r}: returns logits of shape {got} for images of shape {images.shape}, "
      f"expected {expected} (one logit per class of {num_classes})"
    )


# Names a metrics_fn may not take: the record's own figures (train_<name>, val_<name>).
_RECORDED_METRICS = ("loss", "accuracy", "correct", "count", "seconds", "learning_rate")


def metric_names(metrics_fn: steps.MetricsFn | None, num_classes: int) -> tuple[str, ...]:
  """The names of ``metrics_fn``'s metrics, checked on shapes alone before anything compiles:
  it must map (logits, labels) of a batch to a dict of one value per example."""
  if metrics_fn is None:
    return ()
  name = getattr(metrics_fn, "__name__", repr(metrics_fn))
  logits = jax.ShapeDtypeStruct((2, num_classes), jax.numpy.float32)
  labels = jax.ShapeDtypeStruct((2,), jax.numpy.int32)
  try:
    values = jax.eval_shape(metrics_fn, logits, labels)
  except Exception as error:  # noqa: BLE001 (a user's function may raise anything)
    lines = str(error).strip().splitlines()
    reason = f"{type(error).__name__}: {lines[0][:200] if lines else ''}"
    raise ConfigError(
      f"metrics_fn {name}: calling it on logits (2, {num_classes}) raised {reason}"
    ) from error
  if not isinstance(values, dict) or not values:
    raise ConfigError(
      f"metrics_fn {name}: returned {type(values).__name__}, expected a non-empty dict "
      "{name: one value per example}"
    )
  for key, value in values.items():
    if not isinstance(key, str) or not key.isidentifier() or key in _RECORDED_METRICS:
      raise ConfigError(
        f"metrics_fn {name}: metric name {key!r}: expected an identifier other than "
        f"{', '.join(_RECORDED_METRICS)}"
      )
    if getattr(value, "shape", None) != (2,):
      raise ConfigError(
        f"metrics_fn {name}: metric {key!r} has shape {getattr(value, 'shape', None)} for a "
        "batch of 2, expected (2,): one value per example (the epoch's figure is their mean)"
      )
  return tuple(sorted(values))
