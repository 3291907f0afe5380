"""The notebook's architecture family as flax.nnx modules, registered by name, and introspection.

Every model is a ``Classifier``: a named stack of ``flax_mnist.layers`` that takes float NHWC
images in [0, 1] and returns logits ``(N, 10)``, in one of the layouts of ``layers.IMPLS``
(all compute the same function; ``flax_mnist.config`` picks one per platform).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from flax_mnist.errors import ConfigError
from flax_mnist.layers import (
  BatchNorm,
  Conv,
  Dense,
  Dropout,
  Flatten,
  Layout,
  MaxPool,
  get_layout,
)
from flax_mnist.registry import (  # noqa: F401  (re-exported: models.register etc.)
  build_model,
  create_model,
  init_model,
  model_names,
  register,
  resolve_model,
  takes_mask,
)


def _check_impl(impl: str, compute_dtype: str = "float32") -> Layout:
  try:
    return get_layout(impl, compute_dtype)
  except ValueError as error:
    raise ConfigError(str(error)) from None


class Classifier(nnx.Module):
  """A named stack of layers: float NHWC images in, logits (N, 10) out, in layout ``impl``.

  The layout is chosen here, once, and set on every layer that has one (``layer.layout``); the
  images enter its compute dtype before the first layer and the logits leave it after the last.
  Layers without a ``layout`` attribute (e.g. a stock ``nnx.Linear``) run as they are.
  """

  def __init__(
    self,
    name: str,
    layers: Sequence[nnx.Module],
    impl: str = "lax",
    compute_dtype: str = "float32",
  ):
    layout = _check_impl(impl, compute_dtype)
    for layer in layers:
      if hasattr(layer, "layout"):
        layer.layout = layout
    self.name = name
    self.impl = impl
    self.compute_dtype = compute_dtype
    self.layout = layout
    # Convs that run as one block with the MaxPool after them (layout s2d): static indices.
    self.fused = layout.fused_conv_pools(layers)
    self.layers = nnx.List(layers)

  def __call__(self, images: jax.Array, *, mask: jax.Array | None = None) -> jax.Array:
    """Logits of ``images``; ``mask`` (bool, one per image) marks the real images of a padded batch,
    which alone enter BatchNorm's batch statistics (padded rows' outputs are to be ignored).
    """
    outputs = self.layout.enter(images)
    names = layer_names(self)
    blocked = False  # Whether ``outputs`` are in the layout's space-to-depth blocks.
    skip = set(index + 1 for index in self.fused)  # Each such MaxPool runs with its Conv.
    for index, layer in enumerate(self.layers):
      if index in skip:
        continue
      after = self.layers[index + 1] if index + 1 < len(self.layers) else None
      if blocked and type(layer) is Flatten and type(after) is Dense:
        with jax.named_scope(names[index + 1]):
          outputs, blocked = after.of_blocks(outputs), False
        skip.add(index + 1)
        continue
      # The layer's name in the metadata of every op it (and its gradient) compiles to, for
      # per-layer profiles (benchmarks/profile_ops.py --by_layer); it changes no computation.
      with jax.named_scope(names[index]):
        if index not in self.fused and self.layout.blocks_conv(layer, outputs.shape, blocked):
          outputs, blocked = layer.blocked(outputs, blocked=blocked), True
          continue
        if blocked:
          outputs, blocked = self.layout.unblock(outputs), False
        if index in self.fused:
          outputs = layer.pooled(outputs, self.layers[index + 1].window)
        else:
          outputs = layer(outputs, mask) if isinstance(layer, BatchNorm) else layer(outputs)
    return self.layout.leave(self.layout.unblock(outputs) if blocked else outputs)


def _dense_head(
  in_features: int,
  *,
  dropout: float,
  batch_norm: bool,
  width: float,
  num_classes: int,
  rngs: nnx.Rngs,
) -> list[nnx.Module]:
  """The notebook's classifier head: Dense 128, Dense 32 (ReLU, times ``width``), then one logit
  per class."""
  if not isinstance(num_classes, int) or isinstance(num_classes, bool) or num_classes < 1:
    raise ConfigError(f"num_classes {num_classes!r}: expected a positive integer")
  layers: list[nnx.Module] = []
  features_in = in_features
  for features in (scaled(128, width), scaled(32, width)):
    layers.append(Dense(features_in, features, activation=nnx.relu, rngs=rngs))
    if batch_norm:
      layers.append(BatchNorm(features, rngs=rngs))
    layers.append(Dropout(dropout, rngs=rngs))
    features_in = features
  layers.append(Dense(features_in, num_classes, rngs=rngs))
  return layers


def scaled(features: int, width: float) -> int:
  """``features * width`` rounded to the nearest integer (halves up), at least 1: every hidden
  width of the family under ``model_kwargs={'width': w}``."""
  if not (isinstance(width, (int, float)) and not isinstance(width, bool) and width > 0):
    raise ConfigError(f"model_kwargs width {width!r}: expected a positive number")
  return max(1, math.floor(features * width + 0.5))


def _image_shape(input_shape: Sequence[int]) -> tuple[int, int, int]:
  """``input_shape`` as (height, width, channels), checked."""
  shape = tuple(input_shape)
  if len(shape) != 3 or not all(isinstance(size, int) and size > 0 for size in shape):
    raise ConfigError(f"input_shape {list(shape)!r}: expected [height, width, channels]")
  return shape


@dataclasses.dataclass(frozen=True)
class _Plan:
  """One model of the family: its convolutions (8 and 16 filters at width 1), whether a 2x2
  max-pool follows each, whether BatchNorm (+ Dropout 0.2) follows each pool and each hidden
  Dense, and the head's dropout."""

  convs: int
  pooled: bool = False
  batch_norm: bool = False
  head_dropout: float = 0.2


