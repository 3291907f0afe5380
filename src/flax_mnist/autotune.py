"""Layer implementations side by side: a few real training steps of a model under each.

Implementations (``layers.IMPLS``) compute the same function but differ in speed from machine to
machine. ``time_impls`` compiles the real training epoch (``steps.make_train_epoch``) of the model
for each candidate on a few batches and times them interleaved: ``benchmarks/time_layouts.py``
uses it for the table that decides which layouts the project keeps.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
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
  batch_size: int = 512,
  steps: int = 5,
  repeats: int = 3,
  seed: int = 0,
  tx: optax.GradientTransformation | None = None,
  dropout_rng_impl: str = "threefry2x32",
  model_kwargs: Mapping[str, Any] | None = None,
  images: jax.Array | None = None,
  labels: jax.Array | None = None,
) -> dict[str, float]:
  """Seconds per training step of ``model_name`` under each impl of ``candidates``.

  Each candidate's epoch over ``steps`` batches (``images``/``labels``, default random
  uint8 images) is compiled and run once to warm up; then the candidates run in turn
  ``repeats`` times (interleaved, so that a drift of the machine hits them alike), and each
  keeps its fastest run. ``tx`` defaults to Adam; pass the run's optimizer and
  ``dropout_rng_impl`` to time exactly its step.
  """
  if not candidates:
    raise ValueError("time_impls: no candidate implementations")
  count = batch_size * steps
  if images is None:
    keys = jax.random.split(jax.random.key(seed), 2)
    images = jax.random.randint(keys[0], (count, 28, 28, 1), 0, 256).astype(jnp.uint8)
    labels = jax.random.randint(keys[1], (count,), 0, 10)
  images, labels = images[:count], labels[:count]
  tx = tx if tx is not None else optax.adam(1e-3)
  runs = {}
  for impl in candidates:
    model = models.init_model(
      model_name,
      seed,
      impl=impl,
      dropout_rng_impl=dropout_rng_impl,
      **({"model_kwargs": model_kwargs} if model_kwargs else {}),
    )
    graphdef, params, model_state = nnx.split(model, nnx.Param, ...)
    epoch = steps_lib.make_train_epoch(graphdef, tx, batch_size, shuffle=False)
    state = steps_lib.TrainState(params, model_state, tx.init(params))
    arguments = (state, images, labels, jax.random.key(seed))
    compiled = epoch.lower(*arguments).compile()
    jax.block_until_ready(compiled(*arguments))  # Warm up.
    runs[impl] = (compiled, arguments)
  best = dict.fromkeys(candidates, float("inf"))
  for _ in range(repeats):
    for impl, (compiled, arguments) in runs.items():
      started = time.perf_counter()
      jax.block_until_ready(compiled(*arguments))
      best[impl] = min(best[impl], (time.perf_counter() - started) / steps)
  return best
