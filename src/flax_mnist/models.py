"""The notebook's architecture family as flax.nnx modules, registered by name.

Every model is a ``Classifier``: a named stack of layers that takes float NHWC images in
[0, 1] and returns logits ``(N, 10)``. Layers follow Keras's defaults, as the notebook used
them: Glorot-uniform kernels, zero biases, valid 3x3 convolutions with ReLU, 2x2 max-pooling,
BatchNorm with momentum 0.99 and epsilon 1e-3.

The convolution has two numerically equal implementations (tested): XLA's convolution on
GPU/TPU, and on CPU an im2col matmul (the 9 shifted slices stacked on the channel axis, one
dot), because XLA:CPU convolutions inside a compiled training loop are 10x slower.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from flax_mnist.errors import ConfigError

CONV_IMPLS = ("auto", "lax", "im2col")
_glorot_uniform = nnx.initializers.glorot_uniform()
_zeros = nnx.initializers.zeros_init()


def resolve_conv_impl(impl: str) -> str:
  """Maps ``"auto"`` to the fast implementation for the default backend (im2col on CPU)."""
  if impl not in CONV_IMPLS:
    raise ConfigError(f"conv_impl {impl!r}: unknown, expected one of {', '.join(CONV_IMPLS)}")
  if impl == "auto":
    return "im2col" if jax.default_backend() == "cpu" else "lax"
  return impl


def im2col_conv(images: jax.Array, kernel: jax.Array) -> jax.Array:
  """Valid, stride-1 convolution as one matmul over the stacked shifted slices (NHWC, HWIO)."""
  kernel_h, kernel_w, in_features, out_features = kernel.shape
  out_h = images.shape[1] - kernel_h + 1
  out_w = images.shape[2] - kernel_w + 1
  # Slice order (row, column, channel) matches the row-major reshape of the HWIO kernel.
  patches = jnp.concatenate(
      [images[:, i:i + out_h, j:j + out_w, :] for i in range(kernel_h) for j in range(kernel_w)],
      axis=-1)
  return jnp.dot(patches, kernel.reshape(kernel_h * kernel_w * in_features, out_features))


def lax_conv(images: jax.Array, kernel: jax.Array) -> jax.Array:
  """Valid, stride-1 convolution with XLA's convolution (NHWC, HWIO)."""
  return jax.lax.conv_general_dilated(images, kernel, window_strides=(1, 1), padding="VALID",
                                      dimension_numbers=("NHWC", "HWIO", "NHWC"))


class Conv(nnx.Module):
  """Keras ``Conv2D(features, kernel_size, activation)``: valid padding, stride 1."""

  keras_name = "conv2d"

  def __init__(self, in_features: int, out_features: int, kernel_size: int = 3, *,
               activation: Callable[[jax.Array], jax.Array] | None = nnx.relu,
               impl: str = "auto", rngs: nnx.Rngs):
    self.kernel = nnx.Param(_glorot_uniform(rngs.params(), (kernel_size, kernel_size, in_features, out_features)))
    self.bias = nnx.Param(_zeros(rngs.params(), (out_features,)))
    self.activation = activation
    resolve_conv_impl(impl)  # Fail at construction on a bad name; "auto" resolves at trace time.
    self.impl = impl

  def __call__(self, images: jax.Array) -> jax.Array:
    conv = im2col_conv if resolve_conv_impl(self.impl) == "im2col" else lax_conv
    outputs = conv(images, self.kernel[...]) + self.bias[...]
    return outputs if self.activation is None else self.activation(outputs)


class Dense(nnx.Module):
  """Keras ``Dense(features, activation)`` with Glorot-uniform kernel and zero bias."""

  keras_name = "dense"

  def __init__(self, in_features: int, out_features: int, *,
               activation: Callable[[jax.Array], jax.Array] | None = None, rngs: nnx.Rngs):
    self.linear = nnx.Linear(in_features, out_features, kernel_init=_glorot_uniform,
                             bias_init=_zeros, rngs=rngs)
    self.activation = activation

  def __call__(self, inputs: jax.Array) -> jax.Array:
    outputs = self.linear(inputs)
    return outputs if self.activation is None else self.activation(outputs)


class MaxPool(nnx.Module):
  """Keras ``MaxPooling2D(2)``: non-overlapping windows, a trailing odd row/column dropped."""

  keras_name = "max_pooling2d"

  def __init__(self, window: int = 2):
    self.window = window

  def __call__(self, images: jax.Array) -> jax.Array:
    batch, height, width, channels = images.shape
    out_h, out_w, w = height // self.window, width // self.window, self.window
    # A reshape + max differentiates to cheap elementwise ops, unlike reduce_window.
    windows = images[:, :out_h * w, :out_w * w, :].reshape(batch, out_h, w, out_w, w, channels)
    return windows.max(axis=(2, 4))


class Flatten(nnx.Module):
  """Keras ``Flatten``: (N, H, W, C) to (N, H*W*C) in row-major (H, W, C) order."""

  keras_name = "flatten"

  def __call__(self, inputs: jax.Array) -> jax.Array:
    return inputs.reshape(inputs.shape[0], -1)


class Dropout(nnx.Dropout):
  """Keras ``Dropout(rate)``; active in train mode only, masks from the model's dropout stream."""

  keras_name = "dropout"


