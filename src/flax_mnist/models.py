"""The notebook's architecture family as flax.nnx modules, registered by name.

Every model is a ``Classifier``: a named stack of layers that takes float NHWC images in
[0, 1] and returns logits ``(N, 10)``. Layers follow Keras's defaults, as the notebook used
them: Glorot-uniform kernels, zero biases, valid 3x3 convolutions with ReLU, 2x2 max-pooling,
BatchNorm with momentum 0.99 and epsilon 1e-3.

Every model has numerically equal implementations (tested), picked per platform by
``resolve_impl``: NHWC with XLA's convolution on GPU/TPU; on CPU NHWC with convolutions as
im2col matmuls, because XLA:CPU's convolutions inside a compiled training loop are 5-10x
slower. A third, the whole network on batch-minor (CHWN) activations, is selectable.
Dropout masks are drawn the same way in every layout.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from flax_mnist.errors import ConfigError

IMPLS = ("auto", "lax", "im2col", "batch_minor")
_glorot_uniform = nnx.initializers.glorot_uniform()
_zeros = nnx.initializers.zeros_init()


def resolve_impl(impl: str) -> str:
  """Maps ``"auto"`` to the fastest implementation measured for the default backend.

  ``lax``: NHWC activations, XLA's convolution (GPU, TPU). ``im2col``: NHWC, convolutions as
  one matmul over stacked shifted slices. ``batch_minor``: the whole network on activations
  laid out (channels, height, width, batch), convolutions as im2col matmuls; with the batch
  as the minor dimension, the elementwise, pooling and BatchNorm work vectorises.
  """
  if impl not in IMPLS:
    raise ConfigError(f"impl {impl!r}: unknown, expected one of {', '.join(IMPLS)}")
  if impl == "auto":
    # batch_minor was fastest on an AMD Zen 4 VM (shared/notes); on the Intel VM of the last
    # measurement im2col was as fast for the pooled models and 1.6x faster for cnn.
    return "im2col" if jax.default_backend() == "cpu" else "lax"
  return impl


def _swap_batch_axis(array: jax.Array) -> jax.Array:
  """NHWC <-> CHWN and (N, F) <-> (F, N): swaps the first and last axes (its own inverse)."""
  return jnp.swapaxes(array, 0, -1)


def _stacked_slices(images: jax.Array, kernel_h: int, kernel_w: int, axis: int) -> jax.Array:
  """The valid shifted slices of axes 1 and 2, stacked on the channel ``axis`` (-1 for NHWC, 0
  for CHWN) in (row, column, channel) order: the order of a row-major reshape of an HWIO kernel."""
  out_h = images.shape[1] - kernel_h + 1
  out_w = images.shape[2] - kernel_w + 1
  return jnp.concatenate(
      [images[:, i:i + out_h, j:j + out_w, :] for i in range(kernel_h) for j in range(kernel_w)], axis=axis)


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
  return jnp.tensordot(kernel.reshape(kernel_h * kernel_w * in_features, out_features), patches,
                       axes=((0,), (0,)))


def lax_conv(images: jax.Array, kernel: jax.Array) -> jax.Array:
  """Valid, stride-1 convolution with XLA's convolution (NHWC, HWIO)."""
  return jax.lax.conv_general_dilated(images, kernel, window_strides=(1, 1), padding="VALID",
                                      dimension_numbers=("NHWC", "HWIO", "NHWC"))


class Conv(nnx.Module):
  """Keras ``Conv2D(features, kernel_size, activation)``: valid padding, stride 1."""

  keras_name = "conv2d"

  def __init__(self, in_features: int, out_features: int, kernel_size: int = 3, *,
               activation: Callable[[jax.Array], jax.Array] | None = nnx.relu, rngs: nnx.Rngs):
    self.kernel = nnx.Param(_glorot_uniform(rngs.params(), (kernel_size, kernel_size, in_features, out_features)))
    self.bias = nnx.Param(_zeros(rngs.params(), (out_features,)))
    self.activation = activation

  def forward(self, images: jax.Array, impl: str) -> jax.Array:
    """The layer on activations in the layout of ``impl`` (NHWC, or CHWN for batch_minor)."""
    if impl == "batch_minor":
      outputs = batch_minor_conv(images, self.kernel[...]) + self.bias[...][:, None, None, None]
    else:
      conv = im2col_conv if impl == "im2col" else lax_conv
      outputs = conv(images, self.kernel[...]) + self.bias[...]
    return outputs if self.activation is None else self.activation(outputs)

  def __call__(self, images: jax.Array) -> jax.Array:
    return self.forward(images, "lax")


