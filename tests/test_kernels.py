"""Tests for flax_mnist.kernels: the convolutions, max-pooling and its gradient (to the first
maximum of each window, as lax.reduce_window's), and the fused conv + ReLU + max-pool block of the
s2d layout, alone and in the models."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from flax_mnist import kernels, layers, models


def test_the_im2col_convolution_equals_lax():
  images = jax.random.normal(jax.random.key(1), (5, 13, 13, 8))
  kernel = jax.random.normal(jax.random.key(2), (3, 3, 8, 16))
  want = layers.lax_conv(images, kernel)
  assert want.shape == (5, 11, 11, 16)
  np.testing.assert_allclose(
    np.asarray(layers.im2col_conv(images, kernel)), np.asarray(want), atol=2e-5, rtol=1e-5
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


def _reference_pool(images, window=2):
  """Max-pooling by ``lax.reduce_window``: its gradient goes to each window's first maximum."""
  dims = (1, window, window, 1)
  return jax.lax.reduce_window(images, -jnp.inf, jax.lax.max, dims, dims, "VALID")


def _tied_inputs(kind, shape):
  key = jax.random.key(8)
  if kind == "integers":  # Values 0, 1, 2: most windows hold tied maxima.
    return jax.random.randint(key, shape, 0, 3).astype(jnp.float32)
  if kind == "zeros":  # Every window a 4-way tie.
    return jnp.zeros(shape)
  return jax.nn.relu(jax.random.normal(key, shape))  # ReLU outputs: all-zero windows tie.


@pytest.mark.parametrize("kind", ["integers", "zeros", "relu"])
@pytest.mark.parametrize("impl", ["im2col", "lax"])
def test_max_pool_gradient_goes_to_the_first_maximum_of_each_window(kind, impl):
  # As TensorFlow's and lax.reduce_window's: one element per window, also at tied maxima.
  layout = layers.get_layout(impl)
  pool = layers.MaxPool()
  pool.layout = layout
  images = _tied_inputs(kind, (3, 11, 9, 4))
  weights = jax.random.normal(jax.random.key(9), (3, 5, 4, 4))
  got = jax.grad(lambda x: jnp.sum(layout.leave(pool(layout.enter(x))) * weights))(images)
  want = jax.grad(lambda x: jnp.sum(_reference_pool(x) * weights))(images)
  np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
  # Exactly one input per window receives its output's gradient.
  receivers = (np.asarray(got)[:, :10, :8] != 0).reshape(3, 5, 2, 4, 2, 4).sum(axis=(2, 4))
  np.testing.assert_array_equal(receivers, 1)


def _reference_conv_pool(images, kernel, bias, window=2):
  """Conv (XLA's), bias, ReLU, then a max-pool by lax.reduce_window."""
  return _reference_pool(jax.nn.relu(layers.lax_conv(images, kernel) + bias), window)


def _assert_close_to_the_array(got, want, relative=5e-7):
  """Equal within ``relative`` of the array's largest magnitude (entries near 0 are sums of
  terms that cancel: an elementwise tolerance would test the order of summation)."""
  scale = float(np.abs(np.asarray(want)).max())
  np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=0, atol=relative * scale)


@functools.partial(jax.jit, static_argnums=3)
def _block(images, kernel, bias, window=2):
  return kernels.conv_pool(images, kernel, bias, window, jax.nn.relu)


def _block_and_reference_grads(images, kernel, bias, reference=_reference_conv_pool, window=2):
  shape = jax.eval_shape(functools.partial(reference, window=window), images, kernel, bias).shape
  weights = jax.random.normal(jax.random.key(10), shape)

  def grads(function):
    loss = lambda x, k, b: jnp.sum(function(x, k, b, window) * weights)
    return jax.jit(jax.grad(loss, argnums=(0, 1, 2)))(images, kernel, bias)

  return grads(_block), grads(reference)


