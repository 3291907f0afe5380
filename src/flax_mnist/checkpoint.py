"""Checkpoints with orbax: the best epoch by validation accuracy, and the latest for resuming.

A workdir holds two orbax CheckpointManagers, kept apart on purpose (orbax's ``best_fn``
with ``max_to_keep`` would delete the latest checkpoint whenever validation worsens):

  ``checkpoints/best/<epoch>``    written only when the best metric strictly improves
                                  (Keras ModelCheckpoint ``save_best_only``): val accuracy
                                  by default, or val loss (``config.best_metric``);
  ``checkpoints/latest/<epoch>``  written every epoch, to resume an interrupted run.

Each checkpoint holds ``state`` (model params, BatchNorm statistics and dropout RNG,
optimizer state) and ``meta`` (JSON: epoch, metrics, model name, config). Orbax writes
to a temporary directory and renames it, so an interrupted save never corrupts the
previous checkpoint. This is the only module that imports orbax.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import zlib
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from flax import nnx

from flax_mnist import models, sharding
from flax_mnist import workdir as workdir_module
from flax_mnist.config import BEST_METRICS, resolve_impl
from flax_mnist.errors import CheckpointError

KINDS = ("best", "latest")


def checksum(tree: Any) -> int:
  """CRC-32 of every array of ``tree`` (bytes, in tree order; PRNG keys by their key data)."""
  value = 0
  for leaf in jax.tree.leaves(tree):
    if jax.dtypes.issubdtype(leaf.dtype, jax.dtypes.prng_key):
      leaf = jax.random.key_data(leaf)
    value = zlib.crc32(np.ascontiguousarray(sharding.to_host(leaf)).tobytes(), value)
  return value


def _checksums(state: Any) -> dict[str, int]:
  """``checksum`` of each part of a checkpointed state ({"params", "model_state", ...})."""
  return {part: checksum(value) for part, value in state.items()}


def _abstract(tree: Any) -> Any:
  return jax.tree_util.tree_map(ocp.utils.to_shape_dtype_struct, tree)


@contextlib.contextmanager
def _quiet(active: bool):
  """Raises absl's log threshold to ERROR while ``active`` (orbax logs through absl)."""
  logger = logging.getLogger("absl")
  level = logger.level
  if active:
    logger.setLevel(logging.ERROR)
  try:
    yield
  finally:
    logger.setLevel(level)


