"""The training loop: ``train_and_evaluate`` (one seed) and ``train_seeds`` (several, compiled
once): compile once, run the epochs (looped or vmapped seeds), stop cleanly on a signal.

The compiled parts (step, epoch, evaluation) are in ``steps``; what they start from in
``programs``; each seed's workdir bookkeeping in ``seed_run``; the config in ``config``.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import optax
from etils import epath

from flax_mnist import history, log, sharding, steps, workdir
from flax_mnist.config import RunSpec, resolve, result_fields, run_config_dict
from flax_mnist.errors import ConfigError, Interrupted
from flax_mnist.programs import Custom, Programs, make_mesh, measure_impl, put_data
from flax_mnist.seed_run import SeedRun

Say = Callable[[str], None]
State = dict[str, Any]  # {"params", "model_state", "opt_state"}


def _stack(trees: Sequence[Any]) -> Any:
  return jax.tree.map(lambda *leaves: jnp.stack(leaves), *trees)


def _unstack(tree: Any, index: int) -> Any:
  return jax.tree.map(lambda leaf: leaf[index], tree)


class _Trainer:
  """Compiles the epoch once for every pending seed, then trains them (looped or vmapped)."""

  def __init__(
    self,
    config: Mapping[str, Any],
    spec: RunSpec,
    runs: list[SeedRun],
    programs: Programs,
    arrays: tuple[jax.Array, ...],
    mesh: jax.sharding.Mesh | None,
    say: Say,
  ):
    self.config, self.spec, self.runs, self.programs, self.say = config, spec, runs, programs, say
    self.mesh = mesh
    self.train_images, self.train_labels, self.test_images, self.test_labels = arrays
    self.num_epochs = config["num_epochs"]
    self.over_seeds = spec.seed_parallelism == "vmap"
    self.keys = dict(zip(spec.seeds, programs.shuffle_keys))
    self.pending = [run for run in runs if run.start_epoch < self.num_epochs and not run.stopped]
    if self.over_seeds and len({run.start_epoch for run in runs}) > 1:
      raise ConfigError(
        "seed_parallelism 'vmap' resumes only seeds stopped at the same epoch; these are at "
        + ", ".join(f"{run.seed}: {run.start_epoch}" for run in runs)
        + "; resume with --config.seed_parallelism=loop"
      )
    self.steps_per_epoch = math.ceil(self.train_images.shape[0] / config["batch_size"])
    self.progress = log.ProgressBar(
      self.steps_per_epoch, enabled=config["progress_bar"] and not self.over_seeds
    )

  def compile(self) -> dict[str, float]:
    """Compiles the train epoch and evaluation for the pending seeds' shapes; returns seconds."""
    config, programs, pending = self.config, self.programs, self.pending
    progress = self.progress.update if self.progress.enabled else None
    train_epoch = steps.make_train_epoch(
      programs.train_graphdef,
      programs.tx,
      config["batch_size"],
      shuffle=config["shuffle"],
      progress=progress,
      over_seeds=self.over_seeds,
      mesh=self.mesh,
      loss_fn=programs.loss_fn,
    )
    evaluate = steps.make_evaluate(
      programs.eval_graphdef, config["eval_batch_size"], over_seeds=self.over_seeds, mesh=self.mesh
    )
    if self.over_seeds:
      example, example_key = self._stacked_states()
    else:
      example, example_key = pending[0].state, self.keys[pending[0].seed]
    started = time.perf_counter()
    self.train_epoch = train_epoch.lower(
      example["params"],
      example["model_state"],
      example["opt_state"],
      self.train_images,
      self.train_labels,
      example_key,
    ).compile()
    compiled_train = time.perf_counter()
    self.evaluate = evaluate.lower(
      example["params"], example["model_state"], self.test_images, self.test_labels
    ).compile()
    seconds = {
      "train_epoch": compiled_train - started,
      "evaluate": time.perf_counter() - compiled_train,
    }
    together = f" for {len(pending)} seeds at once" if self.over_seeds else ""
    self.say(
      f"compiled the train epoch ({self.steps_per_epoch} steps of {config['batch_size']}) "
      f"and evaluation{together} in {sum(seconds.values()):.1f} s"
    )
    return seconds

  def timed_epoch(self, state: State, keys: jax.Array) -> tuple:
    """One epoch of training and evaluation: (state, train metrics, val metrics, timings)."""
    started = time.perf_counter()
    params, model_state, opt_state, train_metrics = self.train_epoch(
      state["params"],
      state["model_state"],
      state["opt_state"],
      self.train_images,
      self.train_labels,
      keys,
    )
    train_metrics = sharding.to_host(train_metrics)  # Waits for the epoch.
    trained = time.perf_counter()
    val_metrics = sharding.to_host(
      self.evaluate(params, model_state, self.test_images, self.test_labels)
    )
    finished = time.perf_counter()
    timings = {
      "seconds": finished - started,
      "train_seconds": trained - started,
      "eval_seconds": finished - trained,
      "parallel_seeds": len(self.pending) if self.over_seeds else 1,
    }
    new_state = {"params": params, "model_state": model_state, "opt_state": opt_state}
    return new_state, train_metrics, val_metrics, timings

  def run(self) -> None:
    """Trains every pending seed; on SIGINT/SIGTERM waits for what is being saved and raises
    ``Interrupted`` saying which epoch is saved and how to resume."""
    try:
      self.run_vmapped() if self.over_seeds else self.run_looped()
    except KeyboardInterrupt as interrupt:
      exit_code = getattr(interrupt, "exit_code", 130)
      run, epoch = self.current
      step = f", step {self.progress.last_step} of {self.steps_per_epoch}"
      where = f"epoch {epoch}{step if self.progress.last_step else ''}"
      seed = f" (seed {run.seed})" if len(self.runs) > 1 else ""
      saved = f"epoch {epoch - 1} is saved" if epoch > 1 else "no epoch is saved yet"
      raise Interrupted(
        f"interrupted at {where}{seed}: {saved}; rerun the same command to resume", exit_code
      ) from None
    finally:
      self.progress.close()

  def run_looped(self) -> None:
    """Each pending seed after the other, through the same compiled epoch."""
    graphdef = self.programs.train_graphdef
    for run in self.pending:
      state = run.state
      for epoch in range(run.start_epoch + 1, self.num_epochs + 1):
        self.current = (run, epoch)
        self.progress.start(epoch, self.num_epochs)
        key = jax.random.fold_in(self.keys[run.seed], epoch)
        state, train_metrics, val_metrics, timings = self.timed_epoch(state, key)
        self.progress.close()
        self._report(
          run, run.finish_epoch(epoch, state, train_metrics, val_metrics, timings, graphdef)
        )
        if run.stopped:
          break

  def _stacked_states(self) -> tuple[State, jax.Array]:
    """The pending seeds' states and shuffle keys stacked on a leading axis, split over the
    mesh's ``seed`` axis."""
    states = _stack([run.state for run in self.pending])
    keys = _stack([self.keys[run.seed] for run in self.pending])
    return sharding.split_seeds(states, self.mesh), sharding.split_seeds(keys, self.mesh)

  def run_vmapped(self) -> None:
    """Every pending seed in one vmapped epoch (they all start at the same epoch)."""
    pending, graphdef = self.pending, self.programs.train_graphdef
    states, keys = self._stacked_states()
    for epoch in range(pending[0].start_epoch + 1, self.num_epochs + 1):
      self.current = (pending[0], epoch)
      epoch_keys = jax.vmap(jax.random.fold_in, in_axes=(0, None))(keys, epoch)
      states, train_metrics, val_metrics, timings = self.timed_epoch(states, epoch_keys)
      for index, run in enumerate(pending):
        if run.stopped:  # Early stopping: its later epochs are computed but not kept.
          continue
        record = run.finish_epoch(
          epoch,
          _unstack(states, index),
          _unstack(train_metrics, index),
          _unstack(val_metrics, index),
          timings,
          graphdef,
        )
        self._report(run, record)
      if all(run.stopped for run in pending):
        break

  def _report(self, run: SeedRun, record: dict[str, Any]) -> None:
    prefix = f"seed {run.seed}: " if len(self.runs) > 1 else ""
    self.say(prefix + log.format_epoch(record, self.num_epochs))
    if record.get("stopped_early"):
      metric = run.config_dict["best_metric"]
      best = history.best_record(run.history, metric)
      self.say(
        f"{prefix}stopped early at epoch {record['epoch']}: no better {metric} for "
        f"{run.config_dict['early_stopping_patience']} epochs (best at epoch {best['epoch']})"
      )