# The notebook's four models. Parameters at width 1 on MNIST: mlp 104,938; cnn 1,185,482;
# cnn_pool 57,034; cnn_pool_bn 57,402 trainable and 368 BatchNorm statistics.
FAMILY = {
  "mlp": _Plan(convs=0),  # Flatten, Dense 128, Drop 0.2, Dense 32, Drop 0.2, Dense 10.
  "cnn": _Plan(convs=2),  # Conv 8, Conv 16, then the mlp head.
  "cnn_pool": _Plan(convs=2, pooled=True),  # Conv 8, MaxPool, Conv 16, MaxPool, the mlp head.
  # cnn_pool with BatchNorm + Dropout 0.2 after each pool, BatchNorm + Dropout 0.5 in the head.
  "cnn_pool_bn": _Plan(convs=2, pooled=True, batch_norm=True, head_dropout=0.5),
}
MNIST_SHAPE = (28, 28, 1)


def family_model(
  name: str,
  *,
  rngs: nnx.Rngs,
  impl: str = "lax",
  compute_dtype: str = "float32",
  width: float = 1.0,
  input_shape: Sequence[int] = MNIST_SHAPE,
  num_classes: int = 10,
) -> Classifier:
  """Model ``name`` of the notebook's family (``FAMILY``). ``width`` scales each convolution's
  filters and hidden Dense layer (1: the notebook's counts); ``input_shape`` (H, W, C) and
  ``num_classes`` adapt it to the data (MNIST's by default; the trainer passes the data's)."""
  plan = FAMILY[name]
  height, side, features = _image_shape(input_shape)
  layers: list[nnx.Module] = []
  for filters in (scaled(8, width), scaled(16, width))[: plan.convs]:
    layers.append(Conv(features, filters, rngs=rngs))  # Valid 3x3.
    height, side, features = height - 2, side - 2, filters
    if plan.pooled:
      layers.append(MaxPool())
      height, side = height // 2, side // 2
    if plan.batch_norm:
      layers += [BatchNorm(filters, rngs=rngs), Dropout(0.2, rngs=rngs)]
  layers.append(Flatten())
  layers += _dense_head(
    height * side * features,
    dropout=plan.head_dropout,
    batch_norm=plan.batch_norm,
    width=width,
    num_classes=num_classes,
    rngs=rngs,
  )
  return Classifier(name, layers, impl, compute_dtype)


