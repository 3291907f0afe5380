"""Tests for flax_mnist.nn: the drop-ins compute what flax.nnx's layers compute, values and
gradients, on CPU's matmul path; the fused conv-pool block equals the layers it replaces."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from flax_mnist import nn

CASES = [
  {"kernel_size": (3, 3), "padding": "VALID"},
  {"kernel_size": (5, 3), "strides": 2},  # nnx's default padding: SAME.
  {"kernel_size": (2, 2), "strides": (2, 1), "padding": ((1, 0), (2, 1)), "use_bias": False},
]


def _pair(case, in_features=3, out_features=5):
  stock = nnx.Conv(in_features, out_features, rngs=nnx.Rngs(0), **case)
  dropin = nn.Conv(in_features, out_features, rngs=nnx.Rngs(0), **case)
  return stock, dropin


@pytest.mark.parametrize("case", CASES, ids=str)
def test_conv_is_nnx_conv_in_parameters_values_and_gradients(case):
  stock, dropin = _pair(case)
  assert jax.tree.structure(nnx.state(stock)) == jax.tree.structure(nnx.state(dropin))
  for a, b in zip(jax.tree.leaves(nnx.state(stock)), jax.tree.leaves(nnx.state(dropin))):
    np.testing.assert_array_equal(a, b)
  assert dropin._matmul_padding(jnp.zeros((2, 11, 9, 3))) is not None  # The matmul path runs.
  images = jax.random.uniform(jax.random.key(1), (2, 11, 9, 3))

  def outputs_and_grads(model):
    graphdef, state = nnx.split(model)
    loss = lambda state, images: jnp.sum(jnp.sin(nnx.merge(graphdef, state)(images)))
    outputs = jax.jit(lambda state: nnx.merge(graphdef, state)(images))(state)
    return outputs, jax.jit(jax.value_and_grad(loss))(state, images)

  want_outputs, (want, want_grads) = outputs_and_grads(stock)
  got_outputs, (got, got_grads) = outputs_and_grads(dropin)
  assert got_outputs.shape == want_outputs.shape
  # Float32 sums of at most 45 products in another order: measured differences below 3e-6.
  np.testing.assert_allclose(got_outputs, want_outputs, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(got, want, rtol=1e-5)
  for a, b in zip(jax.tree.leaves(got_grads), jax.tree.leaves(want_grads)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)


def test_conv_falls_back_to_nnx_where_the_matmul_path_does_not_apply():
  dilated = nn.Conv(3, 4, (3, 3), kernel_dilation=2, rngs=nnx.Rngs(0))
  grouped = nn.Conv(4, 4, (3, 3), feature_group_count=2, rngs=nnx.Rngs(0))
  cropped = nn.Conv(3, 4, (3, 3), padding=((-1, 2), (0, 0)), rngs=nnx.Rngs(0))
  wide = nn.Conv(3, 4, (3, 3), preferred_element_type=jnp.float32, rngs=nnx.Rngs(0))
  for conv, channels in ((dilated, 3), (grouped, 4), (cropped, 3), (wide, 3)):
    images = jnp.ones((1, 9, 9, channels))
    assert conv._matmul_padding(images) is None
    assert conv(images).shape == nnx.Conv.__call__(conv, images).shape


def test_max_pool_is_nnx_max_pool_in_values_and_gradients():
  images = jax.random.normal(jax.random.key(0), (2, 9, 8, 3))  # An odd edge, dropped.
  for window, strides in (((2, 2), (2, 2)), ((3, 3), (3, 3)), ((3, 3), (2, 2))):
    want = nnx.max_pool(images, window, strides)
    np.testing.assert_array_equal(nn.max_pool(images, window, strides), want)
    grads = [
      jax.jit(jax.grad(lambda x, pool=pool, w=window, s=strides: jnp.sum(pool(x, w, s) ** 2)))(
        images
      )
      for pool in (nn.max_pool, nnx.max_pool)
    ]
    np.testing.assert_array_equal(*grads)


def test_conv_pool_is_the_layers_it_fuses():
  conv = nn.Conv(3, 6, (3, 3), rngs=nnx.Rngs(2))  # SAME: padded, then the valid s2d block.
  images = jax.random.uniform(jax.random.key(3), (2, 12, 11, 3))
  reference = lambda x: nnx.max_pool(nnx.relu(nnx.Conv.__call__(conv, x)), (2, 2), (2, 2))
  fused = lambda x: nn.conv_pool(conv, x)
  np.testing.assert_allclose(jax.jit(fused)(images), reference(images), rtol=1e-5, atol=1e-6)
  got = jax.jit(jax.grad(lambda x: jnp.sum(fused(x) ** 2)))(images)
  want = jax.jit(jax.grad(lambda x: jnp.sum(reference(x) ** 2)))(images)
  np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)


def test_stock_convs_are_found_and_drop_ins_are_not():
  class Mixed(nnx.Module):
    def __init__(self, rngs):
      self.first = nnx.Conv(1, 2, (3, 3), rngs=rngs)
      self.second = nn.Conv(2, 2, (3, 3), rngs=rngs)
      self.third = nnx.Conv(2, 2, (3, 3), rngs=rngs)

  assert nn.stock_convs(Mixed(nnx.Rngs(0))) == ["first", "third"]