def _train(
  config: Any,
  spec: RunSpec,
  directories: list[epath.Path],
  custom: Custom,
  say: Say,
  seeds_workdir: epath.Path | None = None,
) -> list[list[dict[str, Any]]]:
  """Trains one copy of ``spec.model`` per seed, each into its directory (the seed directories
  of ``seeds_workdir``, for several seeds); returns the histories."""
  is_writer = jax.process_index() == 0
  if seeds_workdir is None:
    workdir.check_single_seed(directories[0])
  else:
    workdir.check_contained(seeds_workdir)
  mesh = make_mesh(spec)
  arrays, data_record = put_data(config, mesh, say)
  steps_per_epoch = math.ceil(arrays[0].shape[0] / config["batch_size"])
  measured = {}
  if spec.impl == "measure":
    spec, measured = measure_impl(config, spec, directories, arrays, say)
  config_dicts = [
    custom.record({**run_config_dict(config, spec, seed), **data_record}) for seed in spec.seeds
  ]
  if seeds_workdir is not None:
    run = config_dicts[0]
    workdir.check_multi_seed(seeds_workdir, spec.seeds, run, result_fields(run))
  programs = Programs(config, spec, mesh, steps_per_epoch, custom, say, arrays[0].shape[1:])
  runs: list[SeedRun] = []
  try:
    for config_dict, directory, template in zip(config_dicts, directories, programs.templates):
      runs.append(SeedRun(config_dict, directory, template, is_writer=is_writer, say=say))
    trainer = _Trainer(config, spec, runs, programs, arrays, mesh, say)
    if not trainer.pending:
      _say_nothing_to_train(runs, config["num_epochs"], say)
      return [run.history for run in runs]
    compile_seconds = trainer.compile()
    for run in trainer.pending:
      run.begin()
      if is_writer:
        workdir.write_run(
          run.workdir,
          {
            "start_epoch": run.start_epoch,
            "compile_seconds": compile_seconds,
            "seed_parallelism": spec.seed_parallelism,
            "compiled_once_for_seeds": [other.seed for other in trainer.pending],
            "resolved": spec.to_dict(),
            **data_record,
            **({"impl_seconds_per_step": measured} if measured else {}),
            "mesh": sharding.mesh_shape(mesh) if mesh is not None else {"seed": 1, "data": 1},
            **log.environment(),
          },
        )
    trainer.run()
  finally:
    for run in runs:
      run.close()
  return [run.history for run in runs]