class Checkpoints:
  """The best and latest checkpoints of one workdir."""

  def __init__(
    self,
    directory: str | os.PathLike,
    *,
    read_only: bool = False,
    best_metric: str = "val_accuracy",
  ):
    if best_metric not in BEST_METRICS:
      raise CheckpointError(
        f"best metric {best_metric!r}: unknown, expected one of {', '.join(BEST_METRICS)}"
      )
    self.best_metric = best_metric
    self._maximize = BEST_METRICS[best_metric] == "max"
    self.directory = workdir_module.absolute(directory) / workdir_module.CHECKPOINTS_DIR
    # One barrier key per manager: two managers saving the same epoch in a multi-process run
    # otherwise clash on orbax's barrier ("already ongoing") and abort (1 run in 3, measured).
    # Read-only: no saving interval and no retention to warn about; orbax still logs that the
    # directory is read only, which is what was asked (silenced: one line per manager per load).
    with _quiet(read_only):
      self._managers = {
        kind: ocp.CheckpointManager(
          self.directory / kind,
          options=ocp.CheckpointManagerOptions(
            max_to_keep=None if read_only else 1,
            save_interval_steps=0 if read_only else 1,
            create=not read_only,
            read_only=read_only,
            multiprocessing_options=ocp.options.MultiprocessingOptions(
              barrier_sync_key_prefix=kind
            ),
          ),
        )
        for kind in KINDS
      }
    self._best_value: float | None = None

  def epoch(self, kind: str) -> int | None:
    """The epoch of the ``kind`` checkpoint, or None if there is none."""
    return self._manager(kind).latest_step()

  def save(self, kind: str, epoch: int, state: Any, meta: dict[str, Any]) -> None:
    """Saves ``state`` (a pytree) and ``meta`` (JSON-able) as ``kind`` checkpoint of ``epoch``;
    ``meta`` also gets a CRC-32 of each part of ``state``, checked on restore."""
    if "checksums" not in meta:  # save_epoch computes them once for both checkpoints.
      meta = {**meta, "checksums": _checksums(state)}
    self._manager(kind).save(
      epoch,
      args=ocp.args.Composite(state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)),
    )

  def best_value(self) -> float:
    """The best checkpoint's value of the best metric; -inf (+inf for a loss) if there is none."""
    if self._best_value is None:  # Read once; save_epoch keeps it current.
      worst = -math.inf if self._maximize else math.inf
      self._best_value = (
        worst if self.epoch("best") is None else self.restore_meta("best")[self.best_metric]
      )
    return self._best_value

  def save_epoch(self, epoch: int, state: Any, meta: dict[str, Any]) -> bool:
    """Saves ``epoch`` as the latest checkpoint, and as the best if ``meta[best_metric]`` strictly
    improves on the best so far (as Keras's ``save_best_only``). Returns whether it was the best.
    """
    value = meta[self.best_metric]
    is_best = value > self.best_value() if self._maximize else value < self.best_value()
    meta = {**meta, "checksums": _checksums(state)}  # One host read of the state, not two.
    # Best before latest: a crash between the two re-runs this epoch on resume, never loses a best.
    if is_best:
      self.save("best", epoch, state, meta)
      self._best_value = value
    self.save("latest", epoch, state, meta)
    return is_best

  def step_dir(self, kind: str) -> str:
    """``<workdir>/checkpoints/<kind>/<epoch>``: what error messages name."""
    return f"{self.directory / kind / str(self.epoch(kind))}"

  def restore_meta(self, kind: str) -> dict[str, Any]:
    """The JSON metadata of the ``kind`` checkpoint."""
    epoch = self._require(kind)
    args = ocp.args.Composite(meta=ocp.args.JsonRestore())
    with self._damage_as_error(kind):
      return self._manager(kind).restore(epoch, args=args)["meta"]

  def restore(self, kind: str, template: Any) -> tuple[Any, dict[str, Any]]:
    """Restores the ``kind`` checkpoint into a pytree shaped like ``template``: (state, meta).
    A checkpoint whose arrays do not match their saved checksums is a CheckpointError."""
    epoch = self._require(kind)
    args = ocp.args.Composite(
      state=ocp.args.StandardRestore(_abstract(template)), meta=ocp.args.JsonRestore()
    )
    with self._damage_as_error(kind):
      restored = self._manager(kind).restore(epoch, args=args)
    self._verify(kind, restored["state"], restored["meta"])
    return restored["state"], restored["meta"]

  def restore_model(self, kind: str, template: Any) -> tuple[Any, dict[str, Any]]:
    """Restores only the model (``template``: {"params", "model_state"}) of the ``kind``
    checkpoint, whatever optimizer state is saved beside it: (state, meta), checksums checked."""
    epoch = self._require(kind)
    item = _abstract(template)
    args = ocp.args.PyTreeRestore(
      item=item,
      restore_args=ocp.checkpoint_utils.construct_restore_args(item),
      partial_restore=True,
    )
    meta = self.restore_meta(kind)
    with self._damage_as_error(kind):
      state = self._manager(kind).restore(epoch, args=ocp.args.Composite(state=args))["state"]
    self._verify(kind, state, meta)
    return state, meta

  @contextlib.contextmanager
  def _damage_as_error(self, kind: str):
    """Whatever orbax raises on a truncated, missing or mismatched file becomes one line."""
    try:
      yield
    except CheckpointError:
      raise
    except Exception as error:  # noqa: BLE001 (orbax raises many types for one cause)
      lines = str(error).strip().splitlines()
      reason = f"{type(error).__name__}: {lines[0][:200]}" if lines else type(error).__name__
      raise CheckpointError(
        f"{self.step_dir(kind)}: cannot be restored ({reason}): it is damaged or incomplete, or "
        "was written for another model"
      ) from None

  def _verify(self, kind: str, state: Any, meta: dict[str, Any]) -> None:
    """Compares each restored part's CRC-32 with the one saved beside it (older checkpoints
    have none: nothing to compare)."""
    saved = meta.get("checksums", {})
    for part, value in state.items():
      if part in saved and checksum(value) != saved[part]:
        raise CheckpointError(
          f"{self.step_dir(kind)}: damaged: its {part} do not match the checksum saved with them"
        )

  def wait(self) -> None:
    """Blocks until asynchronous saves have finished."""
    for manager in self._managers.values():
      manager.wait_until_finished()

  def close(self) -> None:
    """Waits for pending saves and releases the managers."""
    for manager in self._managers.values():
      manager.close()

  def _manager(self, kind: str) -> ocp.CheckpointManager:
    if kind not in self._managers:
      raise CheckpointError(f"checkpoint {kind!r}: unknown, expected one of {', '.join(KINDS)}")
    return self._managers[kind]

  def _require(self, kind: str) -> int:
    epoch = self.epoch(kind)
    if epoch is None:
      raise CheckpointError(
        f"{self.directory / kind}: no {kind} checkpoint (has this workdir been trained?)"
      )
    return epoch


