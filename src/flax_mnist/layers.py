"""Keras-default layers as flax.nnx modules and the layouts they run in (kernels: ``kernels``).

Layers follow Keras's defaults, as the notebook used them: Glorot-uniform kernels, zero biases,
valid 3x3 convolutions with ReLU, 2x2 max-pooling, BatchNorm with momentum 0.99 and epsilon
1e-3. Each is called as ``layer(x)`` (BatchNorm: ``layer(x, mask)``) on NHWC activations, or
(N, F) after Flatten.

A ``Layout`` is how a stack of layers computes, injected once (``Classifier`` sets it on every
layer as the static ``layout`` attribute) rather than branched on per layer. All give the same
function (tested); they differ in speed:

- ``lax``: NHWC, XLA's convolution (fastest on GPU and TPU).
- ``im2col``: NHWC, each convolution one matmul over stacked shifted slices, because XLA:CPU's
  convolutions inside a compiled training loop are 5-10x slower.
- ``s2d``: ``im2col``, except that each Conv followed by a MaxPool runs with it as one block
  (``Layout.fused_conv_pools``, ``kernels.conv_pool``): one matmul per pooled output over its
  space-to-depth patch, the pool a max over the window's outputs on the channel axis, bias and
  ReLU after it (fastest on CPU for the pooled models); and each Conv without a pool after it
  whose outputs tile into 2x2 blocks runs as one matmul into those blocks
  (``kernels.blocked_conv``): a Conv after it reads them as they are, a Dense after Flatten
  through its kernel rows put in block order, any other layer after ``unblock`` (the cnn).

Dropout masks are drawn the same way in every layout. "auto" is no layout: the config resolves
it per platform before a model is built.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from flax_mnist import kernels
from flax_mnist.kernels import im2col_conv, lax_conv, max_pool

_glorot_uniform = nnx.initializers.glorot_uniform()
_zeros = nnx.initializers.zeros_init()

Activation = Callable[[jax.Array], jax.Array]


@dataclasses.dataclass(frozen=True)
class Layout:
  """NHWC activations ((N, F) after Flatten), convolutions by ``convolve``: the layers' default.

  The strategy a layer delegates its layout-dependent work to. Frozen and hashable: a layer
  holds it as a static attribute (part of the graph definition, not of the state).
  """

  name: str
  convolve: Callable[[jax.Array, jax.Array], jax.Array] = lax_conv
  # Whether a Conv and the MaxPool right after it run as one block (``fused_conv_pools``).
  fuses_conv_pool: bool = False
  # Whether a Conv not followed by a MaxPool runs on and into space-to-depth blocks
  # (``blocks_conv``).
  blocks_convs: bool = False
  # Mixed precision: activations and matmul operands in this dtype (e.g. bfloat16); params stay
  # float32, BatchNorm computes in float32, logits leave in float32. None: the inputs' (float32).
  dtype: jnp.dtype | None = None

  def cast(self, *arrays: jax.Array) -> tuple[jax.Array, ...]:
    """``arrays`` in the compute dtype (unchanged without one: the float32 path is untouched)."""
    return arrays if self.dtype is None else tuple(array.astype(self.dtype) for array in arrays)

  def enter(self, array: jax.Array) -> jax.Array:
    """An array in this layout's compute dtype."""
    return self.cast(array)[0]

  def leave(self, array: jax.Array) -> jax.Array:
    """An array back in float32: the inverse of ``enter``."""
    return array if self.dtype is None else array.astype(jnp.float32)

  def conv(self, images: jax.Array, kernel: jax.Array, bias: jax.Array) -> jax.Array:
    """Valid, stride-1 convolution plus bias (HWIO kernel)."""
    images, kernel, bias = self.cast(images, kernel, bias)
    return self.convolve(images, kernel) + bias

  def fused_conv_pools(self, layers: Sequence[nnx.Module]) -> tuple[int, ...]:
    """The indices of the Convs of ``layers`` that this layout computes together with the
    MaxPool right after them (``Conv.pooled``; the MaxPool is then skipped): none unless the
    layout fuses. The Conv's activation must commute with the max: ReLU or None."""
    if not self.fuses_conv_pool:
      return ()
    pairs = enumerate(zip(layers, layers[1:]))
    return tuple(
      index
      for index, (layer, after) in pairs
      if type(layer) is Conv and type(after) is MaxPool and layer.activation in (nnx.relu, None)
    )

  def conv_pool(
    self,
    images: jax.Array,
    kernel: jax.Array,
    bias: jax.Array,
    window: int,
    activation: Activation | None,
  ) -> jax.Array:
    """``max_pool(activation(conv(images, kernel, bias)), window)``: a Conv and a MaxPool, as
    one s2d block (``kernels.conv_pool``, NHWC) where the layout fuses them."""
    if self.fuses_conv_pool:
      images, kernel, bias = self.cast(images, kernel, bias)
      return kernels.conv_pool(images, kernel, bias, window, activation)
    outputs = self.conv(images, kernel, bias)
    return max_pool(outputs if activation is None else activation(outputs), window)

  def blocks_conv(self, layer: nnx.Module, shape: tuple[int, ...], blocked: bool) -> bool:
    """Whether ``layer``, given activations of ``shape`` (in ``BLOCK`` x ``BLOCK`` blocks if
    ``blocked``), can run as a blocked convolution (``Conv.blocked``): a Conv with ReLU or no
    activation whose outputs tile into blocks. (A Conv fused with its pool is the caller's to
    leave out: ``fused_conv_pools``.)"""
    if not self.blocks_convs or type(layer) is not Conv or layer.activation not in (nnx.relu, None):
      return False
    scale = BLOCK if blocked else 1
    kernel_size = layer.kernel.shape[0]
    return kernels.blocks_fit(shape[1] * scale, shape[2] * scale, kernel_size, BLOCK)

  def conv_blocks(
    self, inputs: jax.Array, kernel: jax.Array, bias: jax.Array, *, blocked: bool
  ) -> jax.Array:
    """``conv(inputs, kernel, bias)`` in ``BLOCK`` x ``BLOCK`` space-to-depth blocks, from NHWC
    ``inputs`` or (``blocked``) from blocks (``kernels.blocked_conv``)."""
    inputs, kernel, bias = self.cast(inputs, kernel, bias)
    outputs = kernels.blocked_conv(inputs, kernel, BLOCK, blocked=blocked)
    return outputs + jnp.tile(bias, BLOCK * BLOCK)

  def unblock(self, blocks: jax.Array) -> jax.Array:
    """NHWC activations from ``BLOCK`` x ``BLOCK`` blocks."""
    return kernels.depth_to_space(blocks, BLOCK)

  def dense_of_blocks(self, blocks: jax.Array, kernel: jax.Array, bias: jax.Array) -> jax.Array:
    """``dense(flatten(unblock(blocks)), kernel, bias)`` without moving the activations: the
    kernel's rows are put in the blocks' (row, column, sub-row, sub-column, channel) order
    instead (a transpose of the kernel, not of every batch's activations)."""
    n, rows, columns, depth = blocks.shape
    if kernel.shape[0] != rows * columns * depth:  # The wrong Dense: the NHWC path's own error.
      return self.dense(self.flatten(self.unblock(blocks)), kernel, bias)
    features = depth // (BLOCK * BLOCK)
    kernel = kernel.reshape(rows, BLOCK, columns, BLOCK, features, -1)
    kernel = kernel.transpose(0, 2, 1, 3, 4, 5).reshape(rows * columns * depth, -1)
    return self.dense(blocks.reshape(n, -1), kernel, bias)

  def dense(self, inputs: jax.Array, kernel: jax.Array, bias: jax.Array) -> jax.Array:
    """``inputs @ kernel + bias``, as ``nnx.Linear`` computes it."""
    inputs, kernel, bias = self.cast(inputs, kernel, bias)
    outputs = jax.lax.dot_general(inputs, kernel, (((inputs.ndim - 1,), (0,)), ((), ())))
    return outputs + jnp.reshape(bias, (1,) * (outputs.ndim - 1) + (-1,))

  def flatten(self, inputs: jax.Array) -> jax.Array:
    """(N, H, W, C) to (N, H*W*C) in row-major (H, W, C) order."""
    return inputs.reshape(inputs.shape[0], -1)


