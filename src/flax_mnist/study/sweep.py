"""Sweeps: config fields over values, each trial trained over seeds in its own workdir.

A sweep is a list of trials, each a base config with some fields overridden: the product of
``--sweep FIELD=V1,V2,...`` axes (``parse_axis``, ``product``), or the override dicts a config
file's ``sweep()`` yields (kauldron's convention) for sweeps that are not products. Every trial
is checked (fields, values, the model built at its size) before the first one trains. Each
trains through ``train.train_seeds`` into ``<workdir>/<trial name>/seed_<seed>/`` (vmapped seeds
on GPU/TPU, looped on CPU, as always) and resumes what is there: rerunning a finished sweep trains
nothing. ``sweep_report`` turns the trials' workdirs into results.json and report.md.

Where the trials run:
  - ``run_local``: in this process (``parallel`` 1), or ``parallel`` trials at once, each in a
    process of its own (``concurrent.futures.ProcessPoolExecutor``, spawned);
  - ``run_submitit``: one job-array task per trial through submitit (``slurm_executor`` for
    SLURM, with requeue on preemption: a requeued trial resumes from its workdir; submitit's
    ``LocalExecutor`` runs the same array as local processes). ``sbatch_script`` is the array
    job SLURM would be given.
"""

from __future__ import annotations

import ast
import concurrent.futures
import contextlib
import copy
import dataclasses
import difflib
import itertools
import multiprocessing
import os
import re
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import ml_collections
from flax import nnx

from flax_mnist import config as config_lib
from flax_mnist import models
from flax_mnist import workdir as workdir_lib
from flax_mnist.errors import ConfigError, FlaxMnistError, RunError
from flax_mnist.study import run as study_run

# A field under model_kwargs is the factory's argument: any Python literal (the factory checks).
_FREE_FORM = ("model_kwargs",)


@dataclasses.dataclass(frozen=True)
class Trial:
  """One trial: its name (its workdir's), the overrides that make it, its whole config (plain
  data, so that it pickles to another process or a SLURM task) and its workdir."""

  name: str
  overrides: dict[str, Any]
  config: dict[str, Any]
  workdir: str


def parse_axis(spec: str, base: Mapping[str, Any]) -> tuple[str, list[Any]]:
  """``FIELD=V1,V2,...`` as (field, values), each value parsed as ``base``'s field is typed; a
  ConfigError names an unknown field or a value that is not of the field's type."""
  field, equals, text = spec.partition("=")
  field = field.strip()
  if not equals or not field or not text.strip():
    raise ConfigError(
      f"--sweep {spec!r}: expected FIELD=V1,V2,... (a config field, dots for nested ones)"
    )
  current = _field_value(base, field)
  values = [_parse_value(field, item.strip(), current) for item in text.split(",")]
  repeated = sorted({repr(value) for value in values if values.count(value) > 1})
  if repeated:
    raise ConfigError(f"--sweep {spec}: {', '.join(repeated)} given more than once")
  return field, values


_MISSING = object()


def _field_value(base: Mapping[str, Any], field: str) -> Any:
  """The value of ``field`` (dotted) in ``base``; ``_MISSING`` under a free-form field."""
  node: Any = base
  parts = field.split(".")
  for depth, part in enumerate(parts):
    where = ".".join(parts[:depth])
    if where in _FREE_FORM:
      return node[part] if part in node else _MISSING
    if not hasattr(node, "keys"):
      raise ConfigError(f"--sweep {field}: config.{where} is not a config with fields")
    if part not in node:
      known = sorted(node.keys())
      near = difflib.get_close_matches(part, known, n=1)
      hint = f" (did you mean {'.'.join([*parts[:depth], near[0]])}?)" if near else ""
      raise ConfigError(f"--sweep {field}: config has no field {field}{hint}")
    node = node[part]
  return node