class BatchNorm(nnx.BatchNorm):
  """Keras ``BatchNormalization()``: momentum 0.99, epsilon 1e-3, over the last axis."""

  keras_name = "batch_normalization"

  def __init__(self, num_features: int, *, rngs: nnx.Rngs):
    super().__init__(num_features, momentum=0.99, epsilon=1e-3, rngs=rngs)


class Classifier(nnx.Module):
  """A named stack of layers: float NHWC images in, logits (N, 10) out."""

  def __init__(self, name: str, layers: Sequence[nnx.Module]):
    self.name = name
    self.layers = nnx.List(layers)

  def __call__(self, images: jax.Array) -> jax.Array:
    outputs = images
    for layer in self.layers:
      outputs = layer(outputs)
    return outputs


_REGISTRY: dict[str, Callable[..., Classifier]] = {}


def register(name: str) -> Callable[[Callable[..., Classifier]], Callable[..., Classifier]]:
  """Registers a model factory ``fn(*, rngs, conv_impl) -> Classifier`` under ``name``."""
  def decorator(factory: Callable[..., Classifier]) -> Callable[..., Classifier]:
    if name in _REGISTRY:
      raise ValueError(f"model {name!r} is already registered")
    _REGISTRY[name] = factory
    return factory
  return decorator


def model_names() -> list[str]:
  """The registered model names, in registration order."""
  return list(_REGISTRY)


def create_model(name: str, *, rngs: nnx.Rngs, conv_impl: str = "auto") -> Classifier:
  """Builds the registered model ``name`` (in train mode) with parameters drawn from ``rngs``.

  ``rngs`` needs a ``params`` stream and, for models with dropout, a ``dropout`` stream
  (``nnx.Rngs(params=seed, dropout=seed + 1)``; a single ``nnx.Rngs(seed)`` also works).
  """
  if name not in _REGISTRY:
    raise ConfigError(f"model {name!r}: unknown, expected one of {', '.join(_REGISTRY)}")
  resolve_conv_impl(conv_impl)
  return _REGISTRY[name](rngs=rngs, conv_impl=conv_impl)


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
def mlp(*, rngs: nnx.Rngs, conv_impl: str = "auto") -> Classifier:
  """Flatten, Dense 128, Drop 0.2, Dense 32, Drop 0.2, Dense 10: 104,938 params."""
  del conv_impl  # No convolutions.
  return Classifier("mlp", [Flatten(), *_dense_head(28 * 28, dropout=0.2, batch_norm=False, rngs=rngs)])


@register("cnn")
def cnn(*, rngs: nnx.Rngs, conv_impl: str = "auto") -> Classifier:
  """Conv 8, Conv 16, then the mlp head on 24*24*16 features: 1,185,482 params."""
  return Classifier("cnn", [
      Conv(1, 8, impl=conv_impl, rngs=rngs),
      Conv(8, 16, impl=conv_impl, rngs=rngs),
      Flatten(),
      *_dense_head(24 * 24 * 16, dropout=0.2, batch_norm=False, rngs=rngs),
  ])


@register("cnn_pool")
def cnn_pool(*, rngs: nnx.Rngs, conv_impl: str = "auto") -> Classifier:
  """Conv 8, MaxPool, Conv 16, MaxPool, then the mlp head on 5*5*16: 57,034 params."""
  return Classifier("cnn_pool", [
      Conv(1, 8, impl=conv_impl, rngs=rngs),
      MaxPool(),
      Conv(8, 16, impl=conv_impl, rngs=rngs),
      MaxPool(),
      Flatten(),
      *_dense_head(5 * 5 * 16, dropout=0.2, batch_norm=False, rngs=rngs),
  ])


@register("cnn_pool_bn")
def cnn_pool_bn(*, rngs: nnx.Rngs, conv_impl: str = "auto") -> Classifier:
  """cnn_pool with BatchNorm + Dropout 0.2 after each pool, BatchNorm + Dropout 0.5 in the head.

  57,402 trainable params and 368 BatchNorm statistics.
  """
  return Classifier("cnn_pool_bn", [
      Conv(1, 8, impl=conv_impl, rngs=rngs),
      MaxPool(),
      BatchNorm(8, rngs=rngs),
      Dropout(0.2, rngs=rngs),
      Conv(8, 16, impl=conv_impl, rngs=rngs),
      MaxPool(),
      BatchNorm(16, rngs=rngs),
      Dropout(0.2, rngs=rngs),
      Flatten(),
      *_dense_head(5 * 5 * 16, dropout=0.5, batch_norm=True, rngs=rngs),
  ])


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


def summary(model: Classifier, input_shape: Sequence[int] = (1, 28, 28, 1)) -> str:
  """A per-layer table like Keras's ``model.summary()``: layer, output shape, params, totals."""
  rows = []
  for name, layer, shape in zip(layer_names(model), model.layers, layer_output_shapes(model, input_shape)):
    trainable, non_trainable = count_params(layer)
    rows.append((f"{name} ({type(layer).__name__})", str((None, *shape[1:])), f"{trainable + non_trainable:,}"))
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
  for name, layer, shape in zip(layer_names(model), model.layers, layer_output_shapes(model, input_shape)):
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
