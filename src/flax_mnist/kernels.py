"""The layers' kernels: valid 3x3 convolutions three ways, max-pooling, and the fused
convolution + activation + max-pool block of the ``s2d`` layout.

Pure functions of arrays (no modules): ``flax_mnist.layers`` picks among them per layout. Every
kernel equals its reference (XLA's convolution, ``lax.reduce_window`` max and its gradient) up to
the order its sums run in (tested).
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np


def _stacked_slices(images: jax.Array, kernel_h: int, kernel_w: int, axis: int) -> jax.Array:
  """The valid shifted slices of axes 1 and 2, stacked on the channel ``axis`` (-1 for NHWC, 0
  for CHWN) in (row, column, channel) order: the order of a row-major reshape of an HWIO kernel.
  """
  out_h = images.shape[1] - kernel_h + 1
  out_w = images.shape[2] - kernel_w + 1
  slices = [
    images[:, i : i + out_h, j : j + out_w, :] for i in range(kernel_h) for j in range(kernel_w)
  ]
  return jnp.concatenate(slices, axis=axis)


def im2col_conv(images: jax.Array, kernel: jax.Array) -> jax.Array:
  """Valid, stride-1 convolution as one matmul over the stacked shifted slices (NHWC, HWIO)."""
  kernel_h, kernel_w, in_features, out_features = kernel.shape
  patches = _stacked_slices(images, kernel_h, kernel_w, axis=-1)
  return jnp.dot(patches, kernel.reshape(kernel_h * kernel_w * in_features, out_features))


def batch_minor_conv(images: jax.Array, kernel: jax.Array) -> jax.Array:
  """Valid, stride-1 convolution of CHWN images as one matmul (HWIO kernel): CHWN out."""
  kernel_h, kernel_w, in_features, out_features = kernel.shape
  # Slicing leading axes copies whole rows of the batch.
  patches = _stacked_slices(images, kernel_h, kernel_w, axis=0)
  return jnp.tensordot(
    kernel.reshape(kernel_h * kernel_w * in_features, out_features), patches, axes=((0,), (0,))
  )


def lax_conv(images: jax.Array, kernel: jax.Array) -> jax.Array:
  """Valid, stride-1 convolution with XLA's convolution (NHWC, HWIO)."""
  return jax.lax.conv_general_dilated(
    images,
    kernel,
    window_strides=(1, 1),
    padding="VALID",
    dimension_numbers=("NHWC", "HWIO", "NHWC"),
  )


def _pool_windows(images: jax.Array, window: int) -> jax.Array:
  """(A, H, W, Z) to (A, H//w, w, W//w, w, Z): the non-overlapping windows, odd edges dropped."""
  first, height, width, last = images.shape
  out_h, out_w = height // window, width // window
  cropped = images[:, : out_h * window, : out_w * window, :]
  return cropped.reshape(first, out_h, window, out_w, window, last)


_POOL_VARIANT = "index"  # EXPERIMENT
_FIRST_MAX = "argmax"  # EXPERIMENT


def _window_positions(window: int) -> np.ndarray:
  """Each position's row-major index in its window, shaped to broadcast against windows."""
  return np.arange(window * window, dtype=np.int8).reshape(1, 1, window, 1, window, 1)


