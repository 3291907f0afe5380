"""The pure, compiled parts of training: one step, one epoch as a ``lax.scan``, evaluation.

Nothing here reads or writes files. The whole dataset lives on device as uint8. Each epoch is
one compiled call: a seeded on-device shuffle, then a ``lax.scan`` over the batches. Like Keras,
the remainder is trained on, not dropped: 60,000 images at batch 512 are 117 steps of 512 and a
118th of 96 real images (padded to 512 and masked, so one step shape is compiled: its loss is the
mean over its 96 images and BatchNorm's statistics see only them). Evaluation covers every test
image the same way, in eval mode (no dropout, BatchNorm moving statistics).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from flax_mnist import augment, data, registry, sharding

Metrics = dict[str, jax.Array]


class TrainState(NamedTuple):
  """What a seed's training carries from step to step and epoch to epoch (and checkpoints)."""

  params: nnx.State
  model_state: nnx.State  # BatchNorm statistics, dropout RNG counts.
  opt_state: optax.OptState


Batch = tuple[jax.Array, jax.Array, jax.Array | None]
# loss_fn(logits, labels) -> one loss per example; the step averages it (over the real rows).
LossFn = Callable[[jax.Array, jax.Array], jax.Array]
# metrics_fn(logits, labels) -> {name: one value per example}: extra figures, each averaged over
# the epoch's examples (the real rows) inside the compiled programs, like the loss.
MetricsFn = Callable[[jax.Array, jax.Array], Mapping[str, jax.Array]]


def cross_entropy(logits: jax.Array, labels: jax.Array) -> jax.Array:
  """Softmax cross-entropy of integer labels: the notebook's softmax + sparse cross-entropy,
  computed stably from the logits."""
  return optax.softmax_cross_entropy_with_integer_labels(logits, labels)


def smoothed_cross_entropy(label_smoothing: float) -> LossFn:
  """Cross-entropy against labels smoothed as Keras's ``label_smoothing``: one-hot * (1 - s) +
  s / 10; ``cross_entropy`` itself when s is 0."""
  if not label_smoothing:
    return cross_entropy

  def loss(logits: jax.Array, labels: jax.Array) -> jax.Array:
    targets = optax.smooth_labels(jax.nn.one_hot(labels, logits.shape[-1]), label_smoothing)
    return optax.softmax_cross_entropy(logits, targets)

  return loss


def apply_model(model: nnx.Module, images: jax.Array, mask: jax.Array | None) -> jax.Array:
  """Logits of uint8 ``images``; the padding ``mask`` goes to models that take one (the
  family's BatchNorm leaves padded rows out of its statistics)."""
  inputs = data.normalize_images(images)
  if mask is not None and registry.takes_mask(model):
    return model(inputs, mask=mask)
  return model(inputs)


def zero_metrics(extra: Sequence[str] = (), num_steps: int = 0) -> Metrics:
  """Empty running sums: summed loss, correct count, example count, steps; the sums of the
  ``extra`` metrics (a ``metrics_fn``'s names) under ``"extra"``; and, for ``num_steps`` > 0,
  each step's mean loss under ``"step_losses"`` (``config.log_every_steps``)."""
  metrics = {
    "loss_sum": jnp.zeros((), jnp.float32),
    "correct": jnp.zeros((), jnp.int32),
    "count": jnp.zeros((), jnp.int32),
    "steps": jnp.zeros((), jnp.int32),
  }
  if extra:
    metrics["extra"] = {name: jnp.zeros((), jnp.float32) for name in extra}
  if num_steps:
    metrics["step_losses"] = jnp.zeros((num_steps,), jnp.float32)
  return metrics


def accumulate(
  metrics: Metrics,
  losses: jax.Array,
  logits: jax.Array,
  labels: jax.Array,
  mask: jax.Array | None,
  metrics_fn: MetricsFn | None = None,
) -> Metrics:
  """Adds a batch's summed loss and correct count (and the sums of ``metrics_fn``'s per-example
  values); rows where ``mask`` is False are padding."""
  hits = jnp.argmax(logits, axis=-1) == labels
  if mask is None:
    loss_sum, correct, count = losses.sum(), jnp.sum(hits, dtype=jnp.int32), labels.shape[0]
  else:
    loss_sum = jnp.where(mask, losses, 0.0).sum()
    correct, count = jnp.sum(hits & mask, dtype=jnp.int32), jnp.sum(mask, dtype=jnp.int32)
  summed = {
    **metrics,
    "loss_sum": metrics["loss_sum"] + loss_sum,
    "correct": metrics["correct"] + correct,
    "count": metrics["count"] + count,
    "steps": metrics["steps"] + 1,
  }
  if metrics_fn is not None:
    values = metrics_fn(logits, labels)
    extra = {}
    for name, total in metrics["extra"].items():
      value = jnp.asarray(values[name], jnp.float32)
      extra[name] = total + (value if mask is None else jnp.where(mask, value, 0.0)).sum()
    summed["extra"] = extra
  return summed


