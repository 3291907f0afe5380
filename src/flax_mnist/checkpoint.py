"""Checkpoints with orbax: the best epoch by validation accuracy, and the latest for resuming.

A workdir holds two orbax CheckpointManagers, kept apart on purpose (orbax's ``best_fn``
with ``max_to_keep`` would delete the latest checkpoint whenever validation worsens):

  ``checkpoints/best/<epoch>``    written only when the best metric strictly improves
                                  (Keras ModelCheckpoint ``save_best_only``): val accuracy
                                  by default, or val loss (``config.best_metric``);
  ``checkpoints/latest/<epoch>``  written every epoch, to resume an interrupted run.

Each checkpoint holds ``state`` (model params, BatchNorm statistics and dropout RNG,
optimizer state) and ``meta`` (JSON: epoch, metrics, model name, config, the history up to the
epoch). A CRC-32 of each part of the state and one of the meta itself are saved in the meta and
checked on every restore: one changed digit of a recorded val_accuracy would otherwise pick the
wrong best epoch silently. Orbax writes to a temporary directory and renames it, so an
interrupted save never corrupts the previous checkpoint. This is the only module that imports
orbax.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import shutil
import zlib
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from flax import nnx

from flax_mnist import layers, models, sharding
from flax_mnist import workdir as workdir_module
from flax_mnist.config import BEST_METRICS, DROPOUT_RNG_IMPLS, resolve_impl
from flax_mnist.errors import CheckpointError, FlaxMnistError, RunError

KINDS = ("best", "latest")
META_CHECKSUM = "meta_checksum"  # The CRC-32 of the rest of the meta, saved inside it.
# orbax's files beside the arrays (metadata, manifests): a few KiB measured for the family.
_SAVE_OVERHEAD = 64 * 2**10


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


def meta_checksum(meta: dict[str, Any]) -> int:
  """CRC-32 of ``meta`` (but its own checksum) as canonical JSON: keys sorted, no spaces. JSON
  numbers round-trip exactly, so the restored meta gives the saved value."""
  rest = {key: value for key, value in meta.items() if key != META_CHECKSUM}
  return zlib.crc32(json.dumps(rest, sort_keys=True, separators=(",", ":")).encode())


def _is_int(value: Any) -> bool:
  return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
  return isinstance(value, (int, float)) and not isinstance(value, bool)


# What the meta's config must hold for a checkpoint to be loaded: field -> (check, expected).
_META_CONFIG_FIELDS = {
  "model": (lambda v: isinstance(v, str), "a model name"),
  "seed": (_is_int, "an integer"),
  "dropout_rng_impl": (lambda v: v in DROPOUT_RNG_IMPLS[1:], "a PRNG implementation"),
  "model_kwargs": (lambda v: isinstance(v, dict), "an object"),
  "compute_dtype": (lambda v: v in layers.COMPUTE_DTYPES, "float32 or bfloat16"),
  "eval_batch_size": (lambda v: _is_int(v) and v > 0, "a positive integer"),
  "best_metric": (lambda v: v in BEST_METRICS, "val_accuracy or val_loss"),
}


def _meta_problem(meta: Any, best_metric: str) -> str | None:
  """What is wrong with a restored meta's shape, or None (its checksum is checked apart)."""
  if not isinstance(meta, dict):
    return f"its meta is a JSON {type(meta).__name__}, expected an object"
  for field, check, expected in (
    ("epoch", _is_int, "an integer"),
    (best_metric, _is_number, "a number"),
  ):
    if not check(meta.get(field)):
      return f"its meta's {field} is {meta.get(field)!r:.40}, expected {expected}"
  if not isinstance(meta.get("checksums"), dict) or not _is_int(meta.get(META_CHECKSUM)):
    return "its meta holds no checksums"
  return None


