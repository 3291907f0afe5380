"""The layers' kernels: valid 3x3 convolutions two ways, max-pooling, the fused
convolution + activation + max-pool block of the ``s2d`` layout, and its blocked convolution
(outputs in 2x2 space-to-depth blocks) for convolutions without a pool.

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


def stacked_slices(images: jax.Array, kernel_h: int, kernel_w: int) -> jax.Array:
  """The valid shifted slices of NHWC ``images``, stacked on the channel axis in (row, column,
  channel) order: the order of a row-major reshape of an HWIO kernel."""
  out_h = images.shape[1] - kernel_h + 1
  out_w = images.shape[2] - kernel_w + 1
  slices = [
    images[:, i : i + out_h, j : j + out_w, :] for i in range(kernel_h) for j in range(kernel_w)
  ]
  return jnp.concatenate(slices, axis=-1)


def im2col_conv(images: jax.Array, kernel: jax.Array) -> jax.Array:
  """Valid, stride-1 convolution as one matmul over the stacked shifted slices (NHWC, HWIO)."""
  kernel_h, kernel_w, in_features, out_features = kernel.shape
  patches = stacked_slices(images, kernel_h, kernel_w)
  return jnp.dot(patches, kernel.reshape(kernel_h * kernel_w * in_features, out_features))


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
  """(A, H, W, Z) to (A, H/w, w, W/w, w, Z): the windows of an (already cropped) image."""
  first, height, width, last = images.shape
  return images.reshape(first, height // window, window, width // window, window, last)


def _kept_apart(index: jax.Array) -> jax.Array:
  """``index`` (int8, 0..126) unchanged, marked as worth storing rather than recomputing.

  XLA fuses a cheap elementwise producer into each consumer, recomputing it there: a backward
  pass that reads a first-max index would recompute the forward's compare chain from the
  activations (and keep them alive) instead of reading one stored int8. A remainder is an
  "expensive" op to XLA's fusion heuristics, so the index is computed once and stored.
  ``lax.optimization_barrier`` does not do this on CPU: it is removed before fusion.
  """
  return jax.lax.rem(index, jnp.int8(127))


def max_pool(images: jax.Array, window: int) -> jax.Array:
  """Max over non-overlapping ``window x window`` windows of axes 1 and 2 (valid: odd edges
  dropped): height and width of NHWC images.

  Its gradient is ``lax.reduce_window``'s (and TensorFlow's): each output gradient goes to one
  input, the first maximum of its window in row-major order, also where the window holds tied
  maxima (all-zero windows after a ReLU, equal saturated values). The forward pass stores that
  position (int8) and the backward is one elementwise pass over the windows; JAX's own
  reduce-max gradient splits ties and costs 3-4 passes over the input. Windows up to 11 x 11.
  """
  if not 1 <= window <= 11:
    raise ValueError(f"max_pool: window {window}, expected 1 to 11 (an int8 indexes it)")
  _, height, width, _ = images.shape
  return _max_pool(images[:, : height // window * window, : width // window * window], window)


@functools.partial(jax.custom_vjp, nondiff_argnums=(1,))
def _max_pool(images: jax.Array, window: int) -> jax.Array:
  return _pool_windows(images, window).max(axis=(2, 4))


def _max_pool_forward(images, window):
  windows = _pool_windows(images, window)
  pooled = windows.max(axis=(2, 4))
  # The first position equal to the max: from the last position back to the first.
  positions = [(i, j) for i in range(window) for j in range(window)]
  index = jnp.full(pooled.shape, len(positions) - 1, jnp.int8)
  for position in reversed(range(len(positions) - 1)):
    i, j = positions[position]
    index = jnp.where(windows[:, :, i, :, j, :] == pooled, jnp.int8(position), index)
  return pooled, _kept_apart(index)


def _max_pool_backward(window, index, pooled_grad):
  expand = lambda array: array[:, :, None, :, None, :]
  positions = np.arange(window * window, dtype=np.int8).reshape(1, 1, window, 1, window, 1)
  windows_grad = jnp.where(
    positions == expand(index), expand(pooled_grad), jnp.zeros((), pooled_grad.dtype)
  )
  first, out_h, _, out_w, _, last = windows_grad.shape
  return (windows_grad.reshape(first, out_h * window, out_w * window, last),)


_max_pool.defvjp(_max_pool_forward, _max_pool_backward)


# The s2d block: a valid k x k convolution, a non-decreasing activation and a w x w max-pool as
# one matmul. Pooled output (p, q) reads input rows w*p .. w*p + w + k - 2 (likewise columns):
# with the input rearranged into w x w blocks (space-to-depth: (H/w, W/w, w*w*C)), the blocks
# (p .. p + B - 1, q .. q + B - 1), B = ceil((w + k - 1) / w). One matmul of those patches with
# an expanded (B^2 w^2 C, w^2 O) kernel gives all w^2 convolution outputs of the window at once,
# on the channel axis; the pool is a max over those w^2 groups, and bias and activation follow.
# For conv1 of the family (28 x 28 x 1 -> 13 x 13 x 8) that is one (86,528 x 16) @ (16 x 32)
# matmul instead of (346,112 x 9) @ (9 x 8) and a pool; for conv2 (13 x 13 x 8 -> 5 x 5 x 16,
# the odd 11th row and column never computed) (12,800 x 128) @ (128 x 64). The expanded kernel
# holds 9/16 non-zeros: more multiply-adds than the convolution, in far better matmul shapes.


def _blocks_per_patch(kernel_size: int, window: int) -> int:
  return -(-(window + kernel_size - 1) // window)


@functools.cache
def _expansion(kernel_size: int, window: int) -> np.ndarray:
  """The 0/1 map from a (k, k) kernel to the expanded one: ``T[bi, bj, si, sj, a, b, ki, kj]``
  is 1 where sub-position (si, sj) of the patch's block (bi, bj) meets kernel tap (ki, kj) for
  the window's output (a, b)."""
  blocks = _blocks_per_patch(kernel_size, window)
  shape = (blocks, blocks, window, window, window, window, kernel_size, kernel_size)
  expansion = np.zeros(shape, np.float32)
  for bi, bj, si, sj, a, b in np.ndindex(*shape[:6]):
    ki, kj = bi * window + si - a, bj * window + sj - b
    if 0 <= ki < kernel_size and 0 <= kj < kernel_size:
      expansion[bi, bj, si, sj, a, b, ki, kj] = 1.0
  return expansion