def _say_nothing_to_train(runs: list[SeedRun], num_epochs: int, say: Say) -> None:
  for run in runs:
    done = "stopped early" if run.stopped else f"holds {run.start_epoch} epochs"
    say(
      f"nothing to train: {run.workdir} {done} (config.num_epochs is {num_epochs}); raise "
      "--config.num_epochs to train further"
    )


def _sayer(print_fn: Say | None) -> Say:
  """Prints on process 0 only (every process runs the same loop)."""
  if print_fn is None or jax.process_index() != 0:
    return lambda line: None
  return print_fn


CHANCE_ACCURACY = 0.1  # Ten balanced classes.


def _say_best(records: list[dict[str, Any]], say: Say, prefix: str = "") -> None:
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


def train_and_evaluate(
  config: Any,
  workdir: str | os.PathLike,
  *,
  print_fn: Say | None = print,
  optimizer: optax.GradientTransformation | None = None,
  loss_fn: steps.LossFn | None = None,
) -> list[dict[str, Any]]:
  """Trains ``config.model`` from ``config.seed`` for ``config.num_epochs``, validating on the
  test set after each epoch. (Several seeds: ``train_seeds``.)

  Writes into ``workdir`` (a local path or ``gs://...``): config.json, history.json, run.json
  (compile seconds, hardware, versions), checkpoints/{best,latest}, tensorboard/.
  Resumes from ``checkpoints/latest`` if present. Returns the history, one dict per epoch with
  epoch, train_loss, train_accuracy, val_loss, val_accuracy, seconds (train + eval, compile
  excluded), train_seconds, eval_seconds, parallel_seeds (1 here) and images_per_second
  (training throughput), and ``stopped_early`` on the epoch where early stopping ended it.

  ``optimizer`` (any optax transformation) replaces the config's; ``loss_fn(logits, labels)
  -> per-example losses`` replaces cross-entropy (for training and the val loss). config.json
  then records "custom" for them.
  """
  spec = resolve(config)
  if len(spec.seeds) > 1:
    raise ConfigError(f"config trains seeds {list(spec.seeds)}: use train_seeds for several seeds")
  say = _sayer(print_fn)
  spec = RunSpec(**{**spec.to_dict(), "seeds": (config["seed"],), "seed_parallelism": "loop"})
  custom = Custom(optimizer, loss_fn)
  [records] = _train(config, spec, [epath.Path(workdir)], custom, say)
  _say_best(records, say)
  return records


