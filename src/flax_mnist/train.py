"""The training loop: ``train_and_evaluate`` (one seed) and ``train_seeds`` (several, compiled
once): compile once, run the epochs (looped or vmapped seeds), stop cleanly on a signal.

The config is resolved once (``config.resolve``) into a ``RunConfig`` passed down whole. The
compiled parts (step, epoch, evaluation) are in ``steps``; what they start from in ``programs``;
each seed's workdir records in ``seed_run``. The loop decides (divergence, early stopping); the
seed's run records.
"""

from __future__ import annotations

import dataclasses
import math
import os
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, TypedDict

import jax
import jax.numpy as jnp
import numpy as np
import optax
from etils import epath

from flax_mnist import data as data_lib
from flax_mnist import history, log, registry, sharding, steps, workdir
from flax_mnist.config import RunConfig, resolve, result_fields
from flax_mnist.errors import ConfigError, Interrupted, RunError
from flax_mnist.history import EpochRecord
from flax_mnist.log import Say
from flax_mnist.programs import Custom, Programs
from flax_mnist.seed_run import SeedRun
from flax_mnist.steps import TrainState

if TYPE_CHECKING:  # (typing.Unpack is Python 3.11's; the floor is 3.10.)
  from typing_extensions import Unpack


def _stack(trees: Sequence[Any]) -> Any:
  return jax.tree.map(lambda *leaves: jnp.stack(leaves), *trees)


def _unstack(tree: Any, index: int) -> Any:
  return jax.tree.map(lambda leaf: leaf[index], tree)