# The block side of the s2d layout's blocked convolutions (``Layout.blocks_conv``).
BLOCK = 2

LAYOUTS: dict[str, Layout] = {
  "lax": Layout("lax", lax_conv),
  "im2col": Layout("im2col", im2col_conv),
  "s2d": Layout("s2d", im2col_conv, fuses_conv_pool=True, blocks_convs=True),
}
IMPLS = tuple(LAYOUTS)
NHWC = LAYOUTS["lax"]


COMPUTE_DTYPES = ("float32", "bfloat16")


def get_layout(impl: str, compute_dtype: str = "float32") -> Layout:
  """The layout named ``impl``, one of ``IMPLS``, computing in ``compute_dtype`` (one of
  ``COMPUTE_DTYPES``); a ValueError names the valid ones."""
  if impl not in LAYOUTS:
    hint = ' ("auto" is resolved per platform by the config first)' if impl == "auto" else ""
    raise ValueError(f"impl {impl!r}: unknown, expected one of {', '.join(IMPLS)}{hint}")
  if compute_dtype not in COMPUTE_DTYPES:
    raise ValueError(
      f"compute_dtype {compute_dtype!r}: unknown, expected one of {', '.join(COMPUTE_DTYPES)}"
    )
  if compute_dtype == "float32":
    return LAYOUTS[impl]
  return dataclasses.replace(LAYOUTS[impl], dtype=jnp.dtype(compute_dtype))


