"""Tests for flax_mnist.models: the family's sizes, Keras defaults, impls, modes, introspection."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from flax_mnist import layers, models
from flax_mnist.errors import ConfigError

EXPECTED_PARAMS = {  # From the notebook's Keras model.summary(): (trainable, non-trainable).
  "mlp": (104_938, 0),
  "cnn": (1_185_482, 0),
  "cnn_pool": (57_034, 0),
  "cnn_pool_bn": (57_402, 368),
}


def _images(num=4, seed=0):
  return jax.random.uniform(jax.random.key(seed), (num, 28, 28, 1))


def test_registry_holds_the_family():
  assert models.model_names() == list(EXPECTED_PARAMS)


@pytest.mark.parametrize("name", list(EXPECTED_PARAMS))
def test_parameter_counts_and_output_shape(name):
  model = models.create_model(name, rngs=nnx.Rngs(0))
  assert models.count_params(model) == EXPECTED_PARAMS[name]
  model.eval()
  logits = model(_images(3))
  assert logits.shape == (3, 10) and logits.dtype == jnp.float32


def test_unknown_model_lists_the_names():
  with pytest.raises(
    ConfigError, match="model 'resnet': unknown, expected one of mlp, cnn, cnn_pool, cnn_pool_bn"
  ):
    models.create_model("resnet", rngs=nnx.Rngs(0))


@pytest.mark.parametrize("impl", ["fft", "auto"])
def test_unknown_impl_is_rejected(impl):
  # "auto" is the config's to resolve (flax_mnist.config): a model takes concrete names only.
  match = f"impl '{impl}': unknown, expected one of lax, im2col, s2d"
  with pytest.raises(ConfigError, match=match):
    models.create_model("cnn", rngs=nnx.Rngs(0), impl=impl)
  with pytest.raises(ConfigError, match=match):
    models.Classifier("flat", [models.Flatten()], impl=impl)


def _train_mode_step(name, impl):
  """Logits, parameter gradients and updated model state of one train-mode call (dropout on)."""
  model = models.create_model(name, rngs=nnx.Rngs(params=0, dropout=1), impl=impl)
  model.train()
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)

  def loss(params):
    model = nnx.merge(graphdef, params, rest, copy=True)
    logits = model(_images(16))
    return jnp.sum(logits * jnp.arange(10.0)), (logits, nnx.split(model, nnx.Param, ...)[2])

  grads, (logits, new_rest) = jax.jit(jax.grad(loss, has_aux=True))(params)
  return logits, jax.tree_util.tree_leaves(grads), jax.tree_util.tree_leaves(new_rest)


def _assert_close_to_the_array(got, want, relative):
  """Equal within ``relative`` of the array's largest magnitude: entries near 0 are sums of terms
  that cancel, and an elementwise tolerance there would test the order of summation."""
  scale = float(np.abs(np.asarray(want)).max())
  np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=0, atol=relative * scale)


# Measured, lax against im2col, s2d and the batch-minor layout since removed (train mode, 16
# uniform images, a 2-core AMD EPYC VM): cnn_pool_bn's logits agree to 2.1e-6 of their largest
# at jax 0.10.2, and to 4.7e-5 at jax 0.7.2 (batch-minor), whose reductions add in sequence (a
# 2,366-element mean off by 1.2e-6, 8e-8 at jax 0.10.2) and whose error BatchNorm's one-pass
# variance, E[x^2] - E[x]^2, multiplies where a channel's mean dwarfs its spread. Its gradients:
# 4.9e-6 and 8.5e-5 of each array's largest; mlp's logits and gradients 5.7e-7. A real change
# for scale: BatchNorm's epsilon at 1e-5 instead of Keras's 1e-3 moves cnn_pool_bn's logits by
# 0.41 of their largest.
LOGITS_ACROSS_IMPLS = 2e-4
GRADS_ACROSS_IMPLS = 3e-4


@pytest.mark.parametrize("name", ["cnn_pool_bn", "mlp"])
def test_every_impl_trains_the_same_function_with_the_same_dropout_masks(name):
  reference = _train_mode_step(name, "lax")
  for impl in ("im2col", "s2d"):
    logits, grads, new_rest = _train_mode_step(name, impl)
    _assert_close_to_the_array(logits, reference[0], LOGITS_ACROSS_IMPLS)
    for got, want in zip(grads, reference[1], strict=True):
      _assert_close_to_the_array(got, want, GRADS_ACROSS_IMPLS)
    # BatchNorm statistics (measured: 7.2e-7 apart at most, jax 0.7.2) and RNG counts (equal).
    for got, want in zip(new_rest, reference[2], strict=True):
      if jnp.issubdtype(want.dtype, jax.dtypes.prng_key):
        got, want = jax.random.key_data(got), jax.random.key_data(want)
      np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("impl", ["im2col", "s2d"])
def test_cnn_eval_outputs_equal_across_impls(impl):
  outputs = {}
  for each in ("lax", impl):
    model = models.create_model("cnn", rngs=nnx.Rngs(0), impl=each)
    model.eval()
    outputs[each] = model(_images())
  np.testing.assert_allclose(
    np.asarray(outputs[impl]), np.asarray(outputs["lax"]), atol=1e-5, rtol=1e-5
  )


def test_keras_initialisation_and_batchnorm_settings():
  model = models.create_model("cnn_pool_bn", rngs=nnx.Rngs(0))
  conv, dense = model.layers[0], model.layers[9]
  np.testing.assert_array_equal(np.asarray(conv.bias[...]), 0.0)
  np.testing.assert_array_equal(np.asarray(dense.linear.bias[...]), 0.0)
  # Glorot uniform: U(-limit, limit), limit = sqrt(6 / (fan_in + fan_out)).
  limit = np.sqrt(6 / (400 + 128))
  kernel = np.asarray(dense.linear.kernel[...])
  assert np.abs(kernel).max() <= limit and np.abs(kernel).max() > 0.9 * limit
  assert abs(kernel.std() - limit / np.sqrt(3)) < 0.05 * limit
  batch_norm = model.layers[2]
  assert batch_norm.momentum == 0.99 and batch_norm.epsilon == 1e-3


def test_train_mode_drops_out_and_eval_mode_is_deterministic():
  model = models.create_model("mlp", rngs=nnx.Rngs(params=0, dropout=1))
  images = _images()
  model.train()
  first, second = model(images), model(images)
  assert not np.allclose(np.asarray(first), np.asarray(second))  # Fresh dropout masks each call.
  model.eval()
  np.testing.assert_array_equal(np.asarray(model(images)), np.asarray(model(images)))


def test_batchnorm_uses_batch_statistics_in_train_mode_and_moving_ones_in_eval():
  model = models.create_model("cnn_pool_bn", rngs=nnx.Rngs(0))
  before = np.asarray(model.layers[2].mean[...]).copy()
  model.train()
  model(_images(8))
  after = np.asarray(model.layers[2].mean[...])
  assert not np.allclose(before, after)  # Moving mean updated with momentum 0.99.
  model.eval()
  model(_images(8))
  np.testing.assert_array_equal(np.asarray(model.layers[2].mean[...]), after)


def test_summary_lists_layers_shapes_and_totals():
  text = models.summary(models.create_model("cnn", rngs=nnx.Rngs(0)))
  assert 'Model: "cnn"' in text
  assert "conv2d (Conv)" in text and "(None, 26, 26, 8)" in text and "80" in text
  assert "conv2d_1 (Conv)" in text and "(None, 24, 24, 16)" in text and "1,168" in text
  assert "flatten (Flatten)" in text and "(None, 9216)" in text
  assert "dense (Dense)" in text and "1,179,776" in text
  assert "Total params: 1,185,482" in text and "Non-trainable params: 0" in text
  bn_text = models.summary(models.create_model("cnn_pool_bn", rngs=nnx.Rngs(0)))
  assert "Trainable params: 57,402" in bn_text and "Non-trainable params: 368" in bn_text
  assert "batch_normalization_3 (BatchNorm)" in bn_text


@pytest.mark.parametrize("impl", ["lax", "im2col", "s2d"])
def test_a_padded_masked_batch_computes_like_the_unpadded_one(impl):
  # The mask keeps the padding rows out of BatchNorm's statistics: the real rows' logits and the
  # moving statistics are those of the real rows alone.
  def build():
    rngs = nnx.Rngs(params=0)
    layers = [
      models.Conv(1, 4, rngs=rngs),
      models.BatchNorm(4, rngs=rngs),
      models.Flatten(),
      models.Dense(26 * 26 * 4, 10, rngs=rngs),
    ]
    return models.Classifier("conv_bn", layers, impl=impl)

  images = _images(12)
  padded = jnp.concatenate([images, jnp.ones((4, 28, 28, 1))])
  plain, masked = build(), build()
  want = plain(images)
  got = masked(padded, mask=jnp.arange(16) < 12)
  # Measured: within 5.2e-7 of the largest logit on a 2-core AMD EPYC VM (jax 0.10.2 and 0.7.2);
  # the batch-minor layout (since removed) within 6.3e-5 (2.6e-4 of 4.13) on an Intel AVX-512 VM
  # at jax 0.7.2 (issue 16),
  # whose sequential sums BatchNorm's one-pass variance multiplies (see LOGITS_ACROSS_IMPLS). One
  # padding row let into the statistics moves the logits by 9.0e-2 of the largest, all four by
  # 1.9e-1.
  _assert_close_to_the_array(got[:12], want, LOGITS_ACROSS_IMPLS)
  # The moving statistics: within 7.4e-8 relative (measured, both stacks here).
  for got_stat, want_stat in zip(
    jax.tree.leaves(nnx.state(masked, nnx.BatchStat)),
    jax.tree.leaves(nnx.state(plain, nnx.BatchStat)),
    strict=True,
  ):
    np.testing.assert_allclose(np.asarray(got_stat), np.asarray(want_stat), rtol=1e-5, atol=1e-7)
  unmasked = build()
  unmasked(padded)
  assert not np.allclose(
    np.asarray(unmasked.layers[1].mean[...]), np.asarray(plain.layers[1].mean[...])
  )


def test_the_classifier_sets_its_layout_on_every_layer():
  model = models.create_model("cnn_pool_bn", rngs=nnx.Rngs(0), impl="im2col")
  assert model.impl == "im2col"
  assert {layer.layout.name for layer in model.layers} == {"im2col"}
  assert models.create_model("mlp", rngs=nnx.Rngs(0)).impl == "lax"  # The default.


@pytest.mark.parametrize("name", ["cnn_pool_bn", "mlp"])
def test_init_model_derives_the_keys_from_the_seed(name):
  model = models.init_model(name, 3, impl="im2col", dropout_rng_impl="rbg")
  seed_key = jax.random.key(3)
  dropout_key = jax.random.fold_in(jax.random.key(3, impl="rbg"), 1)
  want = models.create_model(
    name, impl="im2col", rngs=nnx.Rngs(params=jax.random.fold_in(seed_key, 0), dropout=dropout_key)
  )
  assert model.impl == "im2col"
  got_leaves, want_leaves = jax.tree.leaves(nnx.state(model)), jax.tree.leaves(nnx.state(want))
  for got, expected in zip(got_leaves, want_leaves, strict=True):
    if jnp.issubdtype(expected.dtype, jax.dtypes.prng_key):
      got, expected = jax.random.key_data(got), jax.random.key_data(expected)
    np.testing.assert_array_equal(np.asarray(got), np.asarray(expected))
  # In train mode, dropping out with the same masks as the model built by hand.
  np.testing.assert_array_equal(np.asarray(model(_images())), np.asarray(want(_images())))
  other = models.init_model(name, 4, impl="im2col", dropout_rng_impl="rbg")
  assert not np.array_equal(
    np.asarray(other.layers[-1].linear.kernel[...]), np.asarray(model.layers[-1].linear.kernel[...])
  )


def test_named_params_and_batch_stats_use_keras_layer_names():
  model = models.create_model("cnn_pool_bn", rngs=nnx.Rngs(0))
  params = models.named_params(model)
  assert list(params) == [
    "conv2d/bias",
    "conv2d/kernel",
    "batch_normalization/bias",
    "batch_normalization/scale",
    "conv2d_1/bias",
    "conv2d_1/kernel",
    "batch_normalization_1/bias",
    "batch_normalization_1/scale",
    "dense/bias",
    "dense/kernel",
    "batch_normalization_2/bias",
    "batch_normalization_2/scale",
    "dense_1/bias",
    "dense_1/kernel",
    "batch_normalization_3/bias",
    "batch_normalization_3/scale",
    "dense_2/bias",
    "dense_2/kernel",
  ]
  assert params["dense_1/kernel"].shape == (128, 32) and params["conv2d/kernel"].shape == (
    3,
    3,
    1,
    8,
  )
  np.testing.assert_array_equal(params["dense/kernel"], model.layers[9].linear.kernel[...])
  assert sum(int(value.size) for value in params.values()) == EXPECTED_PARAMS["cnn_pool_bn"][0]
  stats = models.named_batch_stats(model)
  assert list(stats)[:4] == [
    "batch_normalization/mean",
    "batch_normalization/var",
    "batch_normalization_1/mean",
    "batch_normalization_1/var",
  ]
  assert sum(int(value.size) for value in stats.values()) == EXPECTED_PARAMS["cnn_pool_bn"][1]
  assert models.named_batch_stats(models.create_model("mlp", rngs=nnx.Rngs(0))) == {}


def test_layer_flops_of_the_family_and_of_stock_flax_layers():
  flops = dict(models.layer_flops(models.create_model("cnn_pool", rngs=nnx.Rngs(0))))
  assert flops["conv2d"] == 2 * 3 * 3 * 1 * 8 * 26 * 26
  assert flops["conv2d_1"] == 2 * 3 * 3 * 8 * 16 * 11 * 11
  assert flops["dense"] == 2 * 400 * 128 and flops["max_pooling2d"] == 0
  train, forward = models.training_flops(models.create_model("cnn_pool", rngs=nnx.Rngs(0)))
  assert forward == sum(flops.values()) and train == 3 * forward - flops["conv2d"]
  # A stack of stock nnx layers is summarised alike (kernels by their shape).
  rngs = nnx.Rngs(0)
  stock = models.Classifier(
    "stock",
    [
      nnx.Conv(1, 4, (3, 3), padding="VALID", rngs=rngs),
      models.Flatten(),
      nnx.Linear(26 * 26 * 4, 10, rngs=rngs),
    ],
    impl="im2col",
  )
  assert stock(_images(2)).shape == (2, 10)
  assert models.layer_flops(stock) == [
    ("conv", 2 * 9 * 4 * 26 * 26),
    ("flatten", 0),
    ("linear", 2 * 2704 * 10),
  ]
  assert "Total params: 27,090" in models.summary(stock)
  assert list(models.named_params(stock)) == [
    "conv/bias",
    "conv/kernel",
    "linear/bias",
    "linear/kernel",
  ]


@pytest.mark.integration  # Compiles and trains whole models: seconds each.
@pytest.mark.parametrize("impl", ["lax", "s2d"])
def test_bfloat16_compute_keeps_float32_params_and_logits_close_to_float32(impl):
  images = jax.random.uniform(jax.random.key(1), (8, 28, 28, 1))
  full = models.create_model("cnn_pool_bn", rngs=nnx.Rngs(0), impl=impl)
  half = models.create_model("cnn_pool_bn", rngs=nnx.Rngs(0), impl=impl, compute_dtype="bfloat16")
  full.eval()
  half.eval()
  want, got = full(images), half(images)
  assert got.dtype == jnp.dtype(jnp.float32)  # Logits leave in float32, for the loss.
  assert {leaf.dtype for leaf in jax.tree.leaves(nnx.state(half, nnx.Param))} == {
    jnp.dtype(jnp.float32)
  }
  scale = float(jnp.max(jnp.abs(want)))
  assert float(jnp.max(jnp.abs(got - want))) < 0.05 * scale  # bfloat16 keeps ~3 digits.
  assert float(jnp.max(jnp.abs(got - want))) > 0  # It did compute in bfloat16.

  def loss(params, model):
    graphdef, _, rest = nnx.split(model, nnx.Param, ...)
    return nnx.merge(graphdef, params, rest)(images).sum()

  grads = jax.grad(loss)(nnx.state(half, nnx.Param), half)
  assert {leaf.dtype for leaf in jax.tree.leaves(grads)} == {jnp.dtype(jnp.float32)}


def _layer_features(model) -> list[int]:
  """Each Conv's filters and Dense's outputs, in order."""
  return [
    layer.kernel.shape[-1] if isinstance(layer, models.Conv) else layer.linear.out_features
    for layer in model.layers
    if isinstance(layer, (models.Conv, models.Dense))
  ]


def test_width_scales_every_conv_and_hidden_dense_layer():
  wide = models.build_model("cnn_pool", {"width": 2}, rngs=nnx.Rngs(0))
  assert _layer_features(wide) == [16, 32, 256, 64, 10]
  assert models.count_params(wide) == (226_954, 0)  # The count.
  narrow = models.build_model("cnn_pool_bn", {"width": 0.25}, rngs=nnx.Rngs(0))
  assert _layer_features(narrow) == [2, 4, 32, 8, 10]  # 8 * 0.25, 16 * 0.25, 128 / 4, 32 / 4.
  assert models.scaled(8, 0.3125) == 3 and models.scaled(8, 0.0625) == 1  # 2.5 up; at least 1.
  for name, counts in [("mlp", 104_938), ("cnn", 1_185_482), ("cnn_pool", 57_034)]:
    assert (
      models.count_params(models.build_model(name, {"width": 1}, rngs=nnx.Rngs(0)))[0] == counts
    )
  with pytest.raises(ConfigError, match=r"width 0: expected a positive number"):
    models.build_model("cnn", {"width": 0}, rngs=nnx.Rngs(0))


def test_the_family_adapts_to_the_input_shape_and_number_of_classes():
  kwargs = {"input_shape": [32, 32, 3], "num_classes": 5}
  mlp = models.build_model("mlp", kwargs, rngs=nnx.Rngs(0))
  assert models.count_params(mlp)[0] == 3072 * 128 + 128 + 128 * 32 + 32 + 32 * 5 + 5
  images = jax.random.uniform(jax.random.key(0), (2, 32, 32, 3))
  for name in models.model_names():
    model = models.build_model(name, kwargs, rngs=nnx.Rngs(0))
    model.eval()
    assert model(images).shape == (2, 5), name
  with pytest.raises(ConfigError, match=r"input_shape \[32, 32\]: expected \[height, width"):
    models.build_model("cnn", {"input_shape": [32, 32]}, rngs=nnx.Rngs(0))
  with pytest.raises(ConfigError, match=r"num_classes 0: expected a positive integer"):
    models.build_model("mlp", {"num_classes": 0}, rngs=nnx.Rngs(0))


@pytest.mark.parametrize("name", ["cnn_pool", "cnn_pool_bn"])
def test_the_fast_cpu_layouts_hold_at_every_width_and_shape(name):
  kwargs = {"width": 1.5, "input_shape": [20, 24, 2], "num_classes": 3}
  images = jax.random.uniform(jax.random.key(1), (4, 20, 24, 2))
  outputs = {}
  for impl in ("lax", "s2d"):
    model = models.build_model(name, kwargs, rngs=nnx.Rngs(0), impl=impl)
    model.eval()
    outputs[impl] = model(images)
  _assert_close_to_the_array(outputs["s2d"], outputs["lax"], LOGITS_ACROSS_IMPLS)


def _stack(kind: str) -> list[nnx.Module]:
  rngs = nnx.Rngs(params=0, dropout=1)
  conv = lambda c_in, c_out, **kw: layers.Conv(c_in, c_out, rngs=rngs, **kw)
  dense = lambda c_in: layers.Dense(c_in, 10, rngs=rngs)
  return {
    # Blocked conv into blocked conv, the Dense reading the blocks (the cnn's path).
    "conv_conv_dense": [conv(1, 4), conv(4, 6), layers.Flatten(), dense(6 * 6 * 6)],
    # Back to NHWC before Dropout, BatchNorm and a fused conv + pool.
    "conv_dropout_conv_pool": [
      conv(1, 4),
      layers.Dropout(0.3, rngs=rngs),
      layers.BatchNorm(4, rngs=rngs),
      conv(4, 6),
      layers.MaxPool(),
      layers.Flatten(),
      dense(4 * 4 * 6),
    ],
    # A conv without activation last: its blocks leave the model as NHWC.
    "conv_then_linear_conv": [conv(1, 4), conv(4, 3, activation=None)],
    # Odd outputs (9 x 9) do not tile into blocks: the plain convolution.
    "odd": [conv(1, 4), conv(4, 3), layers.Flatten(), dense(7 * 7 * 3)],
  }[kind]


@pytest.mark.parametrize(
  "kind, size, blocked_convs",
  [("conv_conv_dense", 10, 2), ("conv_dropout_conv_pool", 12, 1), ("conv_then_linear_conv", 10, 2)]
  + [("odd", 11, 0)],
)
def test_stacks_with_blocked_convolutions_compute_as_lax(kind, size, blocked_convs, monkeypatch):
  images = jax.random.uniform(jax.random.key(3), (5, size, size, 1))
  calls = []
  conv_blocks = layers.Layout.conv_blocks
  monkeypatch.setattr(
    layers.Layout,
    "conv_blocks",
    lambda self, *args, **kwargs: calls.append(1) or conv_blocks(self, *args, **kwargs),
  )

  def logits_and_grads(impl):
    model = models.Classifier(kind, _stack(kind), impl)
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)

    def loss(params):
      logits = nnx.merge(graphdef, params, rest, copy=True)(images)
      return jnp.sum(logits * jnp.arange(logits.shape[-1], dtype=jnp.float32)), logits

    grads, logits = jax.jit(jax.grad(loss, has_aux=True))(params)
    return logits, jax.tree.leaves(grads)

  (want, want_grads), (got, got_grads) = logits_and_grads("lax"), logits_and_grads("s2d")
  assert len(calls) == blocked_convs  # The s2d stack ran its convs blocked (lax: none).
  assert got.shape == want.shape
  np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=1e-5, rtol=1e-5)
  for got_grad, want_grad in zip(got_grads, want_grads, strict=True):
    scale = float(jnp.abs(want_grad).max())
    np.testing.assert_allclose(np.asarray(got_grad), np.asarray(want_grad), atol=1e-5 * scale)


def test_the_s2d_cnn_runs_both_convs_blocked_and_its_dense_on_the_blocks(monkeypatch):
  counts = {"conv_blocks": 0, "dense_of_blocks": 0, "unblock": 0}
  for name in counts:
    method = getattr(layers.Layout, name)

    def counted(self, *args, _name=name, _method=method, **kwargs):
      counts[_name] += 1
      return _method(self, *args, **kwargs)

    monkeypatch.setattr(layers.Layout, name, counted)
  model = models.create_model("cnn", rngs=nnx.Rngs(0), impl="s2d")
  assert model(jnp.zeros((2, 28, 28, 1))).shape == (2, 10)
  assert counts == {"conv_blocks": 2, "dense_of_blocks": 1, "unblock": 0}


def test_a_dense_of_the_wrong_size_after_blocks_fails_as_in_nhwc():
  rngs = nnx.Rngs(0)
  stack = [layers.Conv(1, 4, rngs=rngs), layers.Flatten(), layers.Dense(128, 2, rngs=rngs)]
  images = jnp.zeros((2, 10, 10, 1))  # 8 x 8 x 4 = 256 features, not 128.
  for impl in ("lax", "s2d"):
    with pytest.raises(TypeError, match="dot_general requires contracting dimensions"):
      models.Classifier("wrong", stack, impl)(images)
