"""Trains the study's models from every seed: the one module of the study that imports the
trainer. Each model's experiment config (``configs/<model>.py``) is used as it is, with the
study's seeds and epochs, so an override in a config file reaches the study.
"""

from __future__ import annotations

import copy
import os
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import ml_collections

from flax_mnist import config as config_lib
from flax_mnist import train
from flax_mnist import workdir as workdir_lib
from flax_mnist.errors import ConfigError
from flax_mnist.study import stats


def study_config(
  name: str, config: ml_collections.ConfigDict, seeds: Sequence[int], num_epochs: int
) -> ml_collections.ConfigDict:
  """A validated copy of model ``name``'s ``config`` set to train ``seeds`` for ``num_epochs``."""
  if config.get("model") != name:
    raise ConfigError(f"study of {name}: its config trains model {config.get('model')!r}")
  config = copy.deepcopy(config)
  config.update(num_epochs=num_epochs, seeds=tuple(seeds), progress_bar=False)
  config_lib.validate_config(config)
  return config


def _check_not_longer(model_dir: Path, seeds: Sequence[int], num_epochs: int) -> None:
  """Refuses seed workdirs trained for more epochs than the study asks: their histories would
  be reported as ``num_epochs`` epochs from longer runs (the best epoch, the final figures)."""
  for seed in seeds:
    directory = workdir_lib.seed_dir(model_dir, seed)
    held = len(workdir_lib.read_history(directory, last_epoch=2**31))
    if held > num_epochs:
      raise ConfigError(
        f"{directory}: holds {held} epochs, the study asks for {num_epochs}: a report of "
        f"{num_epochs} epochs from it would mix; pass --epochs {held} (or more), or another "
        "--workdir"
      )


def _run_facts(model_dir: Path, seeds: Sequence[int]) -> dict[str, Any]:
  """Compile seconds and parallelism from the seeds' run.json files (written when they trained)."""
  for seed in seeds:
    file = workdir_lib.seed_dir(model_dir, seed) / workdir_lib.RUN_FILE
    if file.exists():
      run = workdir_lib.read_record(file, dict, ("compile_seconds", "seed_parallelism"))
      return {
        "compile_seconds": sum(run["compile_seconds"].values()),
        "seed_parallelism": run["seed_parallelism"],
      }
  return {"compile_seconds": None, "seed_parallelism": None}


def train_model(
  config: ml_collections.ConfigDict,
  model_dir: Path,
  print_fn: Callable[[str], None] | None,
) -> dict[str, Any]:
  """Trains (or resumes) ``config``'s seeds into ``model_dir``; returns ``read_model``'s results.
  One model of a comparison, one trial of a sweep."""
  seeds, num_epochs = list(config.seeds), config.num_epochs
  pending = any(
    len(workdir_lib.read_history(workdir_lib.seed_dir(model_dir, seed), num_epochs)) < num_epochs
    for seed in seeds
  )
  started = time.perf_counter()
  histories = train.train_seeds(config, model_dir, print_fn=print_fn)
  wall_seconds = time.perf_counter() - started
  if pending:
    record = {"wall_seconds": wall_seconds, "seeds": seeds, "num_epochs": num_epochs}
    workdir_lib.write_wall_seconds(model_dir, record)
  return read_model(config, model_dir, histories)


def read_model(
  config: ml_collections.ConfigDict,
  model_dir: Path,
  histories: Mapping[int, Sequence[Mapping[str, Any]]] | None = None,
) -> dict[str, Any]:
  """A trained model's results from its workdirs: its parameter facts, config, compile and wall
  seconds, and per-seed ``histories`` (default: each seed's history.json, to config.num_epochs)."""
  seeds, num_epochs = list(config.seeds), config.num_epochs
  if histories is None:
    histories = {
      seed: workdir_lib.read_history(workdir_lib.seed_dir(model_dir, seed), num_epochs)
      for seed in seeds
    }
  wall_file = model_dir / workdir_lib.WALL_FILE
  recorded = workdir_lib.read_record(wall_file, dict) if wall_file.is_file() else {}
  kwargs = config_lib.config_to_dict(config)["model_kwargs"]
  return {
    "facts": stats.model_facts(config.model, kwargs),
    "config": config_lib.config_to_dict(config),
    **_run_facts(model_dir, seeds),
    "wall_seconds": recorded.get("wall_seconds"),
    "histories": {str(seed): records for seed, records in histories.items()},
  }


def run_comparison(
  configs: Mapping[str, ml_collections.ConfigDict],
  seeds: Sequence[int],
  num_epochs: int,
  workdir: str | os.PathLike,
  *,
  print_fn: Callable[[str], None] | None = print,
) -> dict[str, Any]:
  """Trains every model ({name: its experiment config}) from every seed into
  ``workdir/<model>/seed_<seed>`` (resuming what is there) and returns the results:
  settings, environment, and per model its facts, config, per-seed histories and summary, plus
  the pairwise tests. Every config is checked before the first model trains.
  """
  say = print_fn or (lambda line: None)
  seeds = list(seeds)
  configs = {
    name: study_config(name, config, seeds, num_epochs) for name, config in configs.items()
  }
  for name in configs:
    _check_not_longer(Path(workdir) / name, seeds, num_epochs)
  results: dict[str, Any] = {"models": {}}
  for name, config in configs.items():
    say(f"== {name}: seeds {', '.join(map(str, seeds))}, {num_epochs} epochs")
    model_dir = Path(workdir) / name
    results["models"][name] = train_model(config, model_dir, print_fn)
  return stats.build_results(results, seeds=seeds, num_epochs=num_epochs)