@pytest.mark.parametrize(
  "shape, features, kernel_size, window",
  [
    ((4, 28, 28, 1), 8, 3, 2),  # conv1: 28 -> 26 -> 13 (the transposed-patches path).
    ((4, 13, 13, 8), 16, 3, 2),  # conv2: 13 -> 11 -> 5, the odd edge dropped.
    ((3, 12, 11, 2), 3, 3, 2),
    ((2, 9, 10, 1), 4, 2, 2),  # The last block reaches past the image: zero-padded.
    ((2, 14, 13, 3), 5, 3, 3),
  ],
)
def test_s2d_block_equals_conv_relu_max_pool_exactly_ties_included(
  shape, features, kernel_size, window
):
  # Inputs and weights on a coarse grid, so that every sum is exact whatever its order: tied
  # maxima (all-zero windows, repeated patches) tie in both, and the gradients must agree.
  keys = jax.random.split(jax.random.key(11), 3)
  images = jax.random.randint(keys[0], shape, -2, 3).clip(0) / 2  # Mostly zeros, some 0.5, 1.
  kernel_shape = (kernel_size, kernel_size, shape[-1], features)
  kernel = jax.random.randint(keys[1], kernel_shape, -4, 5) / 4
  bias = jax.random.randint(keys[2], (features,), -1, 3) / 4
  got = _block(images, kernel, bias, window)
  want = jax.jit(_reference_conv_pool, static_argnums=3)(images, kernel, bias, window)
  assert got.shape == want.shape
  np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
  grads = _block_and_reference_grads(images, kernel, bias, window=window)
  for got_grad, want_grad in zip(*grads, strict=True):
    _assert_close_to_the_array(got_grad, want_grad)


@pytest.mark.integration
def test_s2d_block_on_real_activations_routes_each_window_to_one_maximum(real_data_dir):
  # conv2 of cnn_pool on real digits: exactly tied maxima can break the other way in the
  # expanded matmul (it sums in another order). Its gradient is then the reference's with the
  # block's choice of maximum, and that choice is a maximum of the reference's outputs.
  from flax_mnist import data

  images = data.normalize_images(jnp.asarray(data.load_mnist(str(real_data_dir)).train.images[:64]))
  model = models.create_model("cnn_pool", rngs=nnx.Rngs(0))
  conv1, conv2 = model.layers[0], model.layers[2]
  bias1, bias2 = jnp.full((8,), 0.05), jnp.full((16,), 0.05)  # Positive: non-zero tied maxima.
  kernel2 = conv2.kernel[...]
  activations = _block(images, conv1.kernel[...], bias1)
  want = jax.jit(_reference_conv_pool)(images, conv1.kernel[...], bias1)
  _assert_close_to_the_array(activations, want)
  first_maxima = jax.jit(lambda x, k: jnp.argmax(kernels.window_outputs(x, k, 2), axis=-2))
  chosen = first_maxima(activations, kernel2)

  def reference_with_the_blocks_choice(x, k, b, window=2):
    outputs = layers.lax_conv(x, k)[:, :10, :10]  # 11 x 11, the odd edge dropped.
    windows = (
      outputs.reshape(-1, 5, 2, 5, 2, 16).transpose(0, 1, 3, 2, 4, 5).reshape(-1, 5, 5, 4, 16)
    )
    return jax.nn.relu(jnp.take_along_axis(windows, chosen[..., None, :], axis=-2)[..., 0, :] + b)

  reference_windows = layers.lax_conv(activations, kernel2)[:, :10, :10].reshape(-1, 5, 2, 5, 2, 16)
  picked = np.asarray(reference_with_the_blocks_choice(activations, kernel2, 0.0))
  largest = np.asarray(reference_windows.max(axis=(2, 4)))
  np.testing.assert_allclose(picked, np.maximum(largest, 0), rtol=0, atol=1e-6 * largest.max())
  got = _block(activations, kernel2, bias2)
  _assert_close_to_the_array(got, jax.jit(_reference_conv_pool)(activations, kernel2, bias2))
  got_grads, want_grads = _block_and_reference_grads(
    activations, kernel2, bias2, reference_with_the_blocks_choice
  )
  for got_grad, want_grad in zip(got_grads, want_grads, strict=True):
    _assert_close_to_the_array(got_grad, want_grad)