def expand_kernel(kernel: jax.Array, window: int, *, transposed: bool = False) -> jax.Array:
  """The (k, k, C, O) kernel as the (B^2 w^2 C, w^2 O) matrix of the s2d block: rows in (block
  row, block column, sub-row, sub-column, channel) order, columns in (output row, output column,
  feature) order. A linear map of ``kernel`` (an einsum with a constant): autodiff gives the
  gradient of the k x k kernel."""
  kernel_size, _, _, out_features = kernel.shape
  expansion = _expansion(kernel_size, window)
  if transposed:  # The same matrix transposed, from its own einsum (no transpose to fold).
    expanded = jnp.einsum("ijstabkl,klco->aboijstc", expansion, kernel)
    return expanded.reshape(window * window * out_features, -1)
  expanded = jnp.einsum("ijstabkl,klco->ijstcabo", expansion, kernel)
  return expanded.reshape(-1, window * window * out_features)


def _pooled_size(images: jax.Array, kernel_size: int, window: int) -> tuple[int, int]:
  """(P, Q): the size of the pooled output."""
  return tuple((size - kernel_size + 1) // window for size in images.shape[1:3])


def _fit(images: jax.Array, kernel_size: int, window: int) -> jax.Array:
  """The rows and columns the patches read: cropped (the pool's odd edge), or zero-padded where
  the last block reaches past the image (it meets zeros of the expanded kernel there)."""
  blocks = _blocks_per_patch(kernel_size, window)
  height, width = (
    window * (size + blocks - 1) for size in _pooled_size(images, kernel_size, window)
  )
  images = images[:, :height, :width]
  pad = ((0, 0), (0, height - images.shape[1]), (0, width - images.shape[2]), (0, 0))
  return jnp.pad(images, pad) if pad[1][1] or pad[2][1] else images


def space_to_depth(images: jax.Array, window: int) -> jax.Array:
  """(N, H, W, C) to (N, H/w, W/w, w^2 C): each w x w block of pixels as one, its channels in
  (sub-row, sub-column, channel) order. H and W must be multiples of ``window``."""
  n, height, width, channels = images.shape
  blocks = images.reshape(n, height // window, window, width // window, window, channels)
  return blocks.transpose(0, 1, 3, 2, 4, 5).reshape(n, height // window, width // window, -1)


def depth_to_space(blocks: jax.Array, window: int) -> jax.Array:
  """The inverse of ``space_to_depth``: (N, P, Q, w^2 C) to (N, w P, w Q, C)."""
  n, rows, columns, depth = blocks.shape
  pixels = blocks.reshape(n, rows, columns, window, window, depth // (window * window))
  return pixels.transpose(0, 1, 3, 2, 4, 5).reshape(n, rows * window, columns * window, -1)


def _block_patches(blocks: jax.Array, count: int, out_h: int, out_w: int) -> jax.Array:
  """(N, out_h, out_w, B^2 w^2 C): the patches of ``out_h x out_w`` block outputs, B^2 shifted
  slices of the space-to-depth ``blocks`` (B = ``count``), in the expanded kernel's row order.
  Their gradient (col2im) is B^2 shifted adds of blocks."""
  slices = [blocks[:, i : i + out_h, j : j + out_w] for i in range(count) for j in range(count)]
  return jnp.concatenate(slices, axis=-1)


def _patches(images: jax.Array, kernel_size: int, window: int) -> jax.Array:
  """(N, P, Q, B^2 w^2 C): each pooled output's input patch, from the space-to-depth blocks, in
  the expanded kernel's row order."""
  out_h, out_w = _pooled_size(images, kernel_size, window)
  blocks = space_to_depth(_fit(images, kernel_size, window), window)
  return _block_patches(blocks, _blocks_per_patch(kernel_size, window), out_h, out_w)


def _transposed_patches(images: jax.Array, kernel_size: int, window: int) -> jax.Array:
  """The patches as a (B^2 w^2 C, N P Q) matrix, gathered in that layout by strided slices of
  the image (measured faster than transposing the blocks for conv1's one channel)."""
  out_h, out_w = _pooled_size(images, kernel_size, window)
  images = _fit(images, kernel_size, window)
  count, channels = _blocks_per_patch(kernel_size, window), images.shape[-1]
  rows, columns = window * (out_h - 1) + 1, window * (out_w - 1) + 1
  slices = [
    images[:, i : i + rows : window, j : j + columns : window]
    for bi, bj, si, sj in np.ndindex(count, count, window, window)
    for i, j in [(bi * window + si, bj * window + sj)]
  ]
  return jnp.concatenate([jnp.moveaxis(s, -1, 0).reshape(channels, -1) for s in slices])


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _patch_matmul(images, expanded, kernel_size, window):
  """``patches(images) @ expanded`` from the patches gathered transposed, ``patches^T``, whose
  kernel gradient ``patches^T @ g`` then reads the output gradient g in the layout it is
  produced in. Left to itself, XLA writes g transposed for that dot (a slow strided write) and
  runs the dot itself at a third of the speed. Used where patches^T is the smaller (4 C < O)."""
  return _patch_matmul_forward(images, expanded, kernel_size, window)[0]


def _patch_matmul_forward(images, expanded, kernel_size, window):
  patches_t = _transposed_patches(images, kernel_size, window)
  out_h, out_w = _pooled_size(images, kernel_size, window)
  outputs = jnp.dot(patches_t.T, expanded).reshape(images.shape[0], out_h, out_w, -1)
  return outputs, (images, expanded, patches_t)


def _patch_matmul_backward(kernel_size, window, residuals, outputs_grad):
  images, expanded, patches_t = residuals
  expanded_grad = jnp.dot(patches_t, outputs_grad.reshape(-1, outputs_grad.shape[-1]))
  _, patches_vjp = jax.vjp(lambda x: _patches(x, kernel_size, window), images)
  return patches_vjp(jnp.dot(outputs_grad, expanded.T))[0], expanded_grad


_patch_matmul.defvjp(_patch_matmul_forward, _patch_matmul_backward)


def window_outputs(images: jax.Array, kernel: jax.Array, window: int) -> jax.Array:
  """The valid convolution's outputs (no bias) grouped by pooling window, as the s2d block
  computes them: (N, P, Q, w^2, O), the window's outputs in row-major order on axis -2 (P, Q: the
  pool's output size; the odd edge the pool drops is not computed)."""
  kernel_size, _, in_features, out_features = kernel.shape
  expanded = expand_kernel(kernel, window).astype(kernel.dtype)  # The 0/1 map is float32.
  if 4 * in_features < out_features:
    outputs = _patch_matmul(images, expanded, kernel_size, window)
  else:
    outputs = jnp.dot(_patches(images, kernel_size, window), expanded)
  return outputs.reshape(*outputs.shape[:-1], window * window, out_features)


@functools.partial(jax.custom_vjp, nondiff_argnums=(1,))
def first_max(groups: jax.Array, size: int) -> jax.Array:
  """Max over axis -2 of (..., size, O) (size <= 127); its gradient goes to the first maximum
  alone."""
  return groups.max(axis=-2)


def _first_max_forward(groups, size):
  # argmax is a reduction: XLA stores its int8 result rather than recompute it in the backward.
  return groups.max(axis=-2), jnp.argmax(groups, axis=-2).astype(jnp.int8)


def _first_max_backward(size, index, best_grad):
  hit = index[..., None, :] == jnp.arange(size, dtype=jnp.int8)[:, None]
  return (jnp.where(hit, best_grad[..., None, :], jnp.zeros((), best_grad.dtype)),)


first_max.defvjp(_first_max_forward, _first_max_backward)


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


def _materialized_transpose(matrix: jax.Array) -> jax.Array:
  """``matrix.T`` written out in memory: a dynamic slice at a zero XLA cannot see is one, so the
  transpose is not folded into the dot that reads it (which would make it a slow "TN" dot)."""
  zero = (matrix[0, 0] * 0).astype(jnp.int32)
  return jax.lax.dynamic_slice(matrix.T, (zero, zero), matrix.T.shape)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _blocks_matmul(blocks: jax.Array, expanded_t: jax.Array, count: int) -> jax.Array:
  """``_block_patches(blocks) @ expanded_t.T`` for (count x count)-block patches, with the
  gradient written out. The expanded kernel is held transposed, (w^2 O, B^2 w^2 C), so that every
  matmul of the gradient is a plain one: the kernel gradient ``g^T @ patches`` (g^T written out),
  the blocks' gradient one ``g @ expanded_t_part`` per block of the patch, added at its shift.
  Autodiff's form (one matmul into a patch gradient, then col2im) ran conv2 of the cnn at 75.6 ms
  per step against 38.8 ms for this, in a scanned loop (AMD EPYC, 2 cores)."""
  return _blocks_matmul_forward(blocks, expanded_t, count)[0]


def _blocks_matmul_forward(blocks, expanded_t, count):
  rows, columns = (size - count + 1 for size in blocks.shape[1:3])
  patches = _block_patches(blocks, count, rows, columns)
  outputs = jax.lax.dot_general(patches, expanded_t, (((3,), (1,)), ((), ())))
  return outputs, (blocks, expanded_t, patches)


def _blocks_matmul_backward(count, residuals, outputs_grad):
  blocks, expanded_t, patches = residuals
  depth = blocks.shape[-1]
  flat = lambda array: array.reshape(-1, array.shape[-1])
  expanded_t_grad = jnp.dot(_materialized_transpose(flat(outputs_grad)), flat(patches))
  blocks_grad = jnp.zeros_like(blocks)
  for part, (i, j) in enumerate(np.ndindex(count, count)):
    part_grad = jnp.dot(outputs_grad, expanded_t[:, part * depth : (part + 1) * depth])
    pad = ((0, 0), (i, count - 1 - i), (j, count - 1 - j), (0, 0))
    blocks_grad = blocks_grad + jnp.pad(part_grad, pad)
  return blocks_grad, expanded_t_grad


_blocks_matmul.defvjp(_blocks_matmul_forward, _blocks_matmul_backward)


def blocked_conv(inputs: jax.Array, kernel: jax.Array, window: int, *, blocked: bool) -> jax.Array:
  """A valid, stride-1 convolution (no bias) with its outputs in space-to-depth blocks
  ``(N, H'/w, W'/w, w^2 O)`` (``space_to_depth`` of the NHWC outputs): one matmul per block
  of w x w outputs, as the s2d block computes a pooling window, without the pool.

  ``inputs``: NHWC images, or (``blocked``) the blocks of the previous blocked convolution, read
  as they are (no depth-to-space between two of them). The output height and width must be
  multiples of ``window`` (``blocks_fit``).
  """
  if not blocked:
    outputs = window_outputs(inputs, kernel, window)
    return outputs.reshape(*outputs.shape[:3], -1)
  kernel_size = kernel.shape[0]
  expanded_t = expand_kernel(kernel, window, transposed=True).astype(kernel.dtype)
  return _blocks_matmul(inputs, expanded_t, _blocks_per_patch(kernel_size, window))


def blocks_fit(height: int, width: int, kernel_size: int, window: int) -> bool:
  """Whether a valid ``kernel_size`` convolution of ``height x width`` inputs has outputs that
  tile into ``window x window`` blocks (``blocked_conv``)."""
  sizes = (height, width)
  return all(size >= kernel_size and (size - kernel_size + 1) % window == 0 for size in sizes)