def _run_problem(meta: dict[str, Any]) -> str | None:
  """What a trainer's meta lacks to be resumed or loaded (its config, metrics, history)."""
  for field, check, expected in (
    ("val_accuracy", _is_number, "a number"),
    ("val_loss", _is_number, "a number"),
    ("history", lambda v: isinstance(v, list), "a list"),
  ):
    if not check(meta.get(field)):
      return f"its meta's {field} is {meta.get(field)!r:.40}, expected {expected}"
  if not isinstance(meta.get("config"), dict):
    return "its meta has no config (an object)"
  for field, (check, expected) in _META_CONFIG_FIELDS.items():
    if not check(meta["config"].get(field)):
      return f"its meta's config.{field} is {meta['config'].get(field)!r:.40}, expected {expected}"
  return None


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


class _OrbaxErrors(logging.Filter):
  """Drops orbax's ERROR records (a traceback each, from its background save threads: 21 of them
  for one full disk) while a workdir is being written: every such failure is raised again in the
  main thread by the next save, wait or close, where ``Checkpoints`` makes it one line."""

  writers = 0

  def filter(self, record: logging.LogRecord) -> bool:
    orbax = f"{os.sep}orbax{os.sep}" in record.pathname
    return not (self.writers and orbax and record.levelno >= logging.ERROR)


_ORBAX_ERRORS = _OrbaxErrors()


def _write_failure(error: BaseException) -> str:
  """What failed under a save, in a few words: the OS's reason if one is named anywhere in the
  chain (orbax wraps it in a ValueError of its storage layer), else the first line."""
  text = ""
  while error is not None:
    text += f"{error}\n"
    error = error.__cause__ or error.__context__
  for reason in ("No space left on device", "Disk quota exceeded", "Read-only file system"):
    if reason in text:
      return reason
  lines = text.strip().splitlines()
  return lines[0][:200] if lines else "unknown error"


