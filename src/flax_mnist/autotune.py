"""Layer implementations side by side: a few real training steps of a model under each.

Implementations (``layers.IMPLS``) compute the same function but differ in speed from machine to
machine. ``time_impls`` compiles the real training epoch (``steps.make_train_epoch``) of the model
for each candidate on a few batches and times them interleaved: ``benchmarks/time_layouts.py``
uses it for the table that decides which layouts the project keeps.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from flax_mnist import models
from flax_mnist import steps as steps_lib


def time_impls(
  model_name: str,
  candidates: Sequence[str],
  *,
  seed: int = 0,
  dropout_rng_impl: str = "threefry2x32",
  model_kwargs: Mapping[str, Any] | None = None,
  **timing: Any,
) -> dict[str, float]:
  """Seconds per training step of ``model_name`` under each impl of ``candidates``.

  Each candidate's epoch over ``steps`` batches (``images``/``labels``, default random
  uint8 images) is compiled and run once to warm up; then the candidates run in turn
  ``repeats`` times (interleaved, so that a drift of the machine hits them alike), and each
  keeps its fastest run. ``timing``: ``time_models``'s keywords (``batch_size``, ``steps``,
  ``repeats``, ``tx``, ``images``, ``labels``); ``tx`` defaults to Adam; pass the run's optimizer
  and ``dropout_rng_impl`` to time exactly its step.
  """
  if not candidates:
    raise ValueError("time_impls: no candidate implementations")
  kwargs = {"model_kwargs": model_kwargs} if model_kwargs else {}
  build = functools.partial(models.init_model, model_name, seed, **kwargs)
  builders = {
    impl: functools.partial(build, impl=impl, dropout_rng_impl=dropout_rng_impl)
    for impl in candidates
  }
  return time_models(builders, seed=seed, **timing)


def time_models(
  builders: Mapping[str, Callable[[], nnx.Module]],
  *,
  batch_size: int = 512,
  steps: int = 5,
  repeats: int = 3,
  seed: int = 0,
  tx: optax.GradientTransformation | None = None,
  images: jax.Array | None = None,
  labels: jax.Array | None = None,
  python_loop: Sequence[str] = (),
) -> dict[str, float]:
  """Seconds per training step of each model ``builders[name]()`` builds, as ``time_impls``
  times them: the trainer's compiled epoch (a ``lax.scan`` over the batches) over ``steps``
  batches, interleaved, the fastest of ``repeats`` runs. The names in ``python_loop`` run as a
  Python loop of one jitted step per batch instead (the same ``steps.train_step``)."""
  count = batch_size * steps
  if images is None:
    keys = jax.random.split(jax.random.key(seed), 2)
    images = jax.random.randint(keys[0], (count, 28, 28, 1), 0, 256).astype(jnp.uint8)
    labels = jax.random.randint(keys[1], (count,), 0, 10)
  images, labels = images[:count], labels[:count]
  tx = tx if tx is not None else optax.adam(1e-3)
  runs = {
    name: _compiled_epoch(build(), tx, batch_size, images, labels, seed, name in python_loop)
    for name, build in builders.items()
  }
  best = dict.fromkeys(builders, float("inf"))
  for _ in range(repeats):
    for name, run in runs.items():
      started = time.perf_counter()
      jax.block_until_ready(run())
      best[name] = min(best[name], (time.perf_counter() - started) / steps)
  return best


def _compiled_epoch(
  model: nnx.Module,
  tx: optax.GradientTransformation,
  batch_size: int,
  images: jax.Array,
  labels: jax.Array,
  seed: int,
  python_loop: bool,
) -> Callable[[], Any]:
  """A call that trains ``model`` for one epoch over ``images``, compiled and warmed up."""
  graphdef, params, model_state = nnx.split(model, nnx.Param, ...)
  state = steps_lib.TrainState(params, model_state, tx.init(params))
  if python_loop:
    step = jax.jit(functools.partial(steps_lib.train_step, graphdef, tx))
    batches = [
      (images[start : start + batch_size], labels[start : start + batch_size], None)
      for start in range(0, images.shape[0], batch_size)
    ]

    def run():
      carry = (state, steps_lib.zero_metrics())
      for batch in batches:
        carry = step(carry, batch)
      return carry

  else:
    epoch = steps_lib.make_train_epoch(graphdef, tx, batch_size, shuffle=False)
    arguments = (state, images, labels, jax.random.key(seed))
    compiled = epoch.lower(*arguments).compile()
    run = functools.partial(compiled, *arguments)
  jax.block_until_ready(run())  # Warm up (and, for the loop, compile).
  return run