def _parse_value(field: str, text: str, current: Any) -> Any:
  """``text`` as a value of ``field``, whose value in the base config is ``current``."""
  try:
    if current is _MISSING or isinstance(current, (tuple, list)) or hasattr(current, "keys"):
      try:
        return ast.literal_eval(text)
      except (ValueError, SyntaxError):
        if current is _MISSING and re.fullmatch(r"[A-Za-z_][\w.\-]*", text):
          return text
        raise
    if isinstance(current, bool):
      booleans = {"true": True, "false": False, "1": True, "0": False}
      return booleans[text.lower()]
    if isinstance(current, int):
      return int(text)
    if isinstance(current, float):
      return float(text)
    return text  # A string field (or an unset placeholder: data_dir).
  except (ValueError, SyntaxError, KeyError):
    kind = config_lib.kind_of(current) if current is not _MISSING else "a Python literal"
    raise ConfigError(
      f"--sweep {field}={text}: expected {kind} (the config has {current!r})"
    ) from None


def product(axes: Sequence[tuple[str, Sequence[Any]]]) -> list[dict[str, Any]]:
  """Every combination of the axes' values, the first axis slowest: one override dict each."""
  fields = [field for field, _ in axes]
  return [dict(zip(fields, values)) for values in itertools.product(*(v for _, v in axes))]


def trial_name(overrides: Mapping[str, Any]) -> str:
  """A directory name for the trial: ``model_kwargs.width=0.5_learning_rate=0.003``."""
  parts = [f"{field}={_short(value)}" for field, value in overrides.items()]
  name = "_".join(parts) or "base"
  return re.sub(r"[^A-Za-z0-9._=+\-]", "-", name)


def _short(value: Any) -> str:
  return repr(value) if not isinstance(value, (int, float, str)) else str(value)


def make_trials(
  base: ml_collections.ConfigDict,
  overrides: Iterable[Mapping[str, Any]],
  seeds: Sequence[int],
  num_epochs: int,
  workdir: str | os.PathLike,
) -> list[Trial]:
  """The trials of ``overrides`` on ``base``, each checked (its fields, values, and its model
  built at its size) before anything trains; a ConfigError names the first bad one."""
  trials = []
  for index, changes in enumerate(overrides):
    if not isinstance(changes, Mapping):
      raise ConfigError(f"sweep trial {index}: {changes!r} is not a dict of field overrides")
    name = trial_name(changes)
    config = with_overrides(base, changes)
    try:
      config = study_run.study_config(config.model, config, seeds, num_epochs)
    except ConfigError as error:
      raise ConfigError(f"sweep trial {name}: {error}") from None
    _check_model(name, config)
    trials.append(Trial(name, dict(changes), config_lib.config_to_dict(config), str(workdir)))
  names = [trial.name for trial in trials]
  if len(set(names)) != len(names):
    raise ConfigError(f"sweep: trials named alike ({', '.join(names)}): give distinct values")
  if not trials:
    raise ConfigError("sweep: no trials (an empty sweep() or no --sweep values)")
  return trials


def with_overrides(
  base: ml_collections.ConfigDict, overrides: Mapping[str, Any]
) -> ml_collections.ConfigDict:
  """A copy of ``base`` with ``overrides`` ({dotted field: value}); a ConfigError names a field
  it does not have."""
  config = copy.deepcopy(base)
  for field, value in overrides.items():
    _field_value(base, field)  # Names an unknown field.
    _set(config, field, value)
  return config


def _set(config: ml_collections.ConfigDict, field: str, value: Any) -> None:
  *parents, last = field.split(".")
  node = config
  for part in parents:
    node = node[part]
  with node.unlocked() if hasattr(node, "unlocked") else contextlib.nullcontext():
    node[last] = value


def _check_model(name: str, config: ml_collections.ConfigDict) -> None:
  """The trial's model builds at its settings (a bad width or a misspelt factory argument is
  one line now, not a traceback after the other trials trained)."""
  kwargs = config_lib.config_to_dict(config)["model_kwargs"] or {}
  try:
    models.create_model(config.model, rngs=nnx.Rngs(0), **kwargs)
  except Exception as error:  # noqa: BLE001 (a factory may raise anything for bad arguments)
    lines = str(error).strip().splitlines()
    reason = lines[0] if lines else ""
    if not isinstance(error, FlaxMnistError):
      reason = f"{type(error).__name__}: {reason}"
    raise ConfigError(
      f"sweep trial {name}: model {config.model!r} with model_kwargs {kwargs}: {reason}"
    ) from None


