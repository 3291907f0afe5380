"""Tests for flax_mnist.steps: the compiled step, epoch and evaluation, batching with remainders."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from conftest import make_digits
from flax import nnx

from flax_mnist import evaluation, layers, models, steps


def _split(name="mlp", seed=0):
  model = models.create_model(name, rngs=nnx.Rngs(params=seed, dropout=seed + 1))
  model.train()
  return nnx.split(model, nnx.Param, ...)


def test_train_steps_on_a_fixed_batch_lower_the_loss():
  images, labels = make_digits(64, seed=0)
  images, labels = jnp.asarray(images[..., None]), jnp.asarray(labels.astype(np.int32))
  graphdef, params, model_state = _split()
  tx = optax.adam(1e-3, eps=1e-7)
  epoch = steps.make_train_epoch(graphdef, tx, batch_size=64, shuffle=False)
  state = steps.TrainState(params, model_state, tx.init(params))
  losses = []
  for _ in range(15):
    state, metrics = epoch(state, images, labels, jax.random.key(0))
    losses.append(float(metrics["loss_sum"]) / 64)
  assert losses[-1] < 0.5 * losses[0]


def test_epoch_covers_every_image_with_a_last_partial_batch():
  images, labels = make_digits(100, seed=0)
  images, labels = jnp.asarray(images[..., None]), jnp.asarray(labels.astype(np.int32))
  graphdef, params, model_state = _split()
  tx = optax.adam(1e-3)
  state = steps.TrainState(params, model_state, tx.init(params))
  _, metrics = steps.make_train_epoch(graphdef, tx, batch_size=32)(
    state, images, labels, jax.random.key(0)
  )
  assert int(metrics["count"]) == 100 and int(metrics["steps"]) == 4  # 3 x 32 + 1 x 4.
  model = nnx.merge(graphdef, params, model_state)
  model.eval()
  eval_metrics = steps.make_evaluate(nnx.graphdef(model), batch_size=48)(
    params, model_state, images, labels
  )
  assert int(eval_metrics["count"]) == 100 and int(eval_metrics["steps"]) == 3


def test_evaluation_is_independent_of_the_batch_size():
  images, labels = make_digits(90, seed=2)
  model = models.create_model("cnn_pool", rngs=nnx.Rngs(0))
  results = [
    evaluation.evaluate_model(model, images[..., None], labels.astype(np.int32), batch_size=size)
    for size in (90, 40, 7)
  ]
  assert {result["correct"] for result in results} == {results[0]["correct"]}
  assert all(result["count"] == 90 for result in results)
  np.testing.assert_allclose([r["loss"] for r in results], results[0]["loss"], rtol=1e-5)


def test_shuffle_is_seeded_and_changes_per_key():
  images, labels = make_digits(64, seed=0)
  images, labels = jnp.asarray(images[..., None]), jnp.asarray(labels.astype(np.int32))
  graphdef, params, model_state = _split()
  tx = optax.adam(1e-3)
  epoch = steps.make_train_epoch(graphdef, tx, batch_size=16)
  state = steps.TrainState(params, model_state, tx.init(params))
  run = lambda key: epoch(state, images, labels, jax.random.key(key))[0].params
  leaves = lambda state: np.concatenate([np.ravel(x) for x in jax.tree_util.tree_leaves(state)])
  np.testing.assert_array_equal(leaves(run(1)), leaves(run(1)))
  assert not np.allclose(leaves(run(1)), leaves(run(2)))


@pytest.mark.parametrize("impl", ["im2col", "s2d"])
def test_a_padded_masked_batch_steps_like_the_unpadded_one(impl):
  # The epoch pads its last partial batch to the batch size; the mask must make that step the
  # same as a step on the real rows alone: loss mean, gradients, BatchNorm statistics, metrics.
  rngs = nnx.Rngs(params=0)
  stack = [
    layers.Conv(1, 4, rngs=rngs),
    layers.BatchNorm(4, rngs=rngs),
    layers.Flatten(),
    layers.Dense(26 * 26 * 4, 10, rngs=rngs),
  ]
  model = models.Classifier("conv_bn", stack, impl=impl)
  model.train()
  graphdef, params, model_state = nnx.split(model, nnx.Param, ...)
  tx = optax.sgd(0.1)  # Plain SGD: params after the step are the gradients, well conditioned.
  images, labels = make_digits(12, seed=3)
  images, labels = jnp.asarray(images[..., None]), jnp.asarray(labels.astype(np.int32))
  padded_images = jnp.concatenate([images, jnp.full((4, 28, 28, 1), 255, jnp.uint8)])
  padded_labels = jnp.concatenate([labels, jnp.zeros(4, jnp.int32)])
  mask = jnp.arange(16) < 12
  carry = (steps.TrainState(params, model_state, tx.init(params)), steps.zero_metrics())
  plain, plain_metrics = steps.train_step(graphdef, tx, carry, (images, labels, None))
  masked, masked_metrics = steps.train_step(
    graphdef, tx, carry, (padded_images, padded_labels, mask)
  )
  # The parameters after one SGD step: the step (the gradients) equal to 1e-4 of its size. The
  # spread measured: <= 4.5e-7 (jax 0.10, AMD), 2.4e-6 (the batch-minor layout since removed, jax
  # 0.7.2). Under Adam a near-zero gradient's normalised update differed by 6.9e-4 of the step.
  for got, want, before in zip(*map(jax.tree.leaves, (masked.params, plain.params, params))):
    step = np.abs(np.asarray(want) - np.asarray(before)).max()
    assert np.abs(np.asarray(got) - np.asarray(want)).max() <= 1e-4 * step
  for got, want in zip(jax.tree.leaves(masked.model_state), jax.tree.leaves(plain.model_state)):
    np.testing.assert_allclose(got, want, rtol=2e-5, atol=1e-6)  # BatchNorm statistics.
  assert int(masked_metrics["count"]) == 12
  assert int(masked_metrics["correct"]) == int(plain_metrics["correct"])
  np.testing.assert_allclose(masked_metrics["loss_sum"], plain_metrics["loss_sum"], rtol=1e-5)
  # Without the mask the padding would move the BatchNorm statistics.
  unmasked, _ = steps.train_step(graphdef, tx, carry, (padded_images, padded_labels, None))
  assert not np.allclose(
    jax.tree.leaves(unmasked.model_state)[0], jax.tree.leaves(plain.model_state)[0]
  )