def scan_batches(
  step: Callable[[Any, Batch], Any],
  carry: Any,
  images: jax.Array,
  labels: jax.Array,
  batch_size: int,
  order: jax.Array | None = None,
  batch_sharding: jax.sharding.Sharding | None = None,
) -> Any:
  """Applies ``step(carry, (images, labels, mask))`` to consecutive batches in one ``lax.scan``.

  ``order`` (a permutation of the examples) shuffles them. A last partial batch is padded to
  ``batch_size`` and ``mask`` marks its real rows (it is None when every batch is full): one
  step shape, so the step is compiled once, not twice (that halved cnn_pool_bn's compile time).

  ``batch_sharding`` (for arrays shaped (steps, batch, ...)) spreads each batch's rows over the
  devices of a mesh's ``data`` axis: that one annotation is enough for the compiler to split the
  step and all-reduce the gradients; BatchNorm statistics, the masked mean and the metrics come
  out global by construction (tested equal to one device).
  """
  num_examples = images.shape[0]
  num_steps = -(-num_examples // batch_size)
  padding = num_steps * batch_size - num_examples
  if padding:
    index = jnp.arange(num_examples) if order is None else order
    order = jnp.concatenate([index, jnp.zeros((padding,), index.dtype)])
    mask = (jnp.arange(num_steps * batch_size) < num_examples).reshape(num_steps, batch_size)
  else:
    mask = None
  if order is not None:
    images, labels = images[order], labels[order]
  batches = (
    images.reshape(num_steps, batch_size, *images.shape[1:]),
    labels.reshape(num_steps, batch_size),
    mask,
  )
  if batch_sharding is not None:
    batches = jax.lax.with_sharding_constraint(batches, batch_sharding)
  carry, _ = jax.lax.scan(lambda carry, batch: (step(carry, batch), None), carry, batches)
  return carry


def train_step(
  graphdef: nnx.GraphDef,
  tx: optax.GradientTransformation,
  carry: tuple[TrainState, Metrics],
  batch: Batch,
  loss_fn: LossFn = cross_entropy,
  metrics_fn: MetricsFn | None = None,
) -> tuple[TrainState, Metrics]:
  """One optimizer step on a batch of uint8 images: a pure function of (state, metrics).

  ``batch`` is (images, labels, mask): where ``mask`` is given, only its True rows count (in the
  loss, its mean, BatchNorm's statistics and the metrics), as if the batch held just those.
  Metrics holding ``"step_losses"`` get this step's mean loss at the step's index.
  """
  state, metrics = carry
  images, labels, mask = batch

  def mean_loss(params):
    model = nnx.merge(graphdef, params, state.model_state, copy=True)
    logits = apply_model(model, images, mask)
    losses = loss_fn(logits, labels)
    if mask is None:
      loss = losses.mean()
    else:
      loss = jnp.where(mask, losses, 0.0).sum() / mask.sum()
    # BatchNorm stats, dropout RNG counts.
    _, _, new_model_state = nnx.split(model, nnx.Param, ...)
    return loss, (losses, logits, new_model_state)

  (loss, (losses, logits, model_state)), grads = jax.value_and_grad(mean_loss, has_aux=True)(
    state.params
  )
  updates, opt_state = tx.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  summed = accumulate(metrics, losses, logits, labels, mask, metrics_fn)
  if "step_losses" in metrics:
    summed["step_losses"] = metrics["step_losses"].at[metrics["steps"]].set(loss)
  return TrainState(params, model_state, opt_state), summed


def eval_step(
  graphdef: nnx.GraphDef,
  params: nnx.State,
  model_state: nnx.State,
  metrics: Metrics,
  batch: Batch,
  loss_fn: LossFn = cross_entropy,
  metrics_fn: MetricsFn | None = None,
) -> Metrics:
  """Adds a batch's summed loss and correct count (eval-mode ``graphdef``) to ``metrics``."""
  images, labels, mask = batch
  logits = apply_model(nnx.merge(graphdef, params, model_state, copy=True), images, None)
  losses = loss_fn(logits, labels)
  return accumulate(metrics, losses, logits, labels, mask, metrics_fn)


def make_train_epoch(
  graphdef: nnx.GraphDef,
  tx: optax.GradientTransformation,
  batch_size: int,
  *,
  shuffle: bool = True,
  progress: Callable[..., None] | None = None,
  over_seeds: bool = False,
  mesh: jax.sharding.Mesh | None = None,
  loss_fn: LossFn = cross_entropy,
  max_shift: int = 0,
  metrics_fn: MetricsFn | None = None,
  metric_names: Sequence[str] = (),
  step_losses: bool = False,
) -> Callable[..., tuple]:
  """Returns the jitted ``train_epoch(state, images, labels, key) -> (state, metrics)``, the
  metrics summed (loss, correct count).

  ``max_shift`` > 0: each training image is moved by up to that many pixels
  (``augment.random_shifts``), with a key per step from ``fold_in(key, 1)``; the order still
  comes from ``key`` itself, so without shifts the program is the one it always was.

  ``metrics_fn`` (its ``metric_names``): extra per-example figures, summed in ``"extra"``.
  ``step_losses``: the metrics hold each step's mean loss (``"step_losses"``, one per step).
  Neither changes what is trained: without them the program is the one it always was.

  ``progress(step, loss_sum, correct, count)``, if given, is called on the host after each step.
  ``over_seeds``: the states, the key and the returned metrics carry a leading seed axis (vmap);
  the images and labels are shared. ``mesh`` (axes ``seed``, ``data``): batches are split over
  ``data`` (``sharding.batch_sharding``) and vmapped seeds over ``seed``.
  """
  if over_seeds and progress is not None:
    raise ValueError("progress is not supported over seeds (the callback would run per seed)")
  _check_metric_names(metrics_fn, metric_names)

  def step(carry, batch):
    carry = train_step(graphdef, tx, carry, batch, loss_fn, metrics_fn)
    if progress is not None:
      metrics = carry[1]
      jax.debug.callback(
        progress, metrics["steps"], metrics["loss_sum"], metrics["correct"], metrics["count"]
      )
    return carry

  def train_epoch(state, images, labels, key):
    order = jax.random.permutation(key, images.shape[0]) if shuffle else None
    num_steps = -(-images.shape[0] // batch_size) if step_losses else 0
    carry = (state, zero_metrics(metric_names, num_steps))
    epoch_step = step
    if max_shift:
      augment_key = jax.random.fold_in(key, 1)

      def epoch_step(carry, batch):
        batch_images, batch_labels, mask = batch
        step_key = jax.random.fold_in(augment_key, carry[1]["steps"])
        shifted = augment.random_shifts(batch_images, step_key, max_shift)
        return step(carry, (shifted, batch_labels, mask))

    return scan_batches(
      epoch_step, carry, images, labels, batch_size, order, sharding.batch_sharding(mesh)
    )

  if over_seeds:
    train_epoch = jax.vmap(
      train_epoch, in_axes=(0, None, None, 0), spmd_axis_name=sharding.seed_axis(mesh)
    )
  return jax.jit(train_epoch)


def make_evaluate(
  graphdef: nnx.GraphDef,
  batch_size: int,
  *,
  over_seeds: bool = False,
  mesh: jax.sharding.Mesh | None = None,
  loss_fn: LossFn = cross_entropy,
  metrics_fn: MetricsFn | None = None,
  metric_names: Sequence[str] = (),
) -> Callable[..., Metrics]:
  """Returns the jitted ``evaluate(params, model_state, images, labels) -> metrics`` over every
  image. ``over_seeds``: the states and the returned metrics carry a leading seed axis (vmap).
  ``mesh``, ``metrics_fn``, ``metric_names``: as ``make_train_epoch``.
  """

  _check_metric_names(metrics_fn, metric_names)

  def evaluate(params, model_state, images, labels):
    step = functools.partial(
      eval_step, graphdef, params, model_state, loss_fn=loss_fn, metrics_fn=metrics_fn
    )
    return scan_batches(
      step,
      zero_metrics(metric_names),
      images,
      labels,
      batch_size,
      None,
      sharding.batch_sharding(mesh),
    )

  if over_seeds:
    evaluate = jax.vmap(
      evaluate, in_axes=(0, 0, None, None), spmd_axis_name=sharding.seed_axis(mesh)
    )
  return jax.jit(evaluate)


def _check_metric_names(metrics_fn: MetricsFn | None, metric_names: Sequence[str]) -> None:
  if (metrics_fn is None) != (not metric_names):
    raise ValueError(
      "metrics_fn and metric_names go together (programs.metric_names(metrics_fn, classes))"
    )


def summarize(metrics: Metrics) -> dict[str, float]:
  """Mean loss and accuracy from summed metrics (fetched to the host), and the mean of each
  extra metric under its name."""
  count = int(metrics["count"])
  return {
    "loss": float(metrics["loss_sum"]) / count,
    "accuracy": int(metrics["correct"]) / count,
    "correct": int(metrics["correct"]),
    "count": count,
    **{name: float(total) / count for name, total in metrics.get("extra", {}).items()},
  }
