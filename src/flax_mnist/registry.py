"""Models by name: the registry of factories, names given as import paths, and building one.

A factory is any callable ``fn(*, rngs, **kwargs) -> nnx.Module`` whose module maps float NHWC
images in [0, 1] to logits; it is registered under a name (``@register("name")``) or named by
its import path, ``"package.module:factory"``, which is imported on use, so the CLI,
``evaluate.py`` and ``checkpoint.load_model`` find it in a fresh process. Factories of the
built-in family also take ``impl`` (their CPU layouts); others are never passed it.
"""

from __future__ import annotations

import importlib
import inspect
import warnings
from collections.abc import Callable, Mapping
from typing import Any

import jax
from flax import nnx

from flax_mnist.errors import ConfigError

Factory = Callable[..., nnx.Module]
_REGISTRY: dict[str, Factory] = {}


def register(name: str) -> Callable[[Factory], Factory]:
  """Registers a model factory under ``name``. Registering a name again (a notebook cell run
  twice) replaces the factory, with a warning."""

  def decorator(factory: Factory) -> Factory:
    if name in _REGISTRY and _REGISTRY[name] is not factory:
      warnings.warn(f"model {name!r} was registered already: replaced", stacklevel=2)
    _REGISTRY[name] = factory
    return factory

  return decorator


def model_names() -> list[str]:
  """The registered model names, in registration order."""
  return list(_REGISTRY)


def resolve_model(name: str) -> Factory:
  """The factory of a registered ``name`` or of an import path ``"package.module:factory"``.

  Raises ConfigError ("model 'x': ...") saying what was expected.
  """
  if name in _REGISTRY:
    return _REGISTRY[name]
  if not isinstance(name, str) or ":" not in name:
    raise ConfigError(
      f"model {name!r}: unknown, expected one of {', '.join(_REGISTRY)} or an import path "
      "'package.module:factory' (a module on sys.path, a function returning an nnx.Module)"
    )
  module_name, _, attribute = name.partition(":")
  try:
    module = importlib.import_module(module_name)
  except ImportError as error:
    raise ConfigError(
      f"model {name!r}: cannot import {module_name!r} ({error}); is it on PYTHONPATH?"
    ) from None
  factory = getattr(module, attribute, None)
  if not callable(factory):
    raise ConfigError(f"model {name!r}: module {module_name!r} has no callable {attribute!r}")
  return factory


def create_model(
  name: str,
  *,
  rngs: nnx.Rngs,
  impl: str = "lax",
  compute_dtype: str = "float32",
  **kwargs: Any,
) -> nnx.Module:
  """Builds model ``name`` (registered or an import path) with parameters drawn from ``rngs``.

  ``impl`` (one of ``layers.IMPLS``, not "auto") and ``compute_dtype`` (float32 or bfloat16)
  are passed only to factories that take them (the built-in family's layouts; all compute the
  same function). ``kwargs`` go to the factory.
  ``rngs`` needs a ``params`` stream and, for models with dropout, a ``dropout`` stream.
  """
  factory = resolve_model(name)
  parameters = inspect.signature(factory).parameters
  if "impl" in parameters:
    kwargs["impl"] = impl
  if "compute_dtype" in parameters:
    kwargs["compute_dtype"] = compute_dtype
  return factory(rngs=rngs, **kwargs)


def init_model(
  name: str,
  seed: int,
  *,
  impl: str,
  dropout_rng_impl: str,
  model_kwargs: Mapping[str, Any] | None = None,
  compute_dtype: str = "float32",
) -> nnx.Module:
  """Model ``name`` initialised from ``seed``, in train mode: the parameters from
  ``fold_in(key(seed), 0)``, dropout masks from ``fold_in(key(seed, impl=dropout_rng_impl), 1)``.

  ``impl`` and ``dropout_rng_impl`` are concrete (resolved by the config: no "auto").
  """
  seed_key = jax.random.key(seed)
  dropout_key = jax.random.fold_in(jax.random.key(seed, impl=dropout_rng_impl), 1)
  rngs = nnx.Rngs(params=jax.random.fold_in(seed_key, 0), dropout=dropout_key)
  model = create_model(
    name, impl=impl, rngs=rngs, compute_dtype=compute_dtype, **dict(model_kwargs or {})
  )
  model.train()
  return model


def takes_mask(model: nnx.Module) -> bool:
  """Whether ``model(images, mask=...)`` is accepted (the family's Classifier: a padded last
  batch's padding then stays out of BatchNorm's statistics)."""
  try:
    return "mask" in inspect.signature(type(model).__call__).parameters
  except (TypeError, ValueError):
    return False