class _Trainer:
  """Compiles the epoch once for every pending seed, then trains them (looped or vmapped)."""

  def __init__(
    self,
    run: RunConfig,
    runs: list[SeedRun],
    programs: Programs,
    arrays: tuple[jax.Array, ...],
    mesh: jax.sharding.Mesh | None,
    say: Say,
  ):
    self.run, self.runs, self.programs, self.say = run, runs, programs, say
    self.mesh = mesh
    self.train_images, self.train_labels, self.test_images, self.test_labels = arrays
    self.num_epochs = run.num_epochs
    self.over_seeds = run.seed_parallelism == "vmap"
    self.keys = dict(zip(run.seeds, programs.shuffle_keys))
    self.pending = [
      seed_run
      for seed_run in runs
      if seed_run.start_epoch < run.num_epochs and not seed_run.stopped
    ]
    if self.over_seeds and len({seed_run.start_epoch for seed_run in runs}) > 1:
      raise ConfigError(
        "seed_parallelism 'vmap' resumes only seeds stopped at the same epoch; these are at "
        + ", ".join(f"{seed_run.seed}: {seed_run.start_epoch}" for seed_run in runs)
        + "; resume with --config.seed_parallelism=loop"
      )
    self.steps_per_epoch = math.ceil(self.train_images.shape[0] / run.batch_size)
    self.progress = log.ProgressBar(
      self.steps_per_epoch, enabled=run.progress_bar and not self.over_seeds
    )

  def compile(self) -> dict[str, float]:
    """Compiles the train epoch and evaluation for the pending seeds' shapes; returns seconds."""
    run, programs, pending = self.run, self.programs, self.pending
    progress = self.progress.update if self.progress.enabled else None
    train_epoch = programs.train_epoch(
      run,
      self.mesh,
      progress=progress,
      over_seeds=self.over_seeds,
      step_losses=run.log_every_steps > 0,
    )
    evaluate = steps.make_evaluate(
      programs.eval_graphdef,
      run.eval_batch_size,
      over_seeds=self.over_seeds,
      mesh=self.mesh,
      metrics_fn=programs.metrics_fn,
      metric_names=programs.metric_names,
    )
    if self.over_seeds:
      example, example_key = self._stacked_states()
    else:
      example, example_key = pending[0].state, self.keys[pending[0].seed]
    started = time.perf_counter()
    self.train_epoch = train_epoch.lower(
      example, self.train_images, self.train_labels, example_key
    ).compile()
    compiled_train = time.perf_counter()
    self.evaluate = evaluate.lower(
      example.params, example.model_state, self.test_images, self.test_labels
    ).compile()
    seconds = {
      "train_epoch": compiled_train - started,
      "evaluate": time.perf_counter() - compiled_train,
    }
    together = f" for {len(pending)} seeds at once" if self.over_seeds else ""
    self.say(
      f"compiled the train epoch ({self.steps_per_epoch} steps of {run.batch_size}) "
      f"and evaluation{together} in {sum(seconds.values()):.1f} s"
    )
    return seconds

  def timed_epoch(self, state: TrainState, keys: jax.Array) -> tuple:
    """One epoch of training and evaluation: (state, train metrics, val metrics, timings)."""
    started = time.perf_counter()
    state, train_metrics = self.train_epoch(state, self.train_images, self.train_labels, keys)
    train_metrics = sharding.to_host(train_metrics)  # Waits for the epoch.
    trained = time.perf_counter()
    val_metrics = sharding.to_host(
      self.evaluate(state.params, state.model_state, self.test_images, self.test_labels)
    )
    finished = time.perf_counter()
    timings = {
      "seconds": finished - started,
      "train_seconds": trained - started,
      "eval_seconds": finished - trained,
      "parallel_seeds": len(self.pending) if self.over_seeds else 1,
    }
    return state, train_metrics, val_metrics, timings

  def train(self) -> None:
    """Trains every pending seed; on SIGINT/SIGTERM waits for what is being saved and raises
    ``Interrupted`` saying which epoch is saved and how to resume."""
    try:
      self.run_vmapped() if self.over_seeds else self.run_looped()
    except KeyboardInterrupt as interrupt:
      exit_code = getattr(interrupt, "exit_code", 130)
      seed_run, started = self.current
      # What is saved is what the seed's run recorded: the signal may come after an epoch's
      # record and before the next epoch starts.
      saved_epoch = seed_run.history[-1]["epoch"] if seed_run.history else 0
      epoch = saved_epoch + 1
      step = f", step {self.progress.last_step} of {self.steps_per_epoch}"
      where = f"epoch {epoch}{step if self.progress.last_step and started == epoch else ''}"
      seed = f" (seed {seed_run.seed})" if len(self.runs) > 1 else ""
      saved = f"epoch {saved_epoch} is saved" if saved_epoch else "no epoch is saved yet"
      raise Interrupted(
        f"interrupted at {where}{seed}: {saved}; rerun the same command to resume", exit_code
      ) from None
    finally:
      self.progress.close()

  def run_looped(self) -> None:
    """Each pending seed after the other, through the same compiled epoch."""
    for seed_run in self.pending:
      state = seed_run.state
      for epoch in range(seed_run.start_epoch + 1, self.num_epochs + 1):
        self.current = (seed_run, epoch)
        self.progress.start(epoch, self.num_epochs)
        key = registry.epoch_shuffle_key(self.keys[seed_run.seed], epoch)
        state, train_metrics, val_metrics, timings = self.timed_epoch(state, key)
        self.progress.close()
        self._finish_epoch(seed_run, epoch, state, train_metrics, val_metrics, timings)
        if seed_run.stopped:
          break

  def _stacked_states(self) -> tuple[TrainState, jax.Array]:
    """The pending seeds' states and shuffle keys stacked on a leading axis, split over the
    mesh's ``seed`` axis."""
    states = _stack([seed_run.state for seed_run in self.pending])
    keys = _stack([self.keys[seed_run.seed] for seed_run in self.pending])
    return sharding.split_seeds(states, self.mesh), sharding.split_seeds(keys, self.mesh)

  def run_vmapped(self) -> None:
    """Every pending seed in one vmapped epoch (they all start at the same epoch)."""
    pending = self.pending
    states, keys = self._stacked_states()
    for epoch in range(pending[0].start_epoch + 1, self.num_epochs + 1):
      self.current = (pending[0], epoch)
      epoch_keys = jax.vmap(registry.epoch_shuffle_key, in_axes=(0, None))(keys, epoch)
      states, train_metrics, val_metrics, timings = self.timed_epoch(states, epoch_keys)
      for index, seed_run in enumerate(pending):
        if seed_run.stopped:  # Early stopping: its later epochs are computed but not kept.
          continue
        self._finish_epoch(
          seed_run,
          epoch,
          _unstack(states, index),
          _unstack(train_metrics, index),
          _unstack(val_metrics, index),
          timings,
        )
      if all(seed_run.stopped for seed_run in pending):
        break

  def _learning_rate(self, epoch: int) -> float | None:
    """The rate of the epoch's last step (step ``epoch * steps_per_epoch - 1``), as Keras logs
    it at the epoch's end; None when it does not move."""
    schedule = self.programs.schedule
    return None if schedule is None else float(schedule(epoch * self.steps_per_epoch - 1))

  def _step_losses(self, epoch: int, train_metrics: steps.Metrics) -> dict[int, float]:
    """Every ``config.log_every_steps``-th step's mean loss by global step (counted from 1),
    for TensorBoard; empty when it is 0."""
    every = self.run.log_every_steps
    if not every:
      return {}
    first = (epoch - 1) * self.steps_per_epoch
    losses = np.asarray(train_metrics["step_losses"])
    return {
      first + index + 1: float(losses[index])
      for index in range(len(losses))
      if (first + index + 1) % every == 0
    }

  def _finish_epoch(
    self,
    seed_run: SeedRun,
    epoch: int,
    state: TrainState,
    train_metrics: steps.Metrics,
    val_metrics: steps.Metrics,
    timings: dict[str, float],
  ) -> None:
    """Decides what the epoch was (diverged, stopped early) and has the seed's run record it."""
    record = _epoch_record(seed_run.seed, epoch, train_metrics, val_metrics, timings)
    patience = self.run.early_stopping_patience
    if patience:
      best = history.best_record([*seed_run.history, record], self.run.best_metric)
      if epoch - best["epoch"] >= patience:
        record["stopped_early"] = True
    seed_run.record_epoch(
      record,
      state,
      self.programs.train_graphdef,
      self._learning_rate(epoch),
      self._step_losses(epoch, train_metrics),
    )
    prefix = f"seed {seed_run.seed}: " if len(self.runs) > 1 else ""
    self.say(prefix + log.format_epoch(record, self.num_epochs))
    if record.get("stopped_early"):
      metric = self.run.best_metric
      best = history.best_record(seed_run.history, metric)
      self.say(
        f"{prefix}stopped early at epoch {record['epoch']}: no better {metric} for "
        f"{self.run.early_stopping_patience} epochs (best at epoch {best['epoch']})"
      )