def trial_dir(trial: Trial) -> Path:
  return Path(trial.workdir) / trial.name


def run_trial(trial: Trial, print_fn: Callable[[str], None] | None = print) -> str:
  """Trains (or resumes) ``trial``'s seeds in its workdir and records where and when it ran
  (``trial.json``: process, start and end); returns its name. What a launcher runs."""
  directory = trial_dir(trial)
  started = time.time()
  say = None if print_fn is None else (lambda line: print_fn(f"[{trial.name}] {line}"))
  study_run.train_model(ml_collections.ConfigDict(trial.config), directory, say)
  record = {"name": trial.name, "overrides": trial.overrides, "pid": os.getpid()}
  workdir_lib.write_trial(directory, {**record, "started": started, "finished": time.time()})
  return trial.name


def run_local(trials: Sequence[Trial], parallel: int = 1) -> None:
  """Runs the trials here (``parallel`` 1) or ``parallel`` at once, each in its own spawned
  process (JAX in a forked process is unsafe); a failed trial raises after the others finish."""
  if parallel <= 1:
    for trial in trials:
      run_trial(trial)
    return
  context = multiprocessing.get_context("spawn")
  with concurrent.futures.ProcessPoolExecutor(max_workers=parallel, mp_context=context) as pool:
    futures = {pool.submit(run_trial, trial): trial for trial in trials}
    failures = []
    for future in concurrent.futures.as_completed(futures):
      if future.exception() is not None:
        failures.append((futures[future].name, future.exception()))
  if failures:
    name, error = failures[0]
    if isinstance(error, FlaxMnistError):
      raise RunError(f"sweep trial {name}: {error}") from error
    raise error


class TrialJob:
  """A trial as a submitit job: requeued on preemption or timeout (``checkpoint``), and the
  requeued job resumes from the trial's workdir."""

  def __call__(self, trial: Trial) -> str:
    return run_trial(trial)

  def checkpoint(self, trial: Trial) -> Any:
    import submitit

    return submitit.helpers.DelayedSubmission(TrialJob(), trial)


# The array job's settings, as submitit's SlurmExecutor names them.
def slurm_parameters(
  parallel: int,
  *,
  timeout_min: int = 240,
  partition: str | None = None,
  cpus_per_task: int | None = None,
  gpus_per_node: int | None = None,
) -> dict[str, Any]:
  """One task per trial, ``parallel`` at a time (``--array=0-N%parallel``), requeued on
  preemption (SIGUSR2 ``signal_delay_s`` before the end)."""
  parameters: dict[str, Any] = {
    "time": timeout_min,
    "array_parallelism": parallel,
    "job_name": "flax_mnist_sweep",
    "signal_delay_s": 120,
  }
  optional = {"partition": partition, "cpus_per_task": cpus_per_task}
  optional["gpus_per_node"] = gpus_per_node
  return parameters | {key: value for key, value in optional.items() if value is not None}


def slurm_executor(folder: str | os.PathLike, parameters: Mapping[str, Any]) -> Any:
  """submitit's SlurmExecutor with ``parameters`` (``slurm_parameters``), logs in ``folder``."""
  import submitit

  executor = submitit.SlurmExecutor(folder=folder)
  executor.update_parameters(**parameters)
  return executor


def sbatch_script(folder: str | os.PathLike, parameters: Mapping[str, Any], count: int) -> str:
  """The sbatch file submitit writes for an array of ``count`` trials (what SLURM is given)."""
  from submitit.slurm import slurm

  command = "python -u -m submitit.core._submit " + os.fspath(folder)
  return slurm._make_sbatch_string(command=command, folder=folder, map_count=count, **parameters)


def run_submitit(trials: Sequence[Trial], executor: Any) -> list[str]:
  """Submits the trials as one job array of ``executor`` (SLURM's, or submitit's local one)
  and waits for every task; returns the trials' names."""
  jobs = executor.map_array(TrialJob(), list(trials))
  return [job.result() for job in jobs]
