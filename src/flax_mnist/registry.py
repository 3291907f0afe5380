"""Models by name: the registry of factories, names given as import paths, and building one.

A factory is any callable ``fn(*, rngs, **kwargs) -> nnx.Module`` whose module maps float NHWC
images in [0, 1] to logits; it is registered under a name (``@register("name")``) or named by
its import path, ``"package.module:factory"``, which is imported on use, so the CLI,
``evaluate.py`` and ``checkpoint.load_model`` find it in a fresh process. Factories of the
built-in family also take ``impl`` (their CPU layouts); others are never passed it.

A name read from a file (a workdir's config.json or checkpoint) is data, never code: an import
path there is imported only when the caller trusts it (``trust_code=True``; the scripts'
``--trust_model_code``), as Keras's ``safe_mode`` and ``torch.load(weights_only=True)`` do, and
``model_kwargs`` are checked against the factory's signature before any call.
"""

from __future__ import annotations

import importlib
import inspect
import warnings
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple

import jax
from flax import nnx

from flax_mnist.errors import ConfigError, UntrustedCodeError

Factory = Callable[..., nnx.Module]
_REGISTRY: dict[str, Factory] = {}
# Passed by the trainer, never by model_kwargs.
RESERVED_KWARGS = ("rngs", "impl", "compute_dtype")
_JSON_SCALARS = (str, int, float, bool, type(None))
_KINDS = {str: "a string", int: "an integer", float: "a number", bool: "true or false"}


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


def is_import_path(name: Any) -> bool:
  """Whether ``name`` names a factory by import path (not a registered name)."""
  return isinstance(name, str) and name not in _REGISTRY and ":" in name


def resolve_model(name: str, *, trust_code: bool = True) -> Factory:
  """The factory of a registered ``name`` or of an import path ``"package.module:factory"``.

  ``trust_code=False`` (a name read from a workdir) refuses an import path before importing
  anything (``UntrustedCodeError``). Raises ConfigError ("model 'x': ...") saying what was
  expected.
  """
  if isinstance(name, str) and name in _REGISTRY:
    return _REGISTRY[name]
  if not is_import_path(name):
    raise ConfigError(
      f"model {name!r}: unknown, expected one of {', '.join(_REGISTRY)} or an import path "
      "'package.module:factory' (a module on sys.path, a function returning an nnx.Module)"
    )
  if not trust_code:
    raise UntrustedCodeError(
      f"model {name!r}: an import path; importing it runs its code, so a model named in a "
      "workdir is imported only if you trust it: pass --trust_model_code "
      "(load_model(..., trust_model_code=True))"
    )
  module_name, _, attribute = name.partition(":")
  try:
    module = importlib.import_module(module_name)
  except ImportError as error:
    raise ConfigError(
      f"model {name!r}: cannot import {module_name!r} ({error}); is it on PYTHONPATH?"
    ) from None
  except Exception as error:  # noqa: BLE001 (a user's module may raise anything on import)
    raise ConfigError(
      f"model {name!r}: importing {module_name!r} raised {type(error).__name__}: "
      f"{_first_line(error)}"
    ) from error
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
  return build_model(name, kwargs, rngs=rngs, impl=impl, compute_dtype=compute_dtype)


def build_model(
  name: str,
  model_kwargs: Mapping[str, Any],
  *,
  rngs: nnx.Rngs,
  impl: str = "lax",
  compute_dtype: str = "float32",
  trust_code: bool = True,
  input_shape: Sequence[int] | None = None,
  num_classes: int | None = None,
) -> nnx.Module:
  """``create_model`` with the factory's arguments as one mapping (as a config or a workdir
  holds them): ``model_kwargs`` are checked against the factory's signature first, and whatever
  the factory raises or returns instead of a module is one line (ConfigError).
  ``trust_code=False``: ``name`` was read from a file (``resolve_model``). ``input_shape`` and
  ``num_classes`` (the data's) go to a factory that takes them, unless model_kwargs set them."""
  factory = resolve_model(name, trust_code=trust_code)
  if hasattr(model_kwargs, "to_dict"):  # A ConfigDict: its plain values.
    model_kwargs = model_kwargs.to_dict()
  check_model_kwargs(name, factory, model_kwargs)
  kwargs = dict(model_kwargs)
  parameters = _parameters(factory)
  if "impl" in parameters:
    kwargs["impl"] = impl
  if "compute_dtype" in parameters:
    kwargs["compute_dtype"] = compute_dtype
  for key, value in (("input_shape", input_shape), ("num_classes", num_classes)):
    if value is not None and key in parameters and key not in kwargs:
      kwargs[key] = list(value) if key == "input_shape" else value
  try:
    model = factory(rngs=rngs, **kwargs)
  except ConfigError:
    raise
  except Exception as error:  # noqa: BLE001 (a user's factory may raise anything)
    raise ConfigError(
      f"model {name!r}: its factory raised {type(error).__name__}: {_first_line(error)}"
    ) from error
  if not isinstance(model, nnx.Module):
    raise ConfigError(
      f"model {name!r}: its factory returned {type(model).__name__}, expected an nnx.Module"
    )
  return model


def _parameters(factory: Factory) -> Mapping[str, inspect.Parameter]:
  try:
    return inspect.signature(factory).parameters
  except (TypeError, ValueError):  # A builtin without a signature: nothing to check against.
    return {}


def _is_json(value: Any) -> bool:
  if isinstance(value, _JSON_SCALARS):
    return True
  if isinstance(value, (list, tuple)):
    return all(_is_json(item) for item in value)
  if isinstance(value, Mapping):
    return all(isinstance(key, str) and _is_json(item) for key, item in value.items())
  return False