def max_pool(images: jax.Array, window: int) -> jax.Array:
  """Max over non-overlapping ``window x window`` windows of axes 1 and 2 (valid: odd edges
  dropped). Axes 1 and 2 are height and width in NHWC and in CHWN alike.

  Its gradient is ``lax.reduce_window``'s (and TensorFlow's): each output gradient goes to one
  input, the first maximum of its window in row-major order, also where the window holds tied
  maxima (a 4-way tie of zeros after a ReLU, equal saturated values).
  """
  first, height, width, last = images.shape
  cropped = images[:, : height // window * window, : width // window * window, :]
  if _POOL_VARIANT == "index":
    return _max_pool_index(cropped, window)
  return _max_pool_even(cropped, window)


@functools.partial(jax.custom_vjp, nondiff_argnums=(1,))
def _max_pool_index(images, window):
  return _max_pool_index_forward(images, window)[0]


def _max_pool_index_forward(images, window):
  windows = _pool_windows(images, window)
  slices = [windows[:, :, i, :, j, :] for i in range(window) for j in range(window)]
  if _FIRST_MAX == "index2":
    best = windows.max(axis=(2, 4))
    index = jnp.full(best.shape, window * window - 1, jnp.int8)
    for position in reversed(range(window * window - 1)):
      index = jnp.where(slices[position] == best, jnp.int8(position), index)
    return best, jax.lax.rem(index, jnp.int8(127))
  best, index = _first_max_and_index(jnp.stack(slices, axis=-2))
  best, index = jax.lax.optimization_barrier((best, index))
  return best, index


def _max_pool_index_backward(window, index, pooled_grad):
  expand = lambda array: array[:, :, None, :, None, :]
  hit = _window_positions(window) == expand(index)
  windows_grad = jnp.where(hit, expand(pooled_grad), jnp.zeros((), pooled_grad.dtype))
  first, out_h, _, out_w, _, last = windows_grad.shape
  return (windows_grad.reshape(first, out_h * window, out_w * window, last),)


_max_pool_index.defvjp(_max_pool_index_forward, _max_pool_index_backward)


@functools.partial(jax.custom_vjp, nondiff_argnums=(1,))
def _max_pool_even(images, window):
  return _pool_windows(images, window).max(axis=(2, 4))


def _max_pool_forward(images, window):
  pooled = _max_pool_even(images, window)
  return pooled, (images, pooled)


def _max_pool_backward(window, residuals, pooled_grad):
  images, pooled = residuals
  windows = _pool_windows(images, window)
  expand = lambda array: array[:, :, None, :, None, :]
  equal = windows == expand(pooled)
  if _POOL_VARIANT == "old":
    first_max = equal
  elif _POOL_VARIANT == "e3":
    slices = [windows[:, :, i, :, j, :] for i in range(window) for j in range(window)]
    hits, none_before = [], None
    for x in slices:
      equal_here = x == pooled
      hits.append(equal_here if none_before is None else equal_here & none_before)
      none_before = ~equal_here if none_before is None else none_before & ~equal_here
    stacked = jnp.stack(hits).reshape(window, window, *pooled_grad.shape)
    first_max = jnp.transpose(stacked, (2, 3, 0, 4, 1, 5))
  elif _POOL_VARIANT == "e2":
    slices = [windows[:, :, i, :, j, :] for i in range(window) for j in range(window)]
    outs, none_before = [], None
    for x in slices:
      equal_here = x == pooled
      hit = equal_here if none_before is None else equal_here & none_before
      none_before = ~equal_here if none_before is None else none_before & ~equal_here
      outs.append(jnp.where(hit, pooled_grad, jnp.zeros((), pooled_grad.dtype)))
    stacked = jnp.stack(outs).reshape(window, window, *pooled_grad.shape)
    return (jnp.transpose(stacked, (2, 3, 0, 4, 1, 5)).reshape(images.shape),)
  elif _POOL_VARIANT == "chain":
    slices = [windows[:, :, i, :, j, :] for i in range(window) for j in range(window)]
    best, index = slices[0], jnp.zeros(pooled.shape, jnp.int8)
    for position in range(1, window * window):
      above = slices[position] > best
      best = jnp.where(above, slices[position], best)
      index = jnp.where(above, jnp.int8(position), index)
    first_max = _window_positions(window) == expand(index)
  elif _POOL_VARIANT == "min":
    positions = _window_positions(window)
    first = jnp.min(jnp.where(equal, positions, np.int8(window * window)), axis=(2, 4))
    first_max = positions == expand(first)
  else:  # "stack"
    taken = jnp.zeros(pooled.shape, bool)
    rows = []
    for i in range(window):
      row = []
      for j in range(window):
        hit = equal[:, :, i, :, j, :] & ~taken
        taken = taken | hit
        row.append(hit)
      rows.append(jnp.stack(row, axis=3))
    first_max = jnp.stack(rows, axis=2)
  windows_grad = jnp.where(first_max, expand(pooled_grad), jnp.zeros((), pooled_grad.dtype))
  return (windows_grad.reshape(images.shape),)


_max_pool_even.defvjp(_max_pool_forward, _max_pool_backward)


# The s2d block: a valid k x k convolution, a monotone activation and a w x w max-pool as one
# matmul. Output block (p, q) of the pool reads input rows w*p .. w*p + w + k - 2 (likewise
# columns): a (w + k - 1)^2 patch, gathered by strided slices (a space-to-depth view of the
# input). One matmul with an expanded ((w + k - 1)^2 C, w^2 O) kernel gives all w^2 convolution
# outputs of the window at once, on the channel axis; the pool is a max over those w^2 groups.


@functools.cache
def _expansion(kernel_size: int, window: int) -> np.ndarray:
  """The 0/1 map from a (k, k) kernel to the expanded one: ``T[i, j, a, b, ki, kj]`` is 1 where
  patch position (i, j) meets kernel tap (ki, kj) for the window's sub-position (a, b)."""
  span = window + kernel_size - 1
  expansion = np.zeros((span, span, window, window, kernel_size, kernel_size), np.float32)
  for a in range(window):
    for b in range(window):
      for ki in range(kernel_size):
        for kj in range(kernel_size):
          expansion[a + ki, b + kj, a, b, ki, kj] = 1.0
  return expansion


def expand_kernel(kernel: jax.Array, window: int) -> jax.Array:
  """The (k, k, C, O) kernel as the ((w + k - 1)^2 C, w^2 O) matrix of the s2d block: rows in
  (patch row, patch column, channel) order, columns in (sub-row, sub-column, feature) order.
  A linear map of ``kernel`` (an einsum with a constant), so autodiff gives its gradient."""
  kernel_size, _, in_features, out_features = kernel.shape
  span = window + kernel_size - 1
  expanded = jnp.einsum("ijabkl,klco->ijcabo", _expansion(kernel_size, window), kernel)
  return expanded.reshape(span * span * in_features, window * window * out_features)


def _strided_patches(images: jax.Array, kernel_size: int, window: int) -> jax.Array:
  """(N, H, W, C) to (N, P, Q, (w + k - 1)^2 C): each pooled output's input patch, stacked on
  the channel axis in (row, column, channel) order (P, Q: the pool's output size)."""
  out_h = (images.shape[1] - kernel_size + 1) // window
  out_w = (images.shape[2] - kernel_size + 1) // window
  span = window + kernel_size - 1
  slices = [
    images[:, i : i + window * (out_h - 1) + 1 : window, j : j + window * (out_w - 1) + 1 : window]
    for i in range(span)
    for j in range(span)
  ]
  return jnp.concatenate(slices, axis=-1)


def _first_max_and_index(groups: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Max over axis -2 of (..., S, O) and the index of its first maximum (int8)."""
  if _FIRST_MAX == "argmax":
    return groups.max(axis=-2), jnp.argmax(groups, axis=-2).astype(jnp.int8)
  if _FIRST_MAX == "chainrem":
    best, index = groups[..., 0, :], jnp.zeros(groups.shape[:-2] + groups.shape[-1:], jnp.int8)
    for position in range(1, groups.shape[-2]):
      candidate = groups[..., position, :]
      above = candidate > best
      best = jnp.where(above, candidate, best)
      index = jnp.where(above, jnp.int8(position), index)
    return best, jax.lax.rem(index, jnp.int8(127))
  best, index = groups[..., 0, :], jnp.zeros(groups.shape[:-2] + groups.shape[-1:], jnp.int8)
  for position in range(1, groups.shape[-2]):
    candidate = groups[..., position, :]
    above = candidate > best
    best = jnp.where(above, candidate, best)
    index = jnp.where(above, jnp.int8(position), index)
  return best, index


@functools.partial(jax.custom_vjp, nondiff_argnums=(1,))
def first_max(groups: jax.Array, size: int) -> jax.Array:
  """Max over axis -2 of (..., size, O); its gradient goes to the first maximum alone."""
  if not groups.shape[-2] == size <= 127:
    raise ValueError(f"first_max: {size} positions on axis -2 of {groups.shape}, at most 127")
  return _first_max_and_index(groups)[0]


def _first_max_forward(groups, size):
  best, index = _first_max_and_index(groups)
  # Without the barrier XLA recomputes the compare chain inside the backward pass rather than
  # keep the index, which costs more than storing one int8 per output.
  best, index = jax.lax.optimization_barrier((best, index))
  return best, index


def _first_max_backward(size, index, best_grad):
  hit = index[..., None, :] == jnp.arange(size, dtype=jnp.int8)[:, None]
  return (jnp.where(hit, best_grad[..., None, :], jnp.zeros((), best_grad.dtype)),)


first_max.defvjp(_first_max_forward, _first_max_backward)


def window_outputs(images: jax.Array, kernel: jax.Array, window: int) -> jax.Array:
  """The valid convolution's outputs (no bias) grouped by pooling window, as the s2d block
  computes them: (N, P, Q, w^2, O), the window's outputs in row-major order on axis -2 (P, Q: the
  pool's output size; the odd edge the pool drops is not computed)."""
  kernel_size, _, in_features, out_features = kernel.shape
  expanded = expand_kernel(kernel, window)
  if _TRANSPOSED == "always" or (_TRANSPOSED == "auto" and 4 * in_features < out_features):
    outputs = _window_dot(images, expanded, kernel_size, window)
  else:
    outputs = jnp.dot(_strided_patches(images, kernel_size, window), expanded)
  return outputs.reshape(*outputs.shape[:-1], window * window, out_features)


_TRANSPOSED = "auto"  # EXPERIMENT


def _transposed_patches(images: jax.Array, kernel_size: int, window: int) -> jax.Array:
  """``_strided_patches`` as a ((w + k - 1)^2 C, N P Q) matrix, gathered in that layout."""
  out_h = (images.shape[1] - kernel_size + 1) // window
  out_w = (images.shape[2] - kernel_size + 1) // window
  span = window + kernel_size - 1
  rows = [
    jnp.moveaxis(
      images[
        :, i : i + window * (out_h - 1) + 1 : window, j : j + window * (out_w - 1) + 1 : window
      ],
      -1,
      0,
    ).reshape(images.shape[-1], -1)
    for i in range(span)
    for j in range(span)
  ]
  return jnp.concatenate(rows, axis=0)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _window_dot(images, expanded, kernel_size, window):
  """``_strided_patches(images) @ expanded``, whose kernel gradient reads the output gradient in
  the layout it is produced in: ``patches^T @ g`` with ``patches^T`` gathered as such in the
  forward pass (XLA otherwise writes g transposed for that dot: a slow strided write)."""
  return jnp.dot(_strided_patches(images, kernel_size, window), expanded)


def _window_dot_forward(images, expanded, kernel_size, window):
  outputs = _window_dot(images, expanded, kernel_size, window)
  return outputs, (images, expanded, _transposed_patches(images, kernel_size, window))


def _window_dot_backward(kernel_size, window, residuals, outputs_grad):
  images, expanded, patches_t = residuals
  grad = outputs_grad.reshape(-1, outputs_grad.shape[-1])
  expanded_grad = jnp.dot(patches_t, grad)
  patches_grad = jnp.dot(outputs_grad, expanded.T)
  _, patches_vjp = jax.vjp(lambda x: _strided_patches(x, kernel_size, window), images)
  return patches_vjp(patches_grad)[0], expanded_grad


_window_dot.defvjp(_window_dot_forward, _window_dot_backward)


def conv_pool(
  images: jax.Array,
  kernel: jax.Array,
  bias: jax.Array,
  window: int,
  activation: Callable[[jax.Array], jax.Array] | None,
) -> jax.Array:
  """``max_pool(activation(conv(images, kernel) + bias), window)`` (NHWC, HWIO, valid) as one
  matmul: the s2d block. ``activation`` must be non-decreasing (ReLU) or None: then it commutes
  with the max, and bias and activation go after it, on the pooled outputs.

  Equal to the reference up to summation order; the pool's gradient goes to the first maximum of
  each window in row-major order, as ``max_pool``'s. Where the reference's sums tie exactly, the
  matmul's other summation order may break the tie the other way (one maximum still gets it).
  """
  pooled = first_max(window_outputs(images, kernel, window), window * window) + bias
  return pooled if activation is None else activation(pooled)