def _applied_compute_dtype(run: RunConfig, say: Say) -> RunConfig:
  """The run with the compute dtype its model applies: a model whose factory does not take
  ``compute_dtype`` computes in its own (float32 unless it says otherwise), with a warning, and
  config.json records float32 rather than a dtype that was never used."""
  if run.compute_dtype == "float32" or registry.takes_argument(run.model, "compute_dtype"):
    return run
  say(
    f"warning: model {run.model!r} does not take compute_dtype, so config.compute_dtype "
    f"{run.compute_dtype!r} is not applied (it computes in its own dtype); recorded as float32"
  )
  return dataclasses.replace(run, compute_dtype="float32")


def _epoch_record(
  seed: int,
  epoch: int,
  train_metrics: steps.Metrics,
  val_metrics: steps.Metrics,
  timings: dict[str, float],
) -> EpochRecord:
  """The epoch's history record from its summed metrics; a non-finite train loss ends the run."""
  train, val = steps.summarize(train_metrics), steps.summarize(val_metrics)
  if not math.isfinite(train["loss"]):
    raise RunError(
      f"training diverged at epoch {epoch} (seed {seed}): train_loss is {train['loss']}; lower "
      "config.learning_rate"
    )
  return EpochRecord(
    epoch=epoch,
    train_loss=train["loss"],
    train_accuracy=train["accuracy"],
    val_loss=val["loss"],
    val_accuracy=val["accuracy"],
    seconds=timings["seconds"],
    train_seconds=timings["train_seconds"],
    eval_seconds=timings["eval_seconds"],
    parallel_seeds=timings["parallel_seeds"],
    images_per_second=timings["parallel_seeds"] * train["count"] / timings["train_seconds"],
    # A metrics_fn's figures, as train_<name> and val_<name>.
    **{
      f"{split}_{name}": figures[name]
      for split, figures in (("train", train), ("val", val))
      for name in sorted(figures.keys() - _SUMMARY_FIELDS)
    },
  )


_SUMMARY_FIELDS = {"loss", "accuracy", "correct", "count"}  # What steps.summarize always gives.