def _saved(epoch: int | None) -> str:
  return f"epoch {epoch} is saved" if epoch else "no epoch is saved"


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
    self._failed = False  # A save failed: close() then raises nothing more.
    self._writing = not read_only
    if self._writing:
      logging.getLogger("absl").addFilter(_ORBAX_ERRORS)
      _OrbaxErrors.writers += 1

  @contextlib.contextmanager
  def _write_errors(self):
    """Whatever orbax raises while writing (a full disk, a lost mount) becomes one RunError
    saying which epoch is saved and how to go on."""
    try:
      yield
    except Exception as error:  # noqa: BLE001 (orbax raises many types for one cause)
      self._failed = True
      self._settle()
      reason = _write_failure(error)
      raise RunError(
        f"{self.directory}: a checkpoint could not be written ({reason}); "
        f"{_saved(self._saved_epoch())}: free space and rerun the same command to resume"
      ) from error

  def _check_room(self, kind: str, state: Any, meta: dict[str, Any]) -> None:
    """Refuses a save the local disk has no room for, before a byte is written: a full disk met
    inside orbax's writer threads also prints a traceback from each of them at exit (tensorstore
    completes its writes on a closed event loop), which no handler here can catch."""
    if "://" in os.fspath(self.directory):
      return
    needed = sum(leaf.nbytes for leaf in jax.tree.leaves(state)) + len(json.dumps(meta))
    needed += _SAVE_OVERHEAD
    with self._write_errors():  # The previous epoch's saves first: they still take room.
      self.wait()
    try:
      free = shutil.disk_usage(os.fspath(self.directory)).free
    except OSError:
      return  # The save itself then names what failed.
    if free < needed:
      self._failed = True
      raise RunError(
        f"{self.directory / kind}: no room for the next checkpoint ({needed / 2**20:.1f} MiB "
        f"needed, {free / 2**20:.1f} MiB free); {_saved(self.epoch('latest'))}: free space and "
        "rerun the same command to resume"
      )

  def _settle(self) -> None:
    """After a failed save, lets every pending one end (each fails the same way): a write still
    in flight when the process exits prints "Event loop is closed" tracebacks from its threads."""
    for manager in self._managers.values():
      try:
        manager.wait_until_finished()
      except Exception:  # noqa: BLE001, S110 (the first failure is the one reported)
        pass

  def _saved_epoch(self) -> int | None:
    """The newest complete latest checkpoint on disk (orbax's own count may include the one
    that failed)."""
    try:
      return self._manager("latest").reload() or self.epoch("latest")
    except Exception:  # noqa: BLE001 (the storage itself may be what failed)
      return None

  def epoch(self, kind: str) -> int | None:
    """The epoch of the ``kind`` checkpoint, or None if there is none."""
    return self._manager(kind).latest_step()

  def save(self, kind: str, epoch: int, state: Any, meta: dict[str, Any]) -> None:
    """Saves ``state`` (a pytree) and ``meta`` (JSON-able) as ``kind`` checkpoint of ``epoch``;
    ``meta`` also gets a CRC-32 of each part of ``state``, checked on restore."""
    if "checksums" not in meta:  # save_epoch computes them once for both checkpoints.
      meta = {**meta, "checksums": _checksums(state)}
    meta = {**meta, META_CHECKSUM: meta_checksum(meta)}
    self._check_room(kind, state, meta)
    with self._write_errors():
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
    """The JSON metadata of the ``kind`` checkpoint, its shape and checksum checked: a damaged
    one is a CheckpointError, as damaged arrays are."""
    epoch = self._require(kind)
    args = ocp.args.Composite(meta=ocp.args.JsonRestore())
    with self._damage_as_error(kind):
      meta = self._manager(kind).restore(epoch, args=args)["meta"]
    problem = _meta_problem(meta, self.best_metric)
    if problem is None and meta[META_CHECKSUM] != meta_checksum(meta):
      problem = "its meta does not match the checksum saved with it"
    if problem is None and meta["epoch"] != epoch:
      problem = f"its meta records epoch {meta['epoch']}"
    if problem is not None:
      raise CheckpointError(f"{self.step_dir(kind)}: damaged: {problem}")
    return meta

  def restore_run_meta(self, kind: str) -> dict[str, Any]:
    """``restore_meta`` of a checkpoint the trainer wrote: with the config, metrics and history
    that resuming and ``load_model`` read (checked, a CheckpointError naming what is missing)."""
    meta = self.restore_meta(kind)
    problem = _run_problem(meta)
    if problem is not None:
      raise CheckpointError(f"{self.step_dir(kind)}: damaged: {problem}")
    return meta

  def restore(
    self, kind: str, template: Any, meta: dict[str, Any] | None = None
  ) -> tuple[Any, dict[str, Any]]:
    """Restores the ``kind`` checkpoint into a pytree shaped like ``template``: (state, meta).
    A checkpoint whose arrays or meta do not match their saved checksums is a CheckpointError.
    ``meta``: the one ``restore_meta`` gave already (read once, not twice)."""
    epoch = self._require(kind)
    meta = meta or self.restore_meta(kind)
    args = ocp.args.Composite(state=ocp.args.StandardRestore(_abstract(template)))
    with self._damage_as_error(kind):
      state = self._manager(kind).restore(epoch, args=args)["state"]
    self._verify(kind, state, meta)
    return state, meta

  def restore_model(
    self, kind: str, template: Any, meta: dict[str, Any] | None = None
  ) -> tuple[Any, dict[str, Any]]:
    """Restores only the model (``template``: {"params", "model_state"}) of the ``kind``
    checkpoint, whatever optimizer state is saved beside it: (state, meta), checksums checked.
    ``meta``: as ``restore``."""
    epoch = self._require(kind)
    item = _abstract(template)
    args = ocp.args.PyTreeRestore(
      item=item,
      restore_args=ocp.checkpoint_utils.construct_restore_args(item),
      partial_restore=True,
    )
    meta = meta or self.restore_meta(kind)
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
    """Compares each restored part's CRC-32 with the one saved beside it."""
    saved = meta["checksums"]
    for part, value in state.items():
      if checksum(value) != saved.get(part):
        raise CheckpointError(
          f"{self.step_dir(kind)}: damaged: its {part} do not match the checksum saved with them"
        )

  def wait(self) -> None:
    """Blocks until asynchronous saves have finished."""
    for manager in self._managers.values():
      manager.wait_until_finished()

  def close(self) -> None:
    """Waits for pending saves and releases the managers (each, even if one fails); a failed
    save is a RunError, unless one was raised for it already."""
    reported = self._failed
    failure: RunError | None = None
    try:
      for manager in self._managers.values():
        try:
          with self._write_errors():
            manager.close()
        except RunError as error:
          failure = failure or error
    finally:
      if self._writing:
        self._writing = False
        _OrbaxErrors.writers -= 1
        if not _OrbaxErrors.writers:
          logging.getLogger("absl").removeFilter(_ORBAX_ERRORS)
    if failure is not None and not reported:
      raise failure

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