def _activated(outputs: jax.Array, activation: Activation | None) -> jax.Array:
  """``activation(outputs)``, or ``outputs`` for a layer without one."""
  return outputs if activation is None else activation(outputs)


class Conv(nnx.Module):
  """Keras ``Conv2D(features, kernel_size, activation)``: valid padding, stride 1."""

  keras_name = "conv2d"
  layout: Layout = NHWC

  def __init__(
    self,
    in_features: int,
    out_features: int,
    kernel_size: int = 3,
    *,
    activation: Activation | None = nnx.relu,
    rngs: nnx.Rngs,
  ):
    shape = (kernel_size, kernel_size, in_features, out_features)
    self.kernel = nnx.Param(_glorot_uniform(rngs.params(), shape))
    self.bias = nnx.Param(_zeros(rngs.params(), (out_features,)))
    self.activation = activation

  def __call__(self, images: jax.Array) -> jax.Array:
    outputs = self.layout.conv(images, self.kernel[...], self.bias[...])
    return _activated(outputs, self.activation)

  def blocked(self, inputs: jax.Array, *, blocked: bool) -> jax.Array:
    """``self(inputs)`` in the layout's space-to-depth blocks (``Layout.conv_blocks``)."""
    outputs = self.layout.conv_blocks(inputs, self.kernel[...], self.bias[...], blocked=blocked)
    return _activated(outputs, self.activation)

  def pooled(self, images: jax.Array, window: int) -> jax.Array:
    """``MaxPool(window)(self(images))``, fused into one block where the layout fuses them."""
    kernel, bias = self.kernel[...], self.bias[...]
    return self.layout.conv_pool(images, kernel, bias, window, self.activation)


