"""Drop-ins for flax.nnx's ``Conv`` and ``max_pool`` that train at the family's speed on CPU.

``nn.Conv`` is ``nnx.Conv``: the same arguments, defaults, parameters (``kernel``, ``bias``),
initializers and results (tested against it). It differs in how it computes on CPU, where
XLA's convolution gradients inside a compiled training loop are several times slower than one
matmul: a 2-D convolution without dilation, groups or mask (padding ``VALID``, ``SAME`` or
explicit) runs there as one matmul over the stacked, strided shifted slices of its input
(im2col, ``kernels``), as the family's layers do. On GPU and TPU, and for any other case, it is
``nnx.Conv``'s own call. ``nn.max_pool`` is ``nnx.max_pool`` (flax's ``max_pool``), with
non-overlapping windows taken by a reshape and a max whose gradient stores each window's argmax
(``kernels.max_pool``) instead of ``reduce_window``'s select-and-scatter.

``nn.conv_pool(conv, x, window)`` is ``max_pool(relu(conv(x)), (window, window), (window,
window))`` as the family's s2d block: one matmul per pooled output over its space-to-depth
patch (``kernels.conv_pool``), the fastest layout on CPU for a conv followed by a pool.

``nnx.Linear`` needs no drop-in: it is one ``dot_general``, as the family's Dense. Measured
stock vs drop-in vs family step times: benchmarks/README.md ("Your own layers").
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
from flax import nnx
from flax.nnx.nn import dtypes

from flax_mnist import kernels

# Measured per training step of cnn_pool inside the trainer's compiled epoch, 2-core AMD EPYC
# (benchmarks/results/dropin_cpu_amd_2core.md): stock nnx layers 144.6 ms, drop-ins 27.3 ms,
# drop-ins with conv_pool 12.5 ms (the family's s2d: 12.8 ms).
STOCK_CONV_SLOWDOWN_CPU = "about 5x (11x against nn.conv_pool)"


def _on_cpu() -> bool:
  return jax.default_backend() == "cpu"


def _pairs(value: int | Sequence[int] | None, size: int) -> tuple[int, ...]:
  if value is None:
    return (1,) * size
  return (value,) * size if isinstance(value, int) else tuple(value)


class Conv(nnx.Conv):
  """``nnx.Conv``, computed as one matmul on CPU where it can be (see the module docstring)."""

  def _matmul_padding(self, inputs: jax.Array) -> list[tuple[int, int]] | None:
    """The (low, high) padding of the two spatial axes when the im2col path applies: on CPU,
    for NHWC inputs and a 2-D convolution without dilation, groups, mask or a dtype rule of the
    caller's; None otherwise (``nnx.Conv``'s call then)."""
    ones = (1, 1)
    if not _on_cpu() or inputs.ndim != 4 or len(self.kernel_size) != 2:
      return None
    if getattr(self, "preferred_element_type", None) is not None:
      return None
    own_conv = getattr(self, "conv_general_dilated", jax.lax.conv_general_dilated)
    if own_conv is not jax.lax.conv_general_dilated:
      return None
    if _pairs(self.input_dilation, 2) != ones or _pairs(self.kernel_dilation, 2) != ones:
      return None
    if self.feature_group_count != 1 or self.mask is not None:
      return None
    if getattr(self, "promote_dtype", dtypes.promote_dtype) is not dtypes.promote_dtype:
      return None
    padding = self.padding
    if isinstance(padding, str):
      if padding.upper() not in ("VALID", "SAME"):
        return None
      return jax.lax.padtype_to_pads(
        inputs.shape[1:3], self.kernel_size, _pairs(self.strides, 2), padding.upper()
      )
    if isinstance(padding, int):
      pads = [(padding, padding)] * 2
    else:
      pads = [(p, p) if isinstance(p, int) else tuple(p) for p in padding]
    if len(pads) != 2 or min(min(pair) for pair in pads) < 0:  # (nnx crops for a negative pad.)
      return None
    return pads

  def __call__(self, inputs: jax.Array, out_sharding=None) -> jax.Array:
    pads = None if out_sharding is not None else self._matmul_padding(inputs)
    if pads is None:
      return super().__call__(inputs, out_sharding) if out_sharding else super().__call__(inputs)
    kernel = self.kernel[...]
    bias = self.bias[...] if self.bias is not None else None
    inputs, kernel, bias = dtypes.promote_dtype((inputs, kernel, bias), dtype=self.dtype)
    if any(pads[0]) or any(pads[1]):
      inputs = jnp.pad(inputs, ((0, 0), *pads, (0, 0)))
    outputs = strided_im2col_conv(inputs, kernel, _pairs(self.strides, 2), self.precision)
    return outputs if bias is None else outputs + bias


def strided_im2col_conv(
  images: jax.Array, kernel: jax.Array, strides: tuple[int, int], precision=None
) -> jax.Array:
  """Valid convolution with ``strides`` as one matmul over the stacked strided slices (NHWC,
  HWIO): ``kernels.im2col_conv`` for stride 1."""
  kernel_h, kernel_w, in_features, out_features = kernel.shape
  stride_h, stride_w = strides
  if strides == (1, 1):
    patches = kernels.stacked_slices(images, kernel_h, kernel_w)
  else:
    out_h = (images.shape[1] - kernel_h) // stride_h + 1
    out_w = (images.shape[2] - kernel_w) // stride_w + 1
    slices = [
      images[
        :,
        i : i + (out_h - 1) * stride_h + 1 : stride_h,
        j : j + (out_w - 1) * stride_w + 1 : stride_w,
      ]
      for i in range(kernel_h)
      for j in range(kernel_w)
    ]
    patches = jnp.concatenate(slices, axis=-1)
  flat_kernel = kernel.reshape(kernel_h * kernel_w * in_features, out_features)
  return jnp.dot(patches, flat_kernel, precision=precision)


def max_pool(
  inputs: jax.Array,
  window_shape: Sequence[int],
  strides: Sequence[int] | None = None,
  padding: str | Sequence[tuple[int, int]] = "VALID",
) -> jax.Array:
  """``nnx.max_pool`` (flax's ``max_pool``: the same arguments and defaults; ``strides`` None
  is 1). Non-overlapping square windows (``strides == window_shape``, ``VALID``) on NHWC inputs
  take ``kernels.max_pool``: its gradient goes to each window's first maximum, as
  ``reduce_window``'s, in one elementwise pass."""
  window = tuple(window_shape)
  square = len(window) == 2 and window[0] == window[1] and 1 <= window[0] <= 11
  if square and inputs.ndim == 4 and tuple(strides or ()) == window and padding == "VALID":
    return kernels.max_pool(inputs, window[0])
  return nnx.max_pool(inputs, window, strides, padding)