@pytest.mark.parametrize("name", ["cnn", "cnn_pool", "cnn_pool_bn"])
def test_the_s2d_layout_trains_the_same_function_as_im2col(name):
  # Train mode (the same dropout masks), on images with all-zero borders as digits have.
  images = jax.random.uniform(jax.random.key(12), (16, 28, 28, 1))
  images = images * (jnp.arange(28) > 3)[:, None, None] * (jnp.arange(28) < 24)[:, None]

  def train_mode_step(impl):
    model = models.create_model(name, rngs=nnx.Rngs(params=0, dropout=1), impl=impl)
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)

    def loss(params):
      model = nnx.merge(graphdef, params, rest, copy=True)
      logits = model(images, mask=jnp.arange(16) < 14)
      return jnp.sum(logits * jnp.arange(10.0)), (logits, nnx.split(model, nnx.Param, ...)[2])

    grads, (logits, new_rest) = jax.jit(jax.grad(loss, has_aux=True))(params)
    return logits, jax.tree.leaves(grads), jax.tree.leaves(new_rest)

  want, got = train_mode_step("im2col"), train_mode_step("s2d")
  np.testing.assert_allclose(np.asarray(got[0]), np.asarray(want[0]), atol=1e-5, rtol=1e-5)
  for got_grad, want_grad in zip(got[1], want[1], strict=True):
    _assert_close_to_the_array(got_grad, want_grad, relative=1e-5)
  for got_leaf, want_leaf in zip(got[2], want[2], strict=True):  # BatchNorm statistics, RNG counts.
    if jnp.issubdtype(want_leaf.dtype, jax.dtypes.prng_key):
      got_leaf, want_leaf = jax.random.key_data(got_leaf), jax.random.key_data(want_leaf)
    np.testing.assert_allclose(np.asarray(got_leaf), np.asarray(want_leaf), atol=1e-5, rtol=1e-5)


def test_space_to_depth_and_back():
  images = jax.random.normal(jax.random.key(20), (2, 6, 4, 3))
  blocks = kernels.space_to_depth(images, 2)
  assert blocks.shape == (2, 3, 2, 12)
  # Block (1, 0) holds pixels (2, 0), (2, 1), (3, 0), (3, 1), channels innermost.
  want = jnp.concatenate([images[0, 2, 0], images[0, 2, 1], images[0, 3, 0], images[0, 3, 1]])
  np.testing.assert_array_equal(np.asarray(blocks[0, 1, 0]), np.asarray(want))
  np.testing.assert_array_equal(np.asarray(kernels.depth_to_space(blocks, 2)), np.asarray(images))


@pytest.mark.parametrize(
  "height, width, kernel_size, fits",
  [(28, 28, 3, True), (26, 26, 3, True), (27, 28, 3, False), (12, 12, 5, True), (3, 3, 3, False)],
)
def test_blocks_fit_where_the_outputs_tile_into_blocks(height, width, kernel_size, fits):
  assert kernels.blocks_fit(height, width, kernel_size, 2) is fits


@pytest.mark.parametrize(
  "shape, features, kernel_size",
  [
    ((3, 28, 28, 1), 8, 3),  # The cnn's conv1 (the transposed-patches path, 4C < O).
    ((3, 26, 26, 8), 16, 3),  # Its conv2.
    ((2, 12, 10, 3), 5, 5),  # Three blocks per patch.
  ],
)
@pytest.mark.parametrize("blocked", [False, True])
def test_the_blocked_convolution_and_its_gradients_equal_lax(shape, features, kernel_size, blocked):
  keys = jax.random.split(jax.random.key(21), 3)
  images = jax.random.normal(keys[0], shape)
  kernel = jax.random.normal(keys[1], (kernel_size, kernel_size, shape[-1], features))
  out_shape = (shape[0], shape[1] - kernel_size + 1, shape[2] - kernel_size + 1, features)
  cotangent = jax.random.normal(keys[2], out_shape)

  def blocked_loss(x, k):
    inputs = kernels.space_to_depth(x, 2) if blocked else x
    outputs = kernels.blocked_conv(inputs, k, 2, blocked=blocked)
    return jnp.vdot(kernels.depth_to_space(outputs, 2), cotangent)

  def reference_loss(x, k):
    return jnp.vdot(layers.lax_conv(x, k), cotangent)

  got = jax.jit(jax.value_and_grad(blocked_loss, argnums=(0, 1)))(images, kernel)
  want = jax.jit(jax.value_and_grad(reference_loss, argnums=(0, 1)))(images, kernel)
  np.testing.assert_allclose(float(got[0]), float(want[0]), rtol=1e-5)
  for got_grad, want_grad in zip(got[1], want[1], strict=True):
    _assert_close_to_the_array(got_grad, want_grad, relative=1e-6)