class Dense(nnx.Module):
  """Keras ``Dense(features, activation)`` with Glorot-uniform kernel and zero bias.

  The parameters live in an ``nnx.Linear`` (``linear/kernel``, ``linear/bias``), the paths
  that checkpoints hold.
  """

  keras_name = "dense"
  layout: Layout = NHWC

  def __init__(
    self,
    in_features: int,
    out_features: int,
    *,
    activation: Activation | None = None,
    rngs: nnx.Rngs,
  ):
    self.linear = nnx.Linear(
      in_features, out_features, kernel_init=_glorot_uniform, bias_init=_zeros, rngs=rngs
    )
    self.activation = activation

  def __call__(self, inputs: jax.Array) -> jax.Array:
    outputs = self.layout.dense(inputs, self.linear.kernel[...], self.linear.bias[...])
    return _activated(outputs, self.activation)

  def of_blocks(self, blocks: jax.Array) -> jax.Array:
    """``self(flatten(unblock(blocks)))`` (``Layout.dense_of_blocks``)."""
    kernel, bias = self.linear.kernel[...], self.linear.bias[...]
    outputs = self.layout.dense_of_blocks(blocks, kernel, bias)
    return _activated(outputs, self.activation)


class MaxPool(nnx.Module):
  """Keras ``MaxPooling2D(2)``: non-overlapping windows, a trailing odd row/column dropped."""

  keras_name = "max_pooling2d"
  layout: Layout = NHWC

  def __init__(self, window: int = 2):
    self.window = window

  def __call__(self, images: jax.Array) -> jax.Array:
    return max_pool(images, self.window)


class Flatten(nnx.Module):
  """Keras ``Flatten``: (N, H, W, C) to (N, H*W*C) in row-major (H, W, C) order."""

  keras_name = "flatten"
  layout: Layout = NHWC

  def __call__(self, inputs: jax.Array) -> jax.Array:
    return self.layout.flatten(inputs)


class Dropout(nnx.Dropout):
  """Keras ``Dropout(rate)``; active in train mode only, masks from the model's dropout stream.

  A mask element is kept when a 16-bit random integer is below round(keep * 2**16), so the keep
  probability is within 2**-17 of 1 - rate (kept values are scaled by the exact one): half the
  random bits of a float draw, which is most of dropout's cost on CPU. Every layout draws the
  same mask, so a seed trains the same on any.
  """

  keras_name = "dropout"
  layout: Layout = NHWC

  def __call__(self, inputs: jax.Array) -> jax.Array:
    if self.rate == 0.0 or self.deterministic:
      return inputs
    threshold = round((1.0 - self.rate) * 2**16)
    keep = threshold / 2**16
    size = math.prod(inputs.shape)
    words = jax.random.bits(self.rngs(), ((size + 1) // 2,), jnp.uint32)
    mask = jnp.concatenate([words >> 16, words & 0xFFFF])[:size].reshape(inputs.shape) < threshold
    return jax.lax.select(mask, inputs / keep, jnp.zeros_like(inputs))


class BatchNorm(nnx.BatchNorm):
  """Keras ``BatchNormalization()``: momentum 0.99, epsilon 1e-3, over the channel axis
  (``nnx.BatchNorm``'s own call, with a mask of the padded rows)."""

  keras_name = "batch_normalization"
  layout: Layout = NHWC

  def __init__(self, num_features: int, *, rngs: nnx.Rngs):
    super().__init__(num_features, momentum=0.99, epsilon=1e-3, rngs=rngs)

  def __call__(self, inputs: jax.Array, mask: jax.Array | None = None) -> jax.Array:
    """Normalises ``inputs``; ``mask`` (one bool per example) leaves padding out of the batch
    statistics in train mode. Low-precision inputs are normalised in float32 (the statistics
    of a batch in bfloat16 lose most of their digits) and returned in their dtype."""
    if inputs.dtype != jnp.float32:
      return self(inputs.astype(jnp.float32), mask).astype(inputs.dtype)
    if mask is not None:
      mask = mask.reshape((-1,) + (1,) * (inputs.ndim - 1))
    return super().__call__(inputs, mask=mask)