def _train(
  run: RunConfig,
  directories: list[epath.Path],
  custom: Custom,
  say: Say,
  seeds_workdir: epath.Path | None = None,
  dataset: data_lib.Dataset | None = None,
) -> list[list[EpochRecord]]:
  """Trains one copy of ``run.model`` per seed, each into its directory (the seed directories
  of ``seeds_workdir``, for several seeds), on ``dataset`` (default: MNIST from the config's
  sources); returns the histories."""
  is_writer = jax.process_index() == 0
  if seeds_workdir is None:
    workdir.check_single_seed(directories[0])
  else:
    workdir.check_contained(seeds_workdir)
  mesh = sharding.training_mesh(run.seed_devices, run.data_devices)
  if dataset is None:
    dataset = data_lib.load(run.dataset, run.data_dir, tfds_data_dir=run.tfds_data_dir or None)
  elif run.dataset != "mnist":
    raise ConfigError(
      f"config.dataset {run.dataset!r} and data={dataset.name!r} given: expected one of them "
      "(leave config.dataset unset to train on your arrays)"
    )
  say(f"data: {dataset.source}: {len(dataset.train):,} train, {len(dataset.test):,} test images")
  arrays = (dataset.train.images, dataset.train.labels, dataset.test.images, dataset.test.labels)
  arrays = sharding.place(arrays, mesh)
  run = run.with_data(dataset)
  steps_per_epoch = math.ceil(arrays[0].shape[0] / run.batch_size)
  run = _applied_compute_dtype(run, say)
  recorded = custom.record(run)
  if seeds_workdir is not None:
    record = recorded.for_seed(run.seeds[0]).to_dict()
    workdir.check_multi_seed(seeds_workdir, run.seeds, record, result_fields(run.lr_schedule))
  programs = Programs(run, mesh, steps_per_epoch, custom, say)
  runs: list[SeedRun] = []
  try:
    for seed, directory, template in zip(run.seeds, directories, programs.templates):
      seed_run = SeedRun(recorded.for_seed(seed), directory, template, is_writer=is_writer, say=say)
      runs.append(seed_run)
    trainer = _Trainer(run, runs, programs, arrays, mesh, say)
    if not trainer.pending:
      _say_nothing_to_train(runs, run.num_epochs, say)
      return [seed_run.history for seed_run in runs]
    compile_seconds = trainer.compile()
    for seed_run in trainer.pending:
      seed_run.begin()
      if is_writer:
        workdir.write_run(
          seed_run.workdir,
          {
            "start_epoch": seed_run.start_epoch,
            "compile_seconds": compile_seconds,
            "seed_parallelism": run.seed_parallelism,
            "compiled_once_for_seeds": [other.seed for other in trainer.pending],
            "resolved": run.resolved(),
            "data": run.data,
            "data_source": run.data_source,
            "mesh": sharding.mesh_shape(mesh) if mesh is not None else {"seed": 1, "data": 1},
            **log.environment(),
          },
        )
    trainer.train()
  finally:
    for seed_run in runs:
      seed_run.close()
  return [seed_run.history for seed_run in runs]


def _say_nothing_to_train(runs: list[SeedRun], num_epochs: int, say: Say) -> None:
  for seed_run in runs:
    done = "stopped early" if seed_run.stopped else f"holds {seed_run.start_epoch} epochs"
    say(
      f"nothing to train: {seed_run.workdir} {done} (config.num_epochs is {num_epochs}); raise "
      "--config.num_epochs to train further"
    )


def _sayer(print_fn: Say | None) -> Say:
  """Prints on process 0 only (every process runs the same loop)."""
  if print_fn is None or jax.process_index() != 0:
    return lambda line: None
  return print_fn


CHANCE_ACCURACY = 0.1  # Ten balanced classes.


def _say_best(records: list[EpochRecord], say: Say, prefix: str = "") -> None:
  """The best epoch; a warning when it is no better than guessing (a finite divergence)."""
  if not records:
    return
  best = history.best_record(records)
  say(f"{prefix}best val_accuracy {best['val_accuracy']:.4f} at epoch {best['epoch']}")
  if best["val_accuracy"] <= 2 * CHANCE_ACCURACY:
    say(
      f"{prefix}warning: best val_accuracy {best['val_accuracy']:.4f} is near chance "
      f"({CHANCE_ACCURACY}): training failed (diverged?); try a lower config.learning_rate"
    )