# Registered in the notebook's order, each a factory fn(*, rngs, **kwargs) like any other.
mlp = register("mlp")(functools.partial(family_model, "mlp"))
cnn = register("cnn")(functools.partial(family_model, "cnn"))
cnn_pool = register("cnn_pool")(functools.partial(family_model, "cnn_pool"))
cnn_pool_bn = register("cnn_pool_bn")(functools.partial(family_model, "cnn_pool_bn"))


# Introspection. ``model`` is a Classifier, or any module with a ``layers`` sequence of NHWC
# layers (an ``nnx.Sequential`` of stock layers, say).


def _size(state: Any) -> int:
  return sum(int(leaf.size) for leaf in jax.tree_util.tree_leaves(state))


def count_params(module: nnx.Module) -> tuple[int, int]:
  """Returns ``(trainable, non_trainable)``: nnx.Param sizes and BatchNorm statistics sizes."""
  return _size(nnx.state(module, nnx.Param)), _size(nnx.state(module, nnx.BatchStat))


def layer_output_shapes(
  model: nnx.Module, input_shape: Sequence[int] = (1, 28, 28, 1)
) -> list[tuple[int, ...]]:
  """The NHWC output shape of every layer, traced abstractly in eval mode (``model`` unchanged)."""
  graphdef, state = nnx.split(model)
  shapes: list[tuple[int, ...]] = []

  def trace(state, images):
    traced = nnx.merge(graphdef, state)
    traced.eval()
    layout = getattr(traced, "layout", None) or get_layout("lax")
    outputs = layout.enter(images)
    for layer in traced.layers:
      outputs = layer(outputs)
      shapes.append(tuple(layout.leave(outputs).shape))
    return outputs

  jax.eval_shape(trace, state, jax.ShapeDtypeStruct(tuple(input_shape), jnp.float32))
  return shapes


def layer_names(model: nnx.Module) -> list[str]:
  """Keras-style layer names (``conv2d``, ``dense``, ``dense_1``, ...), in stack order."""
  names, counters = [], {}
  for layer in model.layers:
    base = getattr(layer, "keras_name", type(layer).__name__.lower())
    count = counters.get(base, 0)
    counters[base] = count + 1
    names.append(base if count == 0 else f"{base}_{count}")
  return names


def layer_rows(
  model: nnx.Module, input_shape: Sequence[int] = (1, 28, 28, 1)
) -> list[dict[str, Any]]:
  """One dict per layer: ``name`` (Keras-style), ``layer``, ``input_shape`` and ``output_shape``
  (batch axis included), ``trainable`` and ``non_trainable`` parameter counts."""
  rows = []
  shapes = [tuple(input_shape), *layer_output_shapes(model, input_shape)]
  for index, (name, layer) in enumerate(zip(layer_names(model), model.layers, strict=True)):
    trainable, non_trainable = count_params(layer)
    rows.append(
      {
        "name": name,
        "layer": layer,
        "input_shape": shapes[index],
        "output_shape": shapes[index + 1],
        "trainable": trainable,
        "non_trainable": non_trainable,
      }
    )
  return rows


def summary(model: nnx.Module, input_shape: Sequence[int] = (1, 28, 28, 1)) -> str:
  """A per-layer table like Keras's ``model.summary()``: layer, output shape, params, totals."""
  rows = [
    (
      f"{row['name']} ({type(row['layer']).__name__})",
      str((None, *row["output_shape"][1:])),
      f"{row['trainable'] + row['non_trainable']:,}",
    )
    for row in layer_rows(model, input_shape)
  ]
  trainable, non_trainable = count_params(model)
  headers = ("Layer (type)", "Output Shape", "Param #")
  widths = [max(len(header), *(len(row[i]) for row in rows)) for i, header in enumerate(headers)]
  rule = "-" * (sum(widths) + 4)

  def line(cells):
    return f"{cells[0]:<{widths[0]}}  {cells[1]:<{widths[1]}}  {cells[2]:>{widths[2]}}"

  name = getattr(model, "name", type(model).__name__)
  lines = [f'Model: "{name}"', rule, line(headers), rule, *(line(row) for row in rows), rule]
  lines += [
    f"Total params: {trainable + non_trainable:,}",
    f"Trainable params: {trainable:,}",
    f"Non-trainable params: {non_trainable:,}",
    rule,
  ]
  return "\n".join(lines)


