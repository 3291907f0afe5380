"""Tests for flax_mnist.layers: the layouts, which layers the s2d layout fuses, each layer alone
(kernels, the s2d block and the max-pool gradient: test_kernels.py)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from flax_mnist import layers, models


def test_impls_are_the_concrete_layouts():
  assert layers.IMPLS == ("lax", "im2col", "s2d")
  assert all(layers.get_layout(impl).name == impl for impl in layers.IMPLS)


@pytest.mark.parametrize("impl", ["auto", "fft"])
def test_get_layout_refuses_other_names_and_lists_the_valid_ones(impl):
  with pytest.raises(ValueError, match=f"impl '{impl}': unknown, expected one of lax, im2col, s2d"):
    layers.get_layout(impl)


def test_the_s2d_layout_fuses_each_conv_with_the_max_pool_after_it():
  assert models.create_model("cnn_pool_bn", rngs=nnx.Rngs(0), impl="s2d").fused == (0, 4)
  assert models.create_model("cnn_pool", rngs=nnx.Rngs(0), impl="s2d").fused == (0, 2)
  assert models.create_model("cnn", rngs=nnx.Rngs(0), impl="s2d").fused == ()
  assert models.create_model("cnn_pool", rngs=nnx.Rngs(0), impl="im2col").fused == ()
  rngs = nnx.Rngs(0)
  unfused = [layers.Conv(1, 2, activation=jnp.tanh, rngs=rngs), layers.MaxPool()]
  assert models.Classifier("tanh", unfused, impl="s2d").fused == ()
  # Introspection calls the layers one by one: the same shapes as in any layout.
  text = models.summary(models.create_model("cnn_pool", rngs=nnx.Rngs(0), impl="s2d"))
  assert "(None, 26, 26, 8)" in text and "(None, 13, 13, 8)" in text and "(None, 5, 5, 16)" in text


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


@pytest.mark.parametrize("impl", ["im2col", "s2d"])
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
  conv.layout = layers.get_layout("im2col")
  graphdef, state = nnx.split(conv)
  assert hash(graphdef) is not None
  assert {str(path[-1]) for path, _ in nnx.to_flat_state(state)} == {"bias", "kernel"}
  assert nnx.merge(graphdef, state).layout == layers.get_layout("im2col")