class Dense(nnx.Module):
  """Keras ``Dense(features, activation)`` with Glorot-uniform kernel and zero bias."""

  keras_name = "dense"

  def __init__(self, in_features: int, out_features: int, *,
               activation: Callable[[jax.Array], jax.Array] | None = None, rngs: nnx.Rngs):
    self.linear = nnx.Linear(in_features, out_features, kernel_init=_glorot_uniform,
                             bias_init=_zeros, rngs=rngs)
    self.activation = activation

  def forward(self, inputs: jax.Array, impl: str) -> jax.Array:
    """(N, F) inputs, or (F, N) for batch_minor."""
    if impl == "batch_minor":
      outputs = (jnp.tensordot(self.linear.kernel[...], inputs, axes=((0,), (0,)))
                 + self.linear.bias[...][:, None])
    else:
      outputs = self.linear(inputs)
    return outputs if self.activation is None else self.activation(outputs)

  def __call__(self, inputs: jax.Array) -> jax.Array:
    return self.forward(inputs, "lax")


def _pool_windows(images: jax.Array, window: int) -> jax.Array:
  """(A, H, W, Z) to (A, H//w, w, W//w, w, Z): the non-overlapping windows, odd edges dropped."""
  first, height, width, last = images.shape
  out_h, out_w = height // window, width // window
  return images[:, :out_h * window, :out_w * window, :].reshape(first, out_h, window, out_w, window, last)


@functools.partial(jax.custom_vjp, nondiff_argnums=(1,))
def max_pool(images: jax.Array, window: int) -> jax.Array:
  """Max over non-overlapping ``window x window`` windows of axes 1 and 2 (valid: odd edges dropped).

  Its gradient is one elementwise pass that routes each output gradient to the input(s) equal
  to the window's max; JAX's reduce-max gradient (it splits ties) costs 3-4 passes over the
  input. The two differ only where a window holds tied maxima that are not zero after a ReLU.
  """
  return _pool_windows(images, window).max(axis=(2, 4))


def _max_pool_forward(images, window):
  pooled = max_pool(images, window)
  return pooled, (images, pooled)


def _max_pool_backward(window, residuals, pooled_grad):
  images, pooled = residuals
  windows = _pool_windows(images, window)
  expand = lambda array: array[:, :, None, :, None, :]
  windows_grad = jnp.where(windows == expand(pooled), expand(pooled_grad), 0.0).reshape(
      images.shape[0], windows.shape[1] * window, windows.shape[3] * window, images.shape[3])
  pad = ((0, 0), (0, images.shape[1] - windows_grad.shape[1]), (0, images.shape[2] - windows_grad.shape[2]), (0, 0))
  return (jnp.pad(windows_grad, pad),)


max_pool.defvjp(_max_pool_forward, _max_pool_backward)


class MaxPool(nnx.Module):
  """Keras ``MaxPooling2D(2)``: non-overlapping windows, a trailing odd row/column dropped."""

  keras_name = "max_pooling2d"

  def __init__(self, window: int = 2):
    self.window = window

  def forward(self, images: jax.Array, impl: str) -> jax.Array:
    """NHWC images, or CHWN for batch_minor (height and width are axes 1 and 2 in both)."""
    del impl
    return max_pool(images, self.window)

  def __call__(self, images: jax.Array) -> jax.Array:
    return self.forward(images, "lax")


class Flatten(nnx.Module):
  """Keras ``Flatten``: (N, H, W, C) to (N, H*W*C) in row-major (H, W, C) order."""

  keras_name = "flatten"

  def forward(self, inputs: jax.Array, impl: str) -> jax.Array:
    if impl == "batch_minor":
      if inputs.ndim == 2:
        return inputs
      # The same (H, W, C) feature order as NHWC, so that weights mean the same in every impl.
      return jnp.transpose(inputs, (1, 2, 0, 3)).reshape(-1, inputs.shape[-1])
    return inputs.reshape(inputs.shape[0], -1)

  def __call__(self, inputs: jax.Array) -> jax.Array:
    return self.forward(inputs, "lax")


