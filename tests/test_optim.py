"""Tests for flax_mnist.optim: Keras's Adam against a NumPy transcription of Keras's update,
schedules, and the optimizer a config builds."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from flax_mnist import config as config_lib
from flax_mnist import optim


def keras_adam_numpy(grads, lr=1e-3, b1=0.9, b2=0.999, eps=1e-7):
  """keras/src/optimizers/adam.py's update_step, transcribed in NumPy in float32 as Keras runs
  it (``1 - b2**t`` loses 5 digits in float32 at t = 1: Keras loses them too)."""
  f32 = np.float32
  lr, b1, b2, eps = f32(lr), f32(b1), f32(b2), f32(eps)
  var = np.zeros_like(grads[0], dtype=f32)
  m, v = np.zeros_like(var), np.zeros_like(var)
  trajectory = []
  for iterations, g in enumerate(grads):
    g = g.astype(f32)
    local_step = f32(iterations + 1)
    alpha = lr * np.sqrt(1 - np.power(b2, local_step)) / (1 - np.power(b1, local_step))
    m = m + (g - m) * (1 - b1)
    v = v + (np.square(g) - v) * (1 - b2)
    var = var - (m * alpha) / (np.sqrt(v) + eps)
    trajectory.append(var.copy())
  return trajectory


def _run(tx, grads):
  params = {"w": jnp.zeros(grads[0].shape, jnp.float32)}
  state = tx.init(params)
  trajectory = []
  for g in grads:
    updates, state = tx.update({"w": jnp.asarray(g, jnp.float32)}, state, params)
    params = optax.apply_updates(params, updates)
    trajectory.append(np.asarray(params["w"], np.float64))
  return trajectory


def test_keras_adam_equals_the_numpy_transcription_of_keras():
  rng = np.random.default_rng(0)
  # Gradients over 4 orders of magnitude: eps matters for the small ones.
  grads = [rng.normal(size=(64,)) * 10.0 ** rng.uniform(-6, -2, size=(64,)) for _ in range(20)]
  got = _run(optim.keras_adam(1e-3), grads)
  want = keras_adam_numpy(grads)
  for step, (g, w) in enumerate(zip(got, want)):
    # atol: params that crossed zero (a 1e-3 step is 1e5 times it).
    np.testing.assert_allclose(g, w, rtol=2e-5, atol=1e-8, err_msg=f"step {step + 1}")
  # optax's adam puts eps on the bias-corrected moment: for small gradients it is another rule.
  optax_adam = _run(optax.adam(1e-3, eps=1e-7), grads)
  assert np.max(np.abs(optax_adam[0] - want[0]) / np.abs(want[0])) > 0.1


def test_keras_adam_follows_a_schedule_of_the_step_count():
  grads = [np.full((3,), 0.5)] * 4
  schedule = lambda count: 1e-3 * (count + 1)
  got = _run(optim.keras_adam(schedule), grads)
  params, expected = np.zeros(3), []
  m = v = np.zeros(3)
  for t in range(1, 5):
    m = m + (0.5 - m) * 0.1
    v = v + (0.25 - v) * 0.001
    params = params - m * (1e-3 * t) * np.sqrt(1 - 0.999**t) / (1 - 0.9**t) / (np.sqrt(v) + 1e-7)
    expected.append(params.copy())
  np.testing.assert_allclose(got, expected, rtol=1e-5)


@pytest.mark.parametrize("name", optim.SCHEDULES)
def test_schedules_start_end_and_peak_where_they_say(name):
  config = config_lib.default_config()
  config.update(lr_schedule=name, num_epochs=10, warmup_epochs=2.0)
  schedule = optim.make_schedule(config, steps_per_epoch=100)
  values = np.array([schedule(step) if callable(schedule) else schedule for step in range(1000)])
  assert values.max() == pytest.approx(1e-3, rel=1e-3)
  if name == "constant":
    assert np.all(values == 1e-3)
  if name in ("cosine", "warmup_cosine"):
    assert values[-1] < 1e-5
  if name in ("warmup_cosine", "onecycle"):
    assert values[0] < 1e-4 and np.argmax(values) == pytest.approx(200, abs=2)


@pytest.mark.parametrize("name", optim.OPTIMIZERS)
def test_each_optimizer_of_the_config_lowers_a_quadratic(name):
  config = config_lib.default_config()
  config.update(optimizer=name, learning_rate=0.05, grad_clip_norm=1.0)
  if name == "adamw":
    config.weight_decay = 1e-4
  config_lib.validate_config(config)
  tx = optim.make_optimizer(config, steps_per_epoch=10)
  params = {"w": jnp.full((4,), 3.0)}
  state = tx.init(params)
  loss = lambda p: jnp.sum(jnp.square(p["w"]))
  for _ in range(50):
    updates, state = tx.update(jax.grad(loss)(params), state, params)
    params = optax.apply_updates(params, updates)
  assert float(loss(params)) < 0.5 * 36.0