def _load(
  checkpoints: Checkpoints, which: str, trust_model_code: bool, impl: str = "auto"
) -> tuple[nnx.Module, dict[str, Any]]:
  meta = checkpoints.restore_run_meta(which)
  config = meta["config"]
  try:
    model = models.init_model(
      config["model"],
      config["seed"],
      impl=resolve_impl(impl),
      dropout_rng_impl=config["dropout_rng_impl"],
      model_kwargs=config["model_kwargs"],
      compute_dtype=config["compute_dtype"],
      trust_code=trust_model_code,
      # The data's shape and classes (absent from runs recorded before: MNIST's, the defaults).
      input_shape=config.get("input_shape"),
      num_classes=config.get("num_classes"),
    )
  except FlaxMnistError as error:  # Named for the checkpoint that recorded the model.
    raise type(error)(f"{checkpoints.step_dir(which)}: {error}") from None
  graphdef, params, model_state = nnx.split(model, nnx.Param, ...)
  template = {"params": params, "model_state": model_state}
  state, _ = checkpoints.restore_model(which, template, meta)
  model = nnx.merge(graphdef, state["params"], state["model_state"])
  model.eval()
  return model, meta


def load_model(
  workdir: str | os.PathLike,
  which: str = "best",
  *,
  fallback: bool = True,
  trust_model_code: bool = False,
  impl: str = "auto",
) -> tuple[nnx.Module, dict[str, Any]]:
  """Loads the ``which`` ("best" or "latest") checkpoint of a training workdir.

  Returns ``(model, info)``: the model in eval mode, and the checkpoint's metadata: ``epoch``,
  ``val_accuracy``, ``val_loss``, ``model`` (its name), ``config`` (as trained). The layer
  implementation is ``impl`` ("auto": this platform's; all compute the same function); the
  dropout PRNG is the
  recorded one, since its key is part of the checkpoint. Only the model is restored (params,
  BatchNorm statistics), whatever the optimizer was. If that checkpoint is damaged and the other
  one is intact (and ``fallback``), the other is loaded and ``info["fallback"]`` says so.

  A workdir is data: a model it names by import path (``"package.module:factory"``) is imported
  only with ``trust_model_code=True`` (else ``UntrustedCodeError``, nothing imported), and its
  ``model_kwargs`` are checked against the factory's signature before the call. A workdir with
  a link leading out of it is refused.
  """
  workdir_module.check_contained(workdir)
  if not (workdir_module.path(workdir) / workdir_module.CHECKPOINTS_DIR).is_dir():
    raise CheckpointError(
      f"{workdir}: no checkpoints directory (expected a workdir written by train.py)"
    )
  if which not in KINDS:
    raise CheckpointError(f"checkpoint {which!r}: unknown, expected one of {', '.join(KINDS)}")
  checkpoints = Checkpoints(workdir, read_only=True)
  try:
    try:
      return _load(checkpoints, which, trust_model_code, impl)
    except CheckpointError as damaged:
      other = next(kind for kind in KINDS if kind != which)
      if not fallback or checkpoints.epoch(other) is None or checkpoints.epoch(which) is None:
        raise
      try:
        model, meta = _load(checkpoints, other, trust_model_code, impl)
      except CheckpointError:
        raise CheckpointError(
          f"{damaged}; {checkpoints.step_dir(other)} cannot be restored either: retrain "
          "(move the checkpoints directory away)"
        ) from None
      meta["fallback"] = f"{damaged}; loaded the {other} checkpoint (epoch {meta['epoch']}) instead"
      return model, meta
  finally:
    checkpoints.close()