def _same_kind(value: Any, default: Any) -> bool:
  """Whether ``value`` may stand where the factory's ``default`` does (an int for a float)."""
  if isinstance(default, bool) or isinstance(value, bool):
    return isinstance(value, bool) and isinstance(default, bool)
  if isinstance(default, float):
    return isinstance(value, (int, float))
  return isinstance(value, type(default))


def _kind(value: Any) -> str:
  return _KINDS.get(type(value), f"a {type(value).__name__}")


def check_model_kwargs(name: str, factory: Factory, kwargs: Mapping[str, Any]) -> None:
  """``model_kwargs`` fit ``factory`` before it is called: JSON values, no argument the trainer
  passes itself, every key a keyword parameter of the factory (unless it takes ``**kwargs``),
  and a value of the kind of the parameter's default (an int, a float, a string, a bool)."""
  where = f"config.model_kwargs of model {name!r}"
  parameters = _parameters(factory)
  keyword = {
    key: parameter
    for key, parameter in parameters.items()
    if parameter.kind in (parameter.KEYWORD_ONLY, parameter.POSITIONAL_OR_KEYWORD)
  }
  open_ended = any(p.kind is p.VAR_KEYWORD for p in parameters.values()) or not parameters
  accepted = sorted(key for key in keyword if key not in RESERVED_KWARGS)
  expected = f"expected one of {', '.join(accepted)}" if accepted else "it takes none"
  for key, value in kwargs.items():
    if not isinstance(key, str) or key in RESERVED_KWARGS:
      raise ConfigError(f"{where}: {key!r} is not an argument model_kwargs may set ({expected})")
    if key not in keyword and not open_ended:
      raise ConfigError(f"{where}: {key!r} is not an argument of its factory; {expected}")
    if not _is_json(value):
      raise ConfigError(
        f"{where}: {key} {value!r:.60} is {_kind(value)}, expected a JSON value "
        "(a number, string, bool, list or mapping)"
      )
    default = keyword[key].default if key in keyword else inspect.Parameter.empty
    if isinstance(default, _JSON_SCALARS[:-1]) and not _same_kind(value, default):
      raise ConfigError(
        f"{where}: {key} {value!r:.60} is {_kind(value)}, expected "
        f"{_KINDS[type(default)]} like its default {default!r}"
      )


def _first_line(error: BaseException) -> str:
  lines = str(error).strip().splitlines()
  return lines[0][:200] if lines else type(error).__name__


class SeedKeys(NamedTuple):
  """Every random key a run draws, each derived from its seed by ``seed_keys``."""

  params: jax.Array  # The initial parameters.
  dropout: jax.Array  # Dropout masks (its own PRNG implementation: rbg on CPU).
  shuffle: jax.Array  # Each epoch's order: ``epoch_shuffle_key``.


def seed_keys(seed: int, dropout_rng_impl: str) -> SeedKeys:
  """The keys of ``seed``: params ``fold_in(key(seed), 0)``, dropout
  ``fold_in(key(seed, impl=dropout_rng_impl), 1)``, shuffle ``fold_in(key(seed), 2)``."""
  seed_key = jax.random.key(seed)
  return SeedKeys(
    params=jax.random.fold_in(seed_key, 0),
    dropout=jax.random.fold_in(jax.random.key(seed, impl=dropout_rng_impl), 1),
    shuffle=jax.random.fold_in(seed_key, 2),
  )


def epoch_shuffle_key(shuffle_key: jax.Array, epoch: int) -> jax.Array:
  """The key of epoch ``epoch``'s order (1-based): ``fold_in(shuffle_key, epoch)``, so a resumed
  run draws the order the uninterrupted one would have."""
  return jax.random.fold_in(shuffle_key, epoch)


def init_model(
  name: str,
  seed: int,
  *,
  impl: str,
  dropout_rng_impl: str,
  model_kwargs: Mapping[str, Any] | None = None,
  compute_dtype: str = "float32",
  trust_code: bool = True,
  input_shape: Sequence[int] | None = None,
  num_classes: int | None = None,
) -> nnx.Module:
  """Model ``name`` initialised from ``seed`` (its params and dropout keys, ``seed_keys``), in
  train mode.

  ``impl`` and ``dropout_rng_impl`` are concrete (resolved by the config: no "auto").
  ``trust_code=False``: ``name`` was read from a file (``resolve_model``).
  """
  resolve_model(name, trust_code=trust_code)  # Before anything is drawn or imported.
  keys = seed_keys(seed, dropout_rng_impl)
  rngs = nnx.Rngs(params=keys.params, dropout=keys.dropout)
  model = build_model(
    name,
    model_kwargs or {},
    rngs=rngs,
    impl=impl,
    compute_dtype=compute_dtype,
    trust_code=trust_code,
    input_shape=input_shape,
    num_classes=num_classes,
  )
  model.train()
  return model


def takes_argument(name: str, argument: str) -> bool:
  """Whether the factory of model ``name`` takes the keyword ``argument`` (``compute_dtype``,
  ``input_shape``...): only then does ``build_model`` pass it."""
  return argument in _parameters(resolve_model(name))


def takes_mask(model: nnx.Module) -> bool:
  """Whether ``model(images, mask=...)`` is accepted (the family's Classifier: a padded last
  batch's padding then stays out of BatchNorm's statistics)."""
  try:
    return "mask" in inspect.signature(type(model).__call__).parameters
  except (TypeError, ValueError):
    return False
