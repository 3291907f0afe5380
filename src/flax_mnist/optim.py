"""The optimizer and learning-rate schedule a config asks for, as optax transformations.

``keras_adam`` is Adam exactly as Keras 3 computes it (the notebook's optimizer): epsilon is
added to the square root of the *raw* second moment and the bias correction goes into the step
size, ``var -= lr * sqrt(1 - b2^t) / (1 - b1^t) * m / (sqrt(v) + eps)``. optax's ``adam`` adds
eps to ``sqrt(v_hat)`` instead: the same eps value acts 32x larger at step 1 in Keras and ~3x
after one epoch, and over the first 5 steps 28-35% of the cnn's updates differ by more than 10%.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, NamedTuple

import jax
import jax.numpy as jnp
import optax

if TYPE_CHECKING:  # config imports this module (the optimizer names).
  from ml_collections import ConfigDict

  from flax_mnist.config import RunConfig

OPTIMIZERS = ("keras_adam", "adam", "adamw", "sgd")
SCHEDULES = ("constant", "cosine", "warmup_cosine", "onecycle")
# The config fields that make one optimizer state or update rule differ from another: a
# checkpoint trained under other values cannot be resumed (its optimizer state means another
# thing), and load_model ignores them all.
OPTIMIZER_FIELDS = (
  "optimizer",
  "learning_rate",
  "lr_schedule",
  "warmup_epochs",
  "adam_eps",
  "adam_b1",
  "adam_b2",
  "momentum",
  "weight_decay",
  "grad_clip_norm",
)


class KerasAdamState(NamedTuple):
  """Keras's Adam slots: the step count and the raw (not bias-corrected) moments."""

  count: jax.Array
  mu: optax.Updates
  nu: optax.Updates


def keras_adam(
  learning_rate: optax.ScalarOrSchedule,
  b1: float = 0.9,
  b2: float = 0.999,
  eps: float = 1e-7,
) -> optax.GradientTransformation:
  """Adam as Keras 3 computes it (keras/src/optimizers/adam.py), term for term:

  ``t = count + 1; alpha = lr * sqrt(1 - b2^t) / (1 - b1^t); m += (g - m) * (1 - b1);
  v += (g^2 - v) * (1 - b2); update = -(m * alpha) / (sqrt(v) + eps)``.
  ``learning_rate`` may be a schedule of the step count (Keras evaluates it at ``iterations``).
  """

  def init(params: optax.Params) -> KerasAdamState:
    zeros = jax.tree.map(jnp.zeros_like, params)
    return KerasAdamState(jnp.zeros([], jnp.int32), zeros, jax.tree.map(jnp.zeros_like, params))

  def update(grads, state: KerasAdamState, params=None):
    del params
    lr = learning_rate(state.count) if callable(learning_rate) else learning_rate
    step = (state.count + 1).astype(jnp.float32)
    alpha = lr * jnp.sqrt(1 - jnp.power(b2, step)) / (1 - jnp.power(b1, step))
    mu = jax.tree.map(lambda m, g: m + (g - m) * (1 - b1), state.mu, grads)
    nu = jax.tree.map(lambda v, g: v + (jnp.square(g) - v) * (1 - b2), state.nu, grads)
    updates = jax.tree.map(lambda m, v: -(m * alpha) / (jnp.sqrt(v) + eps), mu, nu)
    return updates, KerasAdamState(state.count + 1, mu, nu)

  return optax.GradientTransformation(init, update)


def make_schedule(config: RunConfig | ConfigDict, steps_per_epoch: int) -> optax.ScalarOrSchedule:
  """``config.learning_rate`` under ``config.lr_schedule`` over ``num_epochs`` epochs of steps.

  constant; cosine (decay to 0 over the run); warmup_cosine (linear warmup over
  ``warmup_epochs``, then cosine to 0); onecycle (optax's linear one-cycle: up to the rate at
  ``warmup_epochs`` or 30% of the run, then down).
  """
  peak, name = config.learning_rate, config.lr_schedule
  total = max(1, config.num_epochs * steps_per_epoch)
  warmup = int(round(config.warmup_epochs * steps_per_epoch))
  if name == "constant":
    return peak
  if name == "cosine":
    return optax.cosine_decay_schedule(peak, total)
  if name == "warmup_cosine":
    return optax.warmup_cosine_decay_schedule(0.0, peak, warmup, max(total, warmup + 1))
  peak_at = warmup if warmup else int(0.3 * total)
  return optax.linear_onecycle_schedule(total, peak, pct_start=max(peak_at, 1) / total)


def make_optimizer(
  config: RunConfig | ConfigDict, steps_per_epoch: int = 118
) -> optax.GradientTransformation:
  """The config's optimizer: Keras-form Adam (the notebook's), optax adam, adamw (decoupled
  ``weight_decay``) or sgd with ``momentum``; under ``lr_schedule``; the gradient clipped to
  ``grad_clip_norm`` (global norm) first when it is set. Adam's ``adam_b1``, ``adam_b2`` and
  ``adam_eps`` default to Keras's 0.9, 0.999 and 1e-7."""
  name = config.optimizer
  schedule = make_schedule(config, steps_per_epoch)
  eps, b1, b2 = config.adam_eps, config.adam_b1, config.adam_b2
  if name == "keras_adam":
    tx = keras_adam(schedule, b1=b1, b2=b2, eps=eps)
  elif name == "adam":
    tx = optax.adam(schedule, b1=b1, b2=b2, eps=eps)
  elif name == "adamw":
    tx = optax.adamw(schedule, b1=b1, b2=b2, eps=eps, weight_decay=config.weight_decay)
  else:
    tx = optax.sgd(schedule, momentum=config.momentum or None)
  clip = config.grad_clip_norm
  return optax.chain(optax.clip_by_global_norm(clip), tx) if clip else tx
