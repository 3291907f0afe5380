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
from typing import Any

import jax
import orbax.checkpoint as ocp
from flax import nnx

from flax_mnist import models
from flax_mnist import workdir as workdir_module
from flax_mnist.config import BEST_METRICS, resolve_impl
from flax_mnist.errors import CheckpointError

KINDS = ("best", "latest")


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
    """Saves ``state`` (a pytree) and ``meta`` (JSON-able) as ``kind`` checkpoint of ``epoch``."""
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
    # Best before latest: a crash between the two re-runs this epoch on resume, never loses a best.
    if is_best:
      self.save("best", epoch, state, meta)
      self._best_value = value
    self.save("latest", epoch, state, meta)
    return is_best

  def restore_meta(self, kind: str) -> dict[str, Any]:
    """The JSON metadata of the ``kind`` checkpoint."""
    epoch = self._require(kind)
    return self._manager(kind).restore(epoch, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))[
      "meta"
    ]

  def restore(self, kind: str, template: Any) -> tuple[Any, dict[str, Any]]:
    """Restores the ``kind`` checkpoint into a pytree shaped like ``template``: (state, meta)."""
    epoch = self._require(kind)
    try:
      restored = self._manager(kind).restore(
        epoch,
        args=ocp.args.Composite(
          state=ocp.args.StandardRestore(_abstract(template)), meta=ocp.args.JsonRestore()
        ),
      )
    except (ValueError, KeyError, TypeError) as error:
      message = str(error).splitlines()[0] if str(error) else type(error).__name__
      raise CheckpointError(
        f"{self.directory / kind / str(epoch)}: does not match the model being restored ({message})"
      ) from None
    return restored["state"], restored["meta"]

  def restore_model(self, kind: str, template: Any) -> Any:
    """Restores only the model (``template``: {"params", "model_state"}) of the ``kind``
    checkpoint, whatever optimizer state is saved beside it."""
    epoch = self._require(kind)
    abstract = {"state": _abstract(template)}
    args = ocp.args.PyTreeRestore(
      item=abstract["state"],
      restore_args=ocp.checkpoint_utils.construct_restore_args(abstract["state"]),
      partial_restore=True,
    )
    try:
      restored = self._manager(kind).restore(epoch, args=ocp.args.Composite(state=args))
    except (ValueError, KeyError, TypeError) as error:
      message = str(error).splitlines()[0] if str(error) else type(error).__name__
      raise CheckpointError(
        f"{self.directory / kind / str(epoch)}: does not match the model being restored ({message})"
      ) from None
    return restored["state"]

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


def load_model(
  workdir: str | os.PathLike, which: str = "best"
) -> tuple[nnx.Module, dict[str, Any]]:
  """Loads the ``which`` ("best" or "latest") checkpoint of a training workdir.

  Returns ``(model, info)``: the model in eval mode, and a dict with at least ``epoch``,
  ``val_accuracy``, ``val_loss``, ``model`` (its name) and ``config`` (as trained). The layer
  implementation is this platform's (all compute the same function); the dropout PRNG is the
  recorded one, since its key is part of the checkpoint. Only the model is restored (params,
  BatchNorm statistics), whatever the optimizer was.
  """
  if not (workdir_module.path(workdir) / workdir_module.CHECKPOINTS_DIR).is_dir():
    raise CheckpointError(
      f"{workdir}: no checkpoints directory (expected a workdir written by train.py)"
    )
  checkpoints = Checkpoints(workdir, read_only=True)
  try:
    meta = checkpoints.restore_meta(which)
    config = meta["config"]
    model = models.init_model(
      config["model"],
      config["seed"],
      impl=resolve_impl("auto"),
      dropout_rng_impl=config["dropout_rng_impl"],
      model_kwargs=config.get("model_kwargs") or {},
    )
    graphdef, params, model_state = nnx.split(model, nnx.Param, ...)
    state = checkpoints.restore_model(which, {"params": params, "model_state": model_state})
  finally:
    checkpoints.close()
  model = nnx.merge(graphdef, state["params"], state["model_state"])
  model.eval()
  return model, meta
