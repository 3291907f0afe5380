"""Tests for flax_mnist.models: the family's exact sizes, Keras defaults, conv equivalence, modes."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from flax_mnist import models
from flax_mnist.errors import ConfigError

EXPECTED_PARAMS = {  # From the notebook's Keras model.summary(): (trainable, non-trainable).
    "mlp": (104_938, 0),
    "cnn": (1_185_482, 0),
    "cnn_pool": (57_034, 0),
    "cnn_pool_bn": (57_402, 368),
}


def _images(num=4, seed=0):
  return jax.random.uniform(jax.random.key(seed), (num, 28, 28, 1))


def test_registry_holds_the_family():
  assert models.model_names() == list(EXPECTED_PARAMS)


@pytest.mark.parametrize("name", list(EXPECTED_PARAMS))
def test_parameter_counts_and_output_shape(name):
  model = models.create_model(name, rngs=nnx.Rngs(0))
  assert models.count_params(model) == EXPECTED_PARAMS[name]
  model.eval()
  logits = model(_images(3))
  assert logits.shape == (3, 10) and logits.dtype == jnp.float32


def test_unknown_model_lists_the_names():
  with pytest.raises(ConfigError, match="model 'resnet': unknown, expected one of mlp, cnn, cnn_pool, cnn_pool_bn"):
    models.create_model("resnet", rngs=nnx.Rngs(0))


def test_unknown_impl_is_rejected():
  with pytest.raises(ConfigError, match="impl 'fft': unknown, expected one of auto, lax, im2col, batch_minor"):
    models.create_model("cnn", rngs=nnx.Rngs(0), impl="fft")


def test_im2col_and_batch_minor_convolutions_equal_lax():
  images = jax.random.normal(jax.random.key(1), (5, 13, 13, 8))
  kernel = jax.random.normal(jax.random.key(2), (3, 3, 8, 16))
  want = models.lax_conv(images, kernel)
  assert want.shape == (5, 11, 11, 16)
  np.testing.assert_allclose(np.asarray(models.im2col_conv(images, kernel)), np.asarray(want), atol=2e-5, rtol=1e-5)
  batch_minor = models.batch_minor_conv(jnp.swapaxes(images, 0, -1), kernel)
  np.testing.assert_allclose(np.asarray(jnp.swapaxes(batch_minor, 0, -1)), np.asarray(want), atol=2e-5, rtol=1e-5)


def _train_mode_step(name, impl):
  """Logits, parameter gradients and updated model state of one train-mode call (dropout on)."""
  model = models.create_model(name, rngs=nnx.Rngs(params=0, dropout=1), impl=impl)
  model.train()
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)

  def loss(params):
    model = nnx.merge(graphdef, params, rest, copy=True)
    logits = model(_images(16))
    return jnp.sum(logits * jnp.arange(10.0)), (logits, nnx.split(model, nnx.Param, ...)[2])

  grads, (logits, new_rest) = jax.jit(jax.grad(loss, has_aux=True))(params)
  return logits, jax.tree_util.tree_leaves(grads), jax.tree_util.tree_leaves(new_rest)


@pytest.mark.parametrize("name", ["cnn_pool_bn", "mlp"])
def test_every_impl_trains_the_same_function_with_the_same_dropout_masks(name):
  reference = _train_mode_step(name, "lax")
  for impl in ("im2col", "batch_minor"):
    logits, grads, new_rest = _train_mode_step(name, impl)
    np.testing.assert_allclose(np.asarray(logits), np.asarray(reference[0]), atol=1e-4, rtol=1e-4)
    for got, want in zip(grads, reference[1], strict=True):
      # Entries near 0 are sums of large terms that cancel: scale the tolerance to the array.
      scale = float(jnp.abs(want).max())
      np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=1e-5 * scale, rtol=1e-4)
    for got, want in zip(new_rest, reference[2], strict=True):  # BatchNorm statistics, RNG counts.
      if jnp.issubdtype(want.dtype, jax.dtypes.prng_key):
        got, want = jax.random.key_data(got), jax.random.key_data(want)
      np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("impl", ["im2col", "batch_minor"])
def test_cnn_eval_outputs_equal_across_impls(impl):
  outputs = {}
  for each in ("lax", impl):
    model = models.create_model("cnn", rngs=nnx.Rngs(0), impl=each)
    model.eval()
    outputs[each] = model(_images())
  np.testing.assert_allclose(np.asarray(outputs[impl]), np.asarray(outputs["lax"]), atol=1e-5, rtol=1e-5)


def test_auto_impl_is_im2col_on_cpu():
  assert jax.default_backend() == "cpu"
  assert models.resolve_impl("auto") == "im2col"


def test_max_pool_and_its_gradient_match_reduce_window_and_drop_odd_edges():
  images = jax.random.normal(jax.random.key(3), (2, 11, 11, 4))
  reference = lambda x: jax.lax.reduce_window(x, -jnp.inf, jax.lax.max, (1, 2, 2, 1), (1, 2, 2, 1), "VALID")
  pooled = models.MaxPool()(images)
  assert pooled.shape == (2, 5, 5, 4)
  np.testing.assert_array_equal(np.asarray(pooled), np.asarray(reference(images)))
  weights = jax.random.normal(jax.random.key(4), (2, 5, 5, 4))
  grad = jax.grad(lambda x: jnp.sum(models.MaxPool()(x) * weights))(images)
  want = jax.grad(lambda x: jnp.sum(reference(x) * weights))(images)
  np.testing.assert_array_equal(np.asarray(grad), np.asarray(want))
  assert np.all(np.asarray(grad)[:, 10, :, :] == 0) and np.all(np.asarray(grad)[:, :, 10, :] == 0)


def test_keras_initialisation_and_batchnorm_settings():
  model = models.create_model("cnn_pool_bn", rngs=nnx.Rngs(0))
  conv, dense = model.layers[0], model.layers[9]
  np.testing.assert_array_equal(np.asarray(conv.bias[...]), 0.0)
  np.testing.assert_array_equal(np.asarray(dense.linear.bias[...]), 0.0)
  # Glorot uniform: U(-limit, limit), limit = sqrt(6 / (fan_in + fan_out)).
  limit = np.sqrt(6 / (400 + 128))
  kernel = np.asarray(dense.linear.kernel[...])
  assert np.abs(kernel).max() <= limit and np.abs(kernel).max() > 0.9 * limit
  assert abs(kernel.std() - limit / np.sqrt(3)) < 0.05 * limit
  batch_norm = model.layers[2]
  assert batch_norm.momentum == 0.99 and batch_norm.epsilon == 1e-3


def test_train_mode_drops_out_and_eval_mode_is_deterministic():
  model = models.create_model("mlp", rngs=nnx.Rngs(params=0, dropout=1))
  images = _images()
  model.train()
  first, second = model(images), model(images)
  assert not np.allclose(np.asarray(first), np.asarray(second))  # Fresh dropout masks each call.
  model.eval()
  np.testing.assert_array_equal(np.asarray(model(images)), np.asarray(model(images)))


def test_batchnorm_uses_batch_statistics_in_train_mode_and_moving_ones_in_eval():
  model = models.create_model("cnn_pool_bn", rngs=nnx.Rngs(0))
  before = np.asarray(model.layers[2].mean[...]).copy()
  model.train()
  model(_images(8))
  after = np.asarray(model.layers[2].mean[...])
  assert not np.allclose(before, after)  # Moving mean updated with momentum 0.99.
  model.eval()
  model(_images(8))
  np.testing.assert_array_equal(np.asarray(model.layers[2].mean[...]), after)


def test_summary_lists_layers_shapes_and_totals():
  text = models.summary(models.create_model("cnn", rngs=nnx.Rngs(0)))
  assert 'Model: "cnn"' in text
  assert "conv2d (Conv)" in text and "(None, 26, 26, 8)" in text and "80" in text
  assert "conv2d_1 (Conv)" in text and "(None, 24, 24, 16)" in text and "1,168" in text
  assert "flatten (Flatten)" in text and "(None, 9216)" in text
  assert "dense (Dense)" in text and "1,179,776" in text
  assert "Total params: 1,185,482" in text and "Non-trainable params: 0" in text
  bn_text = models.summary(models.create_model("cnn_pool_bn", rngs=nnx.Rngs(0)))
  assert "Trainable params: 57,402" in bn_text and "Non-trainable params: 368" in bn_text
  assert "batch_normalization_3 (BatchNorm)" in bn_text


@pytest.mark.parametrize("rate", [0.2, 0.5])
def test_dropout_keeps_one_minus_rate_and_preserves_the_mean(rate):
  dropout = models.Dropout(rate, rngs=nnx.Rngs(dropout=jax.random.key(0, impl="rbg")))
  ones = jnp.ones((512, 13, 13, 8))
  outputs = np.asarray(dropout(ones))
  kept = outputs > 0
  standard_error = np.sqrt(rate * (1 - rate) / ones.size)
  assert abs(kept.mean() - (1 - rate)) < 5 * standard_error
  np.testing.assert_allclose(outputs[kept], 1 / (1 - rate), rtol=2e-5)  # Scaled by the exact keep.
  assert abs(outputs.mean() - 1.0) < 5 * standard_error / (1 - rate)
  assert not np.array_equal(kept, np.asarray(dropout(ones)) > 0)  # A fresh mask per call.