class Dropout(nnx.Dropout):
  """Keras ``Dropout(rate)``; active in train mode only, masks from the model's dropout stream.

  A mask element is kept when a 16-bit random integer is below round(keep * 2**16), so the keep
  probability is within 2**-17 of 1 - rate (kept values are scaled by the exact one): half the
  random bits of a float draw, which is most of dropout's cost on CPU. Every impl draws the same
  mask (in NHWC order), so a seed trains the same on any layout.
  """

  keras_name = "dropout"

  def forward(self, inputs: jax.Array, impl: str) -> jax.Array:
    if self.rate == 0.0 or self.deterministic:
      return inputs
    threshold = round((1.0 - self.rate) * 2**16)
    keep = threshold / 2**16
    canonical = _swap_batch_axis if impl == "batch_minor" else (lambda array: array)
    shape = canonical(inputs).shape
    size = math.prod(shape)
    words = jax.random.bits(self.rngs(), ((size + 1) // 2,), jnp.uint32)
    halves = jnp.concatenate([words >> 16, words & 0xFFFF])[:size].reshape(shape)
    mask = canonical(halves < threshold)
    return jax.lax.select(mask, inputs / keep, jnp.zeros_like(inputs))

  def __call__(self, inputs: jax.Array) -> jax.Array:
    return self.forward(inputs, "lax")


class BatchNorm(nnx.BatchNorm):
  """Keras ``BatchNormalization()``: momentum 0.99, epsilon 1e-3, over the channel axis."""

  keras_name = "batch_normalization"

  def __init__(self, num_features: int, *, rngs: nnx.Rngs):
    super().__init__(num_features, momentum=0.99, epsilon=1e-3, rngs=rngs)

  def forward(self, inputs: jax.Array, impl: str, mask: jax.Array | None = None) -> jax.Array:
    """Normalises ``inputs``; ``mask`` (one bool per example) leaves padding out of the batch statistics."""
    batch_axis = inputs.ndim - 1 if impl == "batch_minor" else 0
    if mask is not None:
      mask = mask.reshape(tuple(-1 if axis == batch_axis else 1 for axis in range(inputs.ndim)))
    if impl != "batch_minor":
      return self(inputs, mask=mask)
    # nnx.BatchNorm's arithmetic (fast variance, clipped at 0) with the features on axis 0.
    reduction_axes = tuple(range(1, inputs.ndim))
    feature_shape = (-1,) + (1,) * (inputs.ndim - 1)
    if self.use_running_average:
      mean, var = self.mean[...], self.var[...]
    else:
      mean = inputs.mean(reduction_axes, where=mask)
      var = jnp.maximum(0.0, jnp.square(inputs).mean(reduction_axes, where=mask) - jnp.square(mean))
      self.mean[...] = jax.lax.stop_gradient(self.momentum * self.mean[...] + (1 - self.momentum) * mean)
      self.var[...] = jax.lax.stop_gradient(self.momentum * self.var[...] + (1 - self.momentum) * var)
    multiplier = jax.lax.rsqrt(var + self.epsilon) * self.scale[...]
    return ((inputs - mean.reshape(feature_shape)) * multiplier.reshape(feature_shape)
            + self.bias[...].reshape(feature_shape))


class Classifier(nnx.Module):
  """A named stack of layers: float NHWC images in, logits (N, 10) out, in any ``impl``."""

  def __init__(self, name: str, layers: Sequence[nnx.Module], impl: str = "auto"):
    resolve_impl(impl)  # Fail at construction on a bad name; "auto" resolves at trace time.
    self.name = name
    self.layers = nnx.List(layers)
    self.impl = impl

  def __call__(self, images: jax.Array, *, mask: jax.Array | None = None) -> jax.Array:
    """Logits of ``images``; ``mask`` (bool, one per image) marks the real images of a padded batch,
    which alone enter BatchNorm's batch statistics (padded rows' outputs are to be ignored).
    """
    impl = resolve_impl(self.impl)
    outputs = _swap_batch_axis(images) if impl == "batch_minor" else images
    for layer in self.layers:
      if isinstance(layer, BatchNorm):
        outputs = layer.forward(outputs, impl, mask)
      else:
        outputs = layer.forward(outputs, impl)
    return _swap_batch_axis(outputs) if impl == "batch_minor" else outputs


_REGISTRY: dict[str, Callable[..., Classifier]] = {}


def register(name: str) -> Callable[[Callable[..., Classifier]], Callable[..., Classifier]]:
  """Registers a model factory ``fn(*, rngs, impl) -> Classifier`` under ``name``."""
  def decorator(factory: Callable[..., Classifier]) -> Callable[..., Classifier]:
    if name in _REGISTRY:
      raise ValueError(f"model {name!r} is already registered")
    _REGISTRY[name] = factory
    return factory
  return decorator


def model_names() -> list[str]:
  """The registered model names, in registration order."""
  return list(_REGISTRY)


def create_model(name: str, *, rngs: nnx.Rngs, impl: str = "auto") -> Classifier:
  """Builds the registered model ``name`` (in train mode) with parameters drawn from ``rngs``.

  ``impl`` picks the implementation (``resolve_impl``); all give the same function.
  ``rngs`` needs a ``params`` stream and, for models with dropout, a ``dropout`` stream
  (``nnx.Rngs(params=seed, dropout=seed + 1)``; a single ``nnx.Rngs(seed)`` also works).
  """
  if name not in _REGISTRY:
    raise ConfigError(f"model {name!r}: unknown, expected one of {', '.join(_REGISTRY)}")
  resolve_impl(impl)
  return _REGISTRY[name](rngs=rngs, impl=impl)


def _dense_head(in_features: int, *, dropout: float, batch_norm: bool, rngs: nnx.Rngs) -> list[nnx.Module]:
  """The notebook's classifier head: Dense 128, Dense 32 (ReLU), Dense 10 logits."""
  layers: list[nnx.Module] = []
  for features_in, features_out in ((in_features, 128), (128, 32)):
    layers.append(Dense(features_in, features_out, activation=nnx.relu, rngs=rngs))
    if batch_norm:
      layers.append(BatchNorm(features_out, rngs=rngs))
    layers.append(Dropout(dropout, rngs=rngs))
  layers.append(Dense(32, 10, rngs=rngs))
  return layers


@register("mlp")
def mlp(*, rngs: nnx.Rngs, impl: str = "auto") -> Classifier:
  """Flatten, Dense 128, Drop 0.2, Dense 32, Drop 0.2, Dense 10: 104,938 params."""
  return Classifier("mlp", [Flatten(), *_dense_head(28 * 28, dropout=0.2, batch_norm=False, rngs=rngs)], impl)


@register("cnn")
def cnn(*, rngs: nnx.Rngs, impl: str = "auto") -> Classifier:
  """Conv 8, Conv 16, then the mlp head on 24*24*16 features: 1,185,482 params."""
  return Classifier("cnn", [
      Conv(1, 8, rngs=rngs),
      Conv(8, 16, rngs=rngs),
      Flatten(),
      *_dense_head(24 * 24 * 16, dropout=0.2, batch_norm=False, rngs=rngs),
  ], impl)


@register("cnn_pool")
def cnn_pool(*, rngs: nnx.Rngs, impl: str = "auto") -> Classifier:
  """Conv 8, MaxPool, Conv 16, MaxPool, then the mlp head on 5*5*16: 57,034 params."""
  return Classifier("cnn_pool", [
      Conv(1, 8, rngs=rngs),
      MaxPool(),
      Conv(8, 16, rngs=rngs),
      MaxPool(),
      Flatten(),
      *_dense_head(5 * 5 * 16, dropout=0.2, batch_norm=False, rngs=rngs),
  ], impl)


@register("cnn_pool_bn")
def cnn_pool_bn(*, rngs: nnx.Rngs, impl: str = "auto") -> Classifier:
  """cnn_pool with BatchNorm + Dropout 0.2 after each pool, BatchNorm + Dropout 0.5 in the head.

  57,402 trainable params and 368 BatchNorm statistics.
  """
  return Classifier("cnn_pool_bn", [
      Conv(1, 8, rngs=rngs),
      MaxPool(),
      BatchNorm(8, rngs=rngs),
      Dropout(0.2, rngs=rngs),
      Conv(8, 16, rngs=rngs),
      MaxPool(),
      BatchNorm(16, rngs=rngs),
      Dropout(0.2, rngs=rngs),
      Flatten(),
      *_dense_head(5 * 5 * 16, dropout=0.5, batch_norm=True, rngs=rngs),
  ], impl)


def _size(state: Any) -> int:
  return sum(int(leaf.size) for leaf in jax.tree_util.tree_leaves(state))


def count_params(module: nnx.Module) -> tuple[int, int]:
  """Returns ``(trainable, non_trainable)``: nnx.Param sizes and BatchNorm statistics sizes."""
  return _size(nnx.state(module, nnx.Param)), _size(nnx.state(module, nnx.BatchStat))


def layer_output_shapes(model: Classifier, input_shape: Sequence[int] = (1, 28, 28, 1)) -> list[tuple[int, ...]]:
  """The output shape of every layer, traced abstractly in eval mode (the model is not changed)."""
  graphdef, state = nnx.split(model)
  shapes: list[tuple[int, ...]] = []

  def trace(state, images):
    traced = nnx.merge(graphdef, state)
    traced.eval()
    outputs = images
    for layer in traced.layers:
      outputs = layer(outputs)
      shapes.append(tuple(outputs.shape))
    return outputs

  jax.eval_shape(trace, state, jax.ShapeDtypeStruct(tuple(input_shape), jnp.float32))
  return shapes


def layer_names(model: Classifier) -> list[str]:
  """Keras-style layer names (``conv2d``, ``dense``, ``dense_1``, ...), in stack order."""
  names, counters = [], {}
  for layer in model.layers:
    base = getattr(layer, "keras_name", type(layer).__name__.lower())
    count = counters.get(base, 0)
    counters[base] = count + 1
    names.append(base if count == 0 else f"{base}_{count}")
  return names


def layer_rows(model: Classifier, input_shape: Sequence[int] = (1, 28, 28, 1)) -> list[dict[str, Any]]:
  """One dict per layer: ``name`` (Keras-style), ``layer``, ``input_shape`` and ``output_shape``
  (batch axis included), ``trainable`` and ``non_trainable`` parameter counts."""
  rows = []
  shapes = [tuple(input_shape), *layer_output_shapes(model, input_shape)]
  for index, (name, layer) in enumerate(zip(layer_names(model), model.layers)):
    trainable, non_trainable = count_params(layer)
    rows.append({"name": name, "layer": layer, "input_shape": shapes[index], "output_shape": shapes[index + 1],
                 "trainable": trainable, "non_trainable": non_trainable})
  return rows


def summary(model: Classifier, input_shape: Sequence[int] = (1, 28, 28, 1)) -> str:
  """A per-layer table like Keras's ``model.summary()``: layer, output shape, params, totals."""
  rows = [(f"{row['name']} ({type(row['layer']).__name__})", str((None, *row["output_shape"][1:])),
           f"{row['trainable'] + row['non_trainable']:,}") for row in layer_rows(model, input_shape)]
  trainable, non_trainable = count_params(model)
  widths = [max(len(header), *(len(row[i]) for row in rows))
            for i, header in enumerate(("Layer (type)", "Output Shape", "Param #"))]
  rule = "-" * (sum(widths) + 4)
  def line(cells):
    return f"{cells[0]:<{widths[0]}}  {cells[1]:<{widths[1]}}  {cells[2]:>{widths[2]}}"
  lines = [f'Model: "{model.name}"', rule, line(("Layer (type)", "Output Shape", "Param #")), rule]
  lines += [line(row) for row in rows]
  lines += [rule,
            f"Total params: {trainable + non_trainable:,}",
            f"Trainable params: {trainable:,}",
            f"Non-trainable params: {non_trainable:,}",
            rule]
  return "\n".join(lines)


def layer_flops(model: Classifier, input_shape: Sequence[int] = (1, 28, 28, 1)) -> list[tuple[str, int]]:
  """Forward FLOPs per image of each layer: 2 per multiply-add of convolutions and dense layers.

  Elementwise work (bias, ReLU, pooling, BatchNorm, dropout) is not counted: it is
  bandwidth-bound and small next to the matmuls, so it would only blur the GFLOP/s figure.
  """
  rows = []
  for row in layer_rows(model, input_shape):
    name, layer, shape = row["name"], row["layer"], row["output_shape"]
    if isinstance(layer, Conv):
      kernel_h, kernel_w, in_features, out_features = layer.kernel.shape
      flops = 2 * kernel_h * kernel_w * in_features * out_features * shape[1] * shape[2]
    elif isinstance(layer, Dense):
      in_features, out_features = layer.linear.kernel.shape
      flops = 2 * in_features * out_features
    else:
      flops = 0
    rows.append((name, flops))
  return rows


def training_flops(model: Classifier) -> tuple[int, int]:
  """``(train, forward)`` FLOPs per image: a training step costs the forward pass plus twice it
  backward (input and weight gradients), except that the first layer needs no input gradient."""
  flops = [count for _, count in layer_flops(model) if count]
  forward = sum(flops)
  return 3 * forward - (flops[0] if flops else 0), forward
