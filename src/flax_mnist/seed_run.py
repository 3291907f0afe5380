"""One seed's run in its workdir: resume from a checkpoint (with the history saved inside it),
record each epoch (history, best and latest checkpoints, TensorBoard), hold the workdir's lock."""

from __future__ import annotations

import contextlib
from typing import Any

from etils import epath
from flax import nnx

from flax_mnist import checkpoint, history, log, models, sharding, workdir
from flax_mnist.config import RunConfig, result_fields
from flax_mnist.errors import CheckpointError, FlaxMnistError, RunError
from flax_mnist.history import EpochRecord
from flax_mnist.log import Say
from flax_mnist.steps import TrainState


class SeedRun:
  """One seed's workdir: its state, checkpoints, history and TensorBoard log. ``run``: the run
  as this seed's (``RunConfig.for_seed``); its ``to_dict()`` is what config.json and every
  checkpoint record."""

  def __init__(
    self,
    run: RunConfig,
    directory: epath.Path,
    template: TrainState,
    *,
    is_writer: bool,
    say: Say,
  ):
    self.seed = run.seed
    self.run = run
    self.record = run.to_dict()
    self.workdir = directory
    self.is_writer = is_writer
    self.say = say
    self._held = contextlib.ExitStack()
    workdir.check_contained(directory)  # Before the lock file or any checkpoint is touched.
    if is_writer:  # One process creates and locks; all of them save checkpoints into it.
      workdir.prepare(directory)
      self._held.enter_context(workdir.lock(directory))
    self.tensorboard: log.TensorBoard | None = None
    self.state = template
    self.start_epoch = 0
    self.history: list[EpochRecord] = []
    self.stopped = False  # Early stopping ended this seed's run.
    try:
      self.checkpoints = checkpoint.Checkpoints(directory, best_metric=run.best_metric)
      self._held.callback(self.checkpoints.close)
      self._resume(template)
    except BaseException:
      self._held.close()
      raise

  def _check_same_run(self, recorded: dict[str, Any]) -> None:
    """The run recorded in the workdir (its checkpoint's config: config.json may be missing or
    edited) must equal this one in every field that changes what is computed, the data too."""
    workdir.check_resumable(
      f"{self.workdir}",
      recorded,
      self.record,
      result_fields(self.run.lr_schedule),
      names={"data": f"this run's data (from {self.run.data_source}) is"},
    )

  def _resume(self, template: TrainState) -> None:
    """Restores the latest checkpoint (the best one if there is no latest) with the history
    saved inside it: the record of each epoch travels with its checkpoint, so a history.json
    that missed a write (a kill, a full disk) is rebuilt, never left with a gap."""
    kind = next((k for k in ("latest", "best") if self.checkpoints.epoch(k) is not None), None)
    if kind is None:  # Nothing trained yet; a config.json says what was started.
      recorded = workdir.read_config(self.workdir)
      if recorded is not None:
        self._check_same_run(recorded)
      return
    try:
      meta = self.checkpoints.restore_run_meta(kind)
      self._check_same_run(meta["config"])
      state, meta = self.checkpoints.restore(kind, template._asdict(), meta)
      self.state = TrainState(**state)
    except CheckpointError as error:
      intact = "best" if kind == "latest" and self.checkpoints.epoch("best") is not None else None
      hint = (
        (
          f"; move {self.checkpoints.step_dir(kind)} away to resume from "
          f"{self.checkpoints.step_dir(intact)}"
        )
        if intact
        else "; use another workdir"
      )
      raise CheckpointError(f"{error}{hint}") from None
    self.start_epoch = meta["epoch"]
    self.history = workdir.check_history(
      meta["history"], f"{self.checkpoints.step_dir(kind)}: its history", "use another workdir"
    )
    epochs = [record["epoch"] for record in self.history]
    if epochs != list(range(1, self.start_epoch + 1)):
      raise CheckpointError(
        f"{self.checkpoints.step_dir(kind)}: damaged: its history holds epochs {epochs}, "
        f"expected 1..{self.start_epoch}; use another workdir"
      )
    self.stopped = any(record.get("stopped_early") for record in self.history)
    self.say(f"resumed from {self.checkpoints.step_dir(kind)} at epoch {self.start_epoch}")

  def begin(self) -> None:
    """Training starts: config.json is written now (not by a refused or no-op run), and a
    history.json that disagrees with the checkpoint is rewritten from it."""
    if not self.is_writer:
      return
    workdir.write_config(self.workdir, self.record)
    file = self.workdir / workdir.HISTORY_FILE
    try:  # The checkpoint's history is the record; a damaged or reshaped file is rebuilt.
      on_disk = [r["epoch"] for r in workdir.read_history(self.workdir, self.start_epoch)]
    except FlaxMnistError:
      on_disk = None
    if self.history and on_disk != [r["epoch"] for r in self.history]:
      workdir.write_history(self.workdir, self.history)
      self.say(f"rebuilt {file} from the checkpoint (epochs 1..{self.start_epoch})")

  def record_epoch(
    self,
    record: EpochRecord,
    state: TrainState,
    train_graphdef: nnx.GraphDef,
    learning_rate: float | None = None,
    step_losses: dict[int, float] | None = None,
  ) -> None:
    """Records an epoch the loop finished: history (in its checkpoint and history.json), the
    best and latest checkpoints, TensorBoard (with ``learning_rate``, if the schedule moves it,
    and ``step_losses``, {global step: mean loss}, if any)."""
    records = [*self.history, record]
    meta = {
      "epoch": record["epoch"],
      "model": self.run.model,
      "config": self.record,
      **{key: record[key] for key in history.AGGREGATED},
      "history": records,
    }
    self.checkpoints.save_epoch(record["epoch"], state._asdict(), meta)
    # Only once its checkpoint is saved (or being saved: closing waits for it) is the epoch in
    # the history that an interruption reports as saved.
    self.history, self.state = records, state
    if record.get("stopped_early"):
      self.stopped = True
    if self.is_writer:
      self._write_history(record["epoch"])
      if self.tensorboard is None:
        self.tensorboard = log.TensorBoard(self.workdir / workdir.TENSORBOARD_DIR)
      model = nnx.merge(train_graphdef, state.params, state.model_state)
      arrays = {**models.named_params(model), **models.named_batch_stats(model)}
      self.tensorboard.write_epoch(
        record["epoch"], record, sharding.to_host(arrays), learning_rate, step_losses
      )

  def _write_history(self, epoch: int) -> None:
    try:
      workdir.write_history(self.workdir, self.history)
    except OSError as error:
      raise RunError(
        f"{self.workdir / workdir.HISTORY_FILE}: could not be written ({error.strerror or error}); "
        f"epoch {epoch} is checkpointed with its history: rerun the same command to resume"
      ) from None

  def close(self) -> None:
    """Closes the TensorBoard writer, waits for pending checkpoint saves, releases the lock."""
    try:
      if self.tensorboard is not None:
        self.tensorboard.close()
    finally:
      self._held.close()