def _named_leaves(module: nnx.Module, kind: type[nnx.Variable]) -> list[tuple[list[str], Any]]:
  """``(path, array)`` of every ``kind`` variable of ``module``: path keys as strings, less the
  ``linear`` of Dense and the ``value`` of the variable."""
  leaves = []
  for path, value in jax.tree_util.tree_flatten_with_path(nnx.state(module, kind))[0]:
    keys = [
      str(getattr(key, "key", getattr(key, "idx", getattr(key, "name", key)))) for key in path
    ]
    leaves.append(([key for key in keys if key not in ("linear", "value")], value))
  return leaves


def _named(model: nnx.Module, kind: type[nnx.Variable]) -> dict[str, jax.Array]:
  """Keras-style names for a stack of layers; the nnx attribute path for any other module."""
  if not hasattr(model, "layers"):
    return {"/".join(keys): value for keys, value in _named_leaves(model, kind)}
  named = {}
  for name, layer in zip(layer_names(model), model.layers, strict=True):
    for keys, value in _named_leaves(layer, kind):
      named["/".join([name, *keys])] = value
  return named


def named_params(model: nnx.Module) -> dict[str, jax.Array]:
  """Every parameter under a Keras-style name, ``<layer>/<param>``: ``conv2d/kernel``,
  ``dense_1/bias``, ``batch_normalization/scale``, ... (the TensorBoard histogram tags)."""
  return _named(model, nnx.Param)


def named_batch_stats(model: nnx.Module) -> dict[str, jax.Array]:
  """Every BatchNorm moving statistic by name: ``batch_normalization/mean``, ``.../var``, ..."""
  return _named(model, nnx.BatchStat)


def layer_flops(
  model: nnx.Module, input_shape: Sequence[int] = (1, 28, 28, 1)
) -> list[tuple[str, int]]:
  """Forward FLOPs per image of each layer: 2 per multiply-add of convolutions and dense layers.

  A layer's ``kernel`` parameters count, whatever the layer's type: a 2-D (in, out) kernel as a
  dense layer applied at every position of the output (once for (N, F) outputs), a 4-D HWIO
  kernel as a convolution computing every output pixel, read from the output shape. Elementwise
  work (bias, ReLU, pooling, BatchNorm, dropout) is not counted: it is bandwidth-bound and small
  next to the matmuls, so it would only blur the GFLOP/s figure.
  """
  rows = []
  for row in layer_rows(model, input_shape):
    positions = math.prod(row["output_shape"][1:-1])
    kernels = [
      value
      for keys, value in _named_leaves(row["layer"], nnx.Param)
      if keys[-1] == "kernel" and value.ndim in (2, 4)
    ]
    rows.append((row["name"], sum(2 * int(kernel.size) * positions for kernel in kernels)))
  return rows


def training_flops(model: nnx.Module) -> tuple[int, int]:
  """``(train, forward)`` FLOPs per image: a training step costs the forward pass plus twice it
  backward (input and weight gradients), except that the first layer needs no input gradient."""
  flops = [count for _, count in layer_flops(model) if count]
  forward = sum(flops)
  return 3 * forward - (flops[0] if flops else 0), forward


def describe(model: nnx.Module, image_shape: Sequence[int] = MNIST_SHAPE) -> str:
  """The Keras-like summary of a stack of layers (on images of ``image_shape``); the parameter
  count of any other module."""
  if hasattr(model, "layers"):
    return summary(model, (1, *image_shape))
  trainable, non_trainable = count_params(model)
  return f"Model {type(model).__name__}: {trainable:,} trainable, {non_trainable:,} other params"