class Options(TypedDict, total=False):
  """What ``train_and_evaluate`` and ``train_seeds`` take from Python beside the config, each
  optional. The optimizer and loss replace the config's (config.json then records "custom" for
  them, and a resume checks that); the rest changes nothing that is trained."""

  # data.from_arrays: train on your own arrays instead of config.dataset; the family adapts to
  # their shape and classes, their identity is recorded, and a resume on other data is refused.
  data: data_lib.Dataset
  print_fn: Say | None  # Where the progress lines go: print by default, None for none.
  optimizer: optax.GradientTransformation  # Any optax transformation.
  # (logits, labels) -> per-example losses, for training; the val loss stays cross-entropy (as
  # with label smoothing), comparable between runs.
  loss_fn: steps.LossFn
  # (logits, labels) -> {name: one value per example}, computed inside the compiled programs:
  # the epoch's mean over the train and test images is recorded as train_<name> and val_<name>
  # in the history and as epoch_<name> in TensorBoard.
  metrics_fn: steps.MetricsFn


def _unpack(options: Options) -> tuple[data_lib.Dataset | None, Say, Custom]:
  """The data, the printer and the custom parts of ``options``; a TypeError for any other."""
  unknown = sorted(options.keys() - Options.__optional_keys__)
  if unknown:
    raise TypeError(
      f"unexpected keyword argument {', '.join(map(repr, unknown))}: expected "
      f"{', '.join(sorted(Options.__optional_keys__))}"
    )
  custom = Custom(options.get("optimizer"), options.get("loss_fn"), options.get("metrics_fn"))
  return options.get("data"), _sayer(options.get("print_fn", print)), custom


def train_and_evaluate(
  config: Any, workdir: str | os.PathLike, **options: Unpack[Options]
) -> list[EpochRecord]:
  """Trains ``config.model`` from ``config.seed`` for ``config.num_epochs``, validating on the
  test set after each epoch. (Several seeds: ``train_seeds``.) ``options``: see ``Options``
  (your data, optimizer, loss, metrics, printer).

  Writes into ``workdir`` (a local path or ``gs://...``): config.json, history.json, run.json
  (compile seconds, hardware, versions), checkpoints/{best,latest}, tensorboard/.
  Resumes from ``checkpoints/latest`` if present. Returns the history, one dict per epoch with
  epoch, train_loss, train_accuracy, val_loss, val_accuracy, seconds (train + eval, compile
  excluded), train_seconds, eval_seconds, parallel_seeds (1 here) and images_per_second
  (training throughput), a metrics_fn's train_<name> and val_<name>, and ``stopped_early`` on
  the epoch where early stopping ended it.
  """
  dataset, say, custom = _unpack(options)
  run = resolve(config)
  if len(run.seeds) > 1:
    raise ConfigError(f"config trains seeds {list(run.seeds)}: use train_seeds for several seeds")
  run = dataclasses.replace(run, seed_parallelism="loop")  # One seed: nothing to vmap over.
  [records] = _train(run, [epath.Path(workdir)], custom, say, dataset=dataset)
  _say_best(records, say)
  return records


def train_seeds(
  config: Any, workdir_path: str | os.PathLike, **options: Unpack[Options]
) -> dict[int, list[EpochRecord]]:
  """Trains ``config.model`` from each seed of ``config.seed_list(config)``, compiling once.

  Each seed gets a full single-seed workdir, ``workdir/seed_<seed>/`` (the same files, history
  and best checkpoint as ``train_and_evaluate`` with that seed would write, to float tolerance
  under vmap and exactly in a loop); ``workdir/seeds.json`` holds the aggregate over seeds
  (``history.aggregate_seeds``). ``config.seed_parallelism`` picks vmap or loop. Returns
  {seed: history}. ``options``: as ``train_and_evaluate``.
  """
  dataset, say, custom = _unpack(options)
  run = resolve(config)
  say(f"seeds {', '.join(map(str, run.seeds))} ({run.seed_parallelism})")
  directories = [workdir.seed_dir(workdir_path, seed) for seed in run.seeds]
  histories = _train(run, directories, custom, say, workdir.path(workdir_path), dataset)
  by_seed = dict(zip(run.seeds, histories))
  for seed, records in by_seed.items():
    _say_best(records, say, prefix=f"seed {seed}: ")
  aggregate = history.aggregate_seeds(by_seed)
  if jax.process_index() == 0:
    workdir.write_seeds(
      workdir_path,
      {"model": run.model, "seed_parallelism": run.seed_parallelism, **aggregate},
    )
  best = aggregate["best_val_accuracy"]
  if best:
    say(
      f"best val_accuracy over {len(run.seeds)} seeds: {best['mean']:.4f} ± {best['std']:.4f} "
      f"(min {best['min']:.4f}, max {best['max']:.4f})"
    )
  return by_seed