def train_seeds(
  config: Any,
  workdir_path: str | os.PathLike,
  *,
  print_fn: Say | None = print,
  optimizer: optax.GradientTransformation | None = None,
  loss_fn: steps.LossFn | None = None,
) -> dict[int, list[dict[str, Any]]]:
  """Trains ``config.model`` from each seed of ``config.seed_list(config)``, compiling once.

  Each seed gets a full single-seed workdir, ``workdir/seed_<seed>/`` (the same files, history
  and best checkpoint as ``train_and_evaluate`` with that seed would write, to float tolerance
  under vmap and exactly in a loop); ``workdir/seeds.json`` holds the aggregate over seeds
  (``history.aggregate_seeds``). ``config.seed_parallelism`` picks vmap or loop. Returns
  {seed: history}. ``optimizer``, ``loss_fn``: as ``train_and_evaluate``.
  """
  spec = resolve(config)
  say = _sayer(print_fn)
  say(f"seeds {', '.join(map(str, spec.seeds))} ({spec.seed_parallelism})")
  directories = [workdir.seed_dir(workdir_path, seed) for seed in spec.seeds]
  histories = _train(
    config, spec, directories, Custom(optimizer, loss_fn), say, workdir.path(workdir_path)
  )
  by_seed = dict(zip(spec.seeds, histories))
  for seed, records in by_seed.items():
    _say_best(records, say, prefix=f"seed {seed}: ")
  aggregate = history.aggregate_seeds(by_seed)
  if jax.process_index() == 0:
    workdir.write_seeds(
      workdir_path,
      {"model": spec.model, "seed_parallelism": spec.seed_parallelism, **aggregate},
    )
  best = aggregate["best_val_accuracy"]
  if best:
    say(
      f"best val_accuracy over {len(spec.seeds)} seeds: {best['mean']:.4f} ± {best['std']:.4f} "
      f"(min {best['min']:.4f}, max {best['max']:.4f})"
    )
  return by_seed