def _load(checkpoints: Checkpoints, which: str) -> tuple[nnx.Module, dict[str, Any]]:
  meta = checkpoints.restore_meta(which)
  config = meta["config"]
  model = models.init_model(
    config["model"],
    config["seed"],
    impl=resolve_impl("auto"),
    dropout_rng_impl=config["dropout_rng_impl"],
    model_kwargs=config.get("model_kwargs") or {},
    compute_dtype=config.get("compute_dtype", "float32"),
  )
  graphdef, params, model_state = nnx.split(model, nnx.Param, ...)
  state, _ = checkpoints.restore_model(which, {"params": params, "model_state": model_state})
  model = nnx.merge(graphdef, state["params"], state["model_state"])
  model.eval()
  return model, meta


def load_model(
  workdir: str | os.PathLike, which: str = "best", *, fallback: bool = True
) -> tuple[nnx.Module, dict[str, Any]]:
  """Loads the ``which`` ("best" or "latest") checkpoint of a training workdir.

  Returns ``(model, info)``: the model in eval mode, and the checkpoint's metadata: ``epoch``,
  ``val_accuracy``, ``val_loss``, ``model`` (its name), ``config`` (as trained). The layer
  implementation is this platform's (all compute the same function); the dropout PRNG is the
  recorded one, since its key is part of the checkpoint. Only the model is restored (params,
  BatchNorm statistics), whatever the optimizer was. If that checkpoint is damaged and the other
  one is intact (and ``fallback``), the other is loaded and ``info["fallback"]`` says so.
  """
  if not (workdir_module.path(workdir) / workdir_module.CHECKPOINTS_DIR).is_dir():
    raise CheckpointError(
      f"{workdir}: no checkpoints directory (expected a workdir written by train.py)"
    )
  if which not in KINDS:
    raise CheckpointError(f"checkpoint {which!r}: unknown, expected one of {', '.join(KINDS)}")
  checkpoints = Checkpoints(workdir, read_only=True)
  try:
    try:
      return _load(checkpoints, which)
    except CheckpointError as damaged:
      other = next(kind for kind in KINDS if kind != which)
      if not fallback or checkpoints.epoch(other) is None or checkpoints.epoch(which) is None:
        raise
      try:
        model, meta = _load(checkpoints, other)
      except CheckpointError:
        raise CheckpointError(
          f"{damaged}; {checkpoints.step_dir(other)} cannot be restored either: retrain "
          "(move the checkpoints directory away)"
        ) from None
      meta["fallback"] = f"{damaged}; loaded the {other} checkpoint (epoch {meta['epoch']}) instead"
      return model, meta
  finally:
    checkpoints.close()