def conv_pool(
  conv: Conv | nnx.Conv,
  inputs: jax.Array,
  window: int = 2,
  activation: Callable[[jax.Array], jax.Array] | None = nnx.relu,
) -> jax.Array:
  """``max_pool(activation(conv(inputs)), (window, window), (window, window))``; on CPU, for a
  square stride-1 ``Conv`` without dilation, groups or mask, as the family's s2d block
  (``kernels.conv_pool``: one matmul per pooled output). ``activation``: ReLU or None (it must
  commute with the max)."""
  fusable = isinstance(conv, Conv) and activation in (nnx.relu, None)
  pads = conv._matmul_padding(inputs) if fusable else None
  square = conv.kernel_size[0] == conv.kernel_size[-1]
  if pads is None or not square or _pairs(conv.strides, 2) != (1, 1) or conv.bias is None:
    outputs = conv(inputs)
    outputs = outputs if activation is None else activation(outputs)
    return max_pool(outputs, (window, window), (window, window))
  kernel, bias = conv.kernel[...], conv.bias[...]
  inputs, kernel, bias = dtypes.promote_dtype((inputs, kernel, bias), dtype=conv.dtype)
  if any(pads[0]) or any(pads[1]):
    inputs = jnp.pad(inputs, ((0, 0), *pads, (0, 0)))
  return kernels.conv_pool(inputs, kernel, bias, window, activation)


def stock_convs(model: nnx.Module) -> list[str]:
  """The paths of ``model``'s stock ``nnx.Conv`` layers (not drop-ins): slow to train on CPU."""
  return [
    "/".join(map(str, path)) or "(the model)"
    for path, node in nnx.iter_graph(model)
    if isinstance(node, nnx.Conv) and not isinstance(node, Conv)
  ]
