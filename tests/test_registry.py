"""Tests for flax_mnist.registry: a name read from a workdir imports nothing untrusted,
model_kwargs fit the factory's signature before it is called, every key comes from the seed."""

from __future__ import annotations

import sys

import jax
import numpy as np
import pytest
from flax import nnx

from flax_mnist import models, registry
from flax_mnist.errors import ConfigError, UntrustedCodeError


@pytest.fixture
def marker_module(tmp_path, monkeypatch):
  """A module on sys.path that leaves a file behind when it is imported."""
  marker = tmp_path / "imported"
  (tmp_path / "marking_models.py").write_text(
    f"open({str(marker)!r}, 'w').write('ran')\n"
    "from flax import nnx\n\n\n"
    "def net(*, rngs, width: int = 4, rate: float = 0.5, name: str = 'x', flag: bool = False):\n"
    "  return nnx.Linear(784, 10, rngs=rngs)\n"
  )
  monkeypatch.syspath_prepend(str(tmp_path))
  yield marker
  sys.modules.pop("marking_models", None)


def test_an_untrusted_import_path_is_refused_before_anything_is_imported(marker_module):
  with pytest.raises(UntrustedCodeError, match="'marking_models:net': an import path; .*--trust"):
    registry.resolve_model("marking_models:net", trust_code=False)
  with pytest.raises(UntrustedCodeError):
    registry.init_model(
      "marking_models:net", 0, impl="lax", dropout_rng_impl="rbg", trust_code=False
    )
  assert not marker_module.exists() and "marking_models" not in sys.modules
  assert registry.resolve_model("cnn", trust_code=False) is models.cnn  # Registered: no opt-in.
  assert callable(registry.resolve_model("marking_models:net", trust_code=True))
  assert marker_module.read_text() == "ran"


@pytest.mark.parametrize(
  "kwargs, message",
  [
    ({"widht": 8}, "'widht' is not an argument of its factory; expected one of flag, name, rate"),
    ({"rngs": 1}, "'rngs' is not an argument model_kwargs may set"),
    ({"impl": "lax"}, "'impl' is not an argument model_kwargs may set"),
    ({"width": "8"}, "width '8' is a string, expected an integer like its default 4"),
    ({"width": 8.0}, "width 8.0 is a number, expected an integer like its default 4"),
    ({"width": True}, "width True is true or false, expected an integer like its default 4"),
    ({"flag": 1}, "flag 1 is an integer, expected true or false like its default False"),
    ({"name": object()}, "name <object object at .*> is a object, expected a JSON value"),
  ],
)
def test_model_kwargs_that_do_not_fit_the_factory_are_refused_before_the_call(
  marker_module, kwargs, message
):
  factory = registry.resolve_model("marking_models:net")
  with pytest.raises(ConfigError, match="config.model_kwargs of model 'm': " + message):
    registry.check_model_kwargs("m", factory, kwargs)
  registry.check_model_kwargs("m", factory, {"width": 8, "rate": 1, "name": "y", "flag": True})


def test_a_factory_that_raises_or_returns_no_module_is_one_line(monkeypatch):
  def broken(*, rngs):
    raise ValueError("needs a GPU\nsecond line")

  def nothing(*, rngs):
    return None

  for factory, message in (
    (broken, "model 'broken': its factory raised ValueError: needs a GPU$"),
    (nothing, "model 'nothing': its factory returned NoneType, expected an nnx.Module"),
  ):
    monkeypatch.setitem(registry._REGISTRY, factory.__name__, factory)
    with pytest.raises(ConfigError, match=message):
      registry.create_model(factory.__name__, rngs=nnx.Rngs(0))


def test_every_key_is_derived_from_the_seed_in_one_place():
  keys = registry.seed_keys(3, "rbg")
  data = lambda key: np.asarray(jax.random.key_data(key))
  np.testing.assert_array_equal(data(keys.params), data(jax.random.fold_in(jax.random.key(3), 0)))
  np.testing.assert_array_equal(data(keys.shuffle), data(jax.random.fold_in(jax.random.key(3), 2)))
  rbg = jax.random.fold_in(jax.random.key(3, impl="rbg"), 1)
  assert jax.random.key_impl(keys.dropout) == jax.random.key_impl(rbg)
  np.testing.assert_array_equal(data(keys.dropout), data(rbg))
  epoch_2 = registry.epoch_shuffle_key(keys.shuffle, 2)
  np.testing.assert_array_equal(data(epoch_2), data(jax.random.fold_in(keys.shuffle, 2)))
  assert not np.array_equal(data(epoch_2), data(registry.epoch_shuffle_key(keys.shuffle, 3)))
  assert not np.array_equal(data(registry.seed_keys(4, "rbg").params), data(keys.params))
