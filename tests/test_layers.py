"""Tests for flax_mnist.layers: kernels, max-pool and its gradient, each layer alone, layouts."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from flax_mnist import layers


def test_impls_are_the_concrete_layouts():
  assert layers.IMPLS == ("lax", "im2col", "batch_minor")
  assert all(layers.get_layout(impl).name == impl for impl in layers.IMPLS)


@pytest.mark.parametrize("impl", ["auto", "fft"])
def test_get_layout_refuses_other_names_and_lists_the_valid_ones(impl):
  with pytest.raises(
    ValueError, match=f"impl '{impl}': unknown, expected one of lax, im2col, batch_minor"
  ):
    layers.get_layout(impl)


def test_im2col_and_batch_minor_convolutions_equal_lax():
  images = jax.random.normal(jax.random.key(1), (5, 13, 13, 8))
  kernel = jax.random.normal(jax.random.key(2), (3, 3, 8, 16))
  want = layers.lax_conv(images, kernel)
  assert want.shape == (5, 11, 11, 16)
  np.testing.assert_allclose(
    np.asarray(layers.im2col_conv(images, kernel)), np.asarray(want), atol=2e-5, rtol=1e-5
  )
  batch_minor = layers.batch_minor_conv(jnp.swapaxes(images, 0, -1), kernel)
  np.testing.assert_allclose(
    np.asarray(jnp.swapaxes(batch_minor, 0, -1)), np.asarray(want), atol=2e-5, rtol=1e-5
  )


def test_max_pool_and_its_gradient_match_reduce_window_and_drop_odd_edges():
  images = jax.random.normal(jax.random.key(3), (2, 11, 11, 4))
  reference = lambda x: jax.lax.reduce_window(
    x, -jnp.inf, jax.lax.max, (1, 2, 2, 1), (1, 2, 2, 1), "VALID"
  )
  pooled = layers.MaxPool()(images)
  assert pooled.shape == (2, 5, 5, 4)
  np.testing.assert_array_equal(np.asarray(pooled), np.asarray(reference(images)))
  weights = jax.random.normal(jax.random.key(4), (2, 5, 5, 4))
  grad = jax.grad(lambda x: jnp.sum(layers.MaxPool()(x) * weights))(images)
  want = jax.grad(lambda x: jnp.sum(reference(x) * weights))(images)
  np.testing.assert_array_equal(np.asarray(grad), np.asarray(want))
  assert np.all(np.asarray(grad)[:, 10, :, :] == 0) and np.all(np.asarray(grad)[:, :, 10, :] == 0)


@pytest.mark.parametrize("rate", [0.2, 0.5])
def test_dropout_keeps_one_minus_rate_and_preserves_the_mean(rate):
  dropout = layers.Dropout(rate, rngs=nnx.Rngs(dropout=jax.random.key(0, impl="rbg")))
  ones = jnp.ones((512, 13, 13, 8))
  outputs = np.asarray(dropout(ones))
  kept = outputs > 0
  standard_error = np.sqrt(rate * (1 - rate) / ones.size)
  assert abs(kept.mean() - (1 - rate)) < 5 * standard_error
  np.testing.assert_allclose(outputs[kept], 1 / (1 - rate), rtol=2e-5)  # Scaled by the exact keep.
  assert abs(outputs.mean() - 1.0) < 5 * standard_error / (1 - rate)
  assert not np.array_equal(kept, np.asarray(dropout(ones)) > 0)  # A fresh mask per call.


def test_each_layer_works_alone_on_nhwc():
  rngs = nnx.Rngs(0)
  images = jax.random.uniform(jax.random.key(5), (6, 9, 9, 2))
  conv = layers.Conv(2, 4, rngs=rngs)
  conv.bias[...] = jnp.arange(4.0) - 2
  want = jax.nn.relu(layers.lax_conv(images, conv.kernel[...]) + conv.bias[...])
  np.testing.assert_array_equal(np.asarray(conv(images)), np.asarray(want))
  assert layers.Conv(2, 4, activation=None, rngs=rngs)(images).min() < 0

  pooled = layers.MaxPool()(conv(images))
  assert pooled.shape == (6, 3, 3, 4)
  flat = layers.Flatten()(pooled)
  np.testing.assert_array_equal(np.asarray(flat), np.asarray(pooled).reshape(6, 36))

  dense = layers.Dense(36, 3, rngs=rngs)
  dense.linear.bias[...] = jnp.ones(3)
  np.testing.assert_array_equal(np.asarray(dense(flat)), np.asarray(dense.linear(flat)))

  dropout = layers.Dropout(0.5, rngs=rngs)
  assert (np.asarray(dropout(flat)) == 0).any()
  dropout.eval()
  np.testing.assert_array_equal(np.asarray(dropout(flat)), np.asarray(flat))

  # BatchNorm: nnx.BatchNorm with Keras's settings, bit for bit, in train and eval mode.
  batch_norm = layers.BatchNorm(4, rngs=rngs)
  stock = nnx.BatchNorm(4, momentum=0.99, epsilon=1e-3, rngs=nnx.Rngs(0))
  features = conv(images)
  for _ in range(2):
    np.testing.assert_array_equal(np.asarray(batch_norm(features)), np.asarray(stock(features)))
  np.testing.assert_array_equal(np.asarray(batch_norm.var[...]), np.asarray(stock.var[...]))
  batch_norm.eval()
  stock.eval()
  np.testing.assert_array_equal(np.asarray(batch_norm(features)), np.asarray(stock(features)))


def test_batchnorm_mask_leaves_padding_out_of_the_statistics():
  features = jax.random.normal(jax.random.key(6), (8, 5, 5, 3)) + 2
  padded = jnp.concatenate([features, jnp.full((4, 5, 5, 3), 100.0)])
  plain, masked = (layers.BatchNorm(3, rngs=nnx.Rngs(0)) for _ in range(2))
  want = plain(features)
  got = masked(padded, mask=jnp.arange(12) < 8)
  np.testing.assert_allclose(np.asarray(got[:8]), np.asarray(want), rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(np.asarray(masked.mean[...]), np.asarray(plain.mean[...]), rtol=1e-6)
  np.testing.assert_allclose(np.asarray(masked.var[...]), np.asarray(plain.var[...]), rtol=1e-5)


@pytest.mark.parametrize("impl", ["im2col", "batch_minor"])
def test_every_layout_computes_each_layer_like_nhwc(impl):
  layout = layers.get_layout(impl)
  images = jax.random.uniform(jax.random.key(7), (6, 10, 10, 2))
  mask = jnp.arange(6) < 5

  def build():
    rngs = nnx.Rngs(params=0, dropout=1)
    return [
      layers.Conv(2, 4, rngs=rngs),
      layers.MaxPool(),
      layers.BatchNorm(4, rngs=rngs),
      layers.Dropout(0.3, rngs=rngs),
      layers.Flatten(),
      layers.Dense(64, 8, rngs=rngs),
      layers.BatchNorm(8, rngs=rngs),
      layers.Dropout(0.3, rngs=rngs),
    ]

  reference, stack = build(), build()
  want, got = images, layout.enter(images)
  for reference_layer, layer in zip(reference, stack, strict=True):
    layer.layout = layout
    if isinstance(layer, layers.BatchNorm):
      want, got = reference_layer(want, mask), layer(got, mask)
    else:
      want, got = reference_layer(want), layer(got)
    np.testing.assert_allclose(
      np.asarray(layout.leave(got)),
      np.asarray(want),
      atol=1e-5,
      rtol=1e-5,
      err_msg=type(layer).__name__,
    )
  for reference_layer, layer in zip(reference, stack, strict=True):  # The same moving statistics.
    if isinstance(layer, layers.BatchNorm):
      np.testing.assert_allclose(
        np.asarray(layer.var[...]), np.asarray(reference_layer.var[...]), rtol=1e-5
      )


def test_the_layout_is_a_static_attribute():
  conv = layers.Conv(1, 2, rngs=nnx.Rngs(0))
  assert conv.layout is layers.NHWC
  conv.layout = layers.get_layout("batch_minor")
  graphdef, state = nnx.split(conv)
  assert hash(graphdef) is not None
  assert {str(path[-1]) for path, _ in nnx.to_flat_state(state)} == {"bias", "kernel"}
  assert nnx.merge(graphdef, state).layout == layers.get_layout("batch_minor")
