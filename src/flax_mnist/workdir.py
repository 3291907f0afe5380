"""A training workdir's files: their names, atomic JSON writes, the history, resume checks.

Paths are ``etils.epath.Path``, so a ``gs://bucket/run`` workdir is a bucket path, not a
local folder named ``gs:`` (``pathlib.Path`` collapses the double slash).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import socket
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

from etils import epath

from flax_mnist.errors import ConfigError, FlaxMnistError, WorkdirError

CONFIG_FILE = "config.json"  # The config the run trained with, every "auto" resolved.
HISTORY_FILE = "history.json"  # One record per epoch.
RUN_FILE = "run.json"  # The last invocation that trained: compile times, hardware, versions.
SEEDS_FILE = "seeds.json"  # A multi-seed workdir's aggregate over seeds.
SEED_DIR = "seed_{}"  # Each seed's workdir inside a multi-seed workdir.
TENSORBOARD_DIR = "tensorboard"
LOCK_FILE = ".lock"  # Held (flock) by the run training in the workdir.
CHECKPOINTS_DIR = "checkpoints"

PathLike = str | os.PathLike


def path(workdir: PathLike) -> epath.Path:
  """``workdir`` as an epath (local, or ``gs://...``)."""
  return epath.Path(workdir)


def absolute(workdir: PathLike) -> epath.Path:
  """``workdir`` made absolute if it is local (orbax wants absolute paths); a URL as it is."""
  workdir = path(workdir)
  return workdir if "://" in os.fspath(workdir) else workdir.resolve()


def seed_dir(workdir: PathLike, seed: int) -> epath.Path:
  """Seed ``seed``'s own workdir inside the multi-seed workdir ``workdir``."""
  return path(workdir) / SEED_DIR.format(seed)


def prepare(workdir: PathLike) -> epath.Path:
  """Creates ``workdir`` (and its parents) for writing; one line if it cannot be one."""
  directory = path(workdir)
  try:
    directory.mkdir(parents=True, exist_ok=True)
  except FileExistsError:
    raise WorkdirError(f"{directory}: is a file, expected a directory for the run") from None
  except NotADirectoryError:
    raise WorkdirError(f"{directory}: a parent of it is a file, expected directories") from None
  except PermissionError:
    raise WorkdirError(f"{directory}: cannot be created (permission denied)") from None
  if not directory.is_dir():
    raise WorkdirError(f"{directory}: is a file, expected a directory for the run")
  if _is_local(directory) and not os.access(directory, os.W_OK | os.X_OK):
    raise WorkdirError(f"{directory}: not writable (permission denied)")
  return directory


def _is_local(directory: epath.Path) -> bool:
  return "://" not in os.fspath(directory)


@contextlib.contextmanager
def lock(workdir: PathLike) -> Iterator[None]:
  """Holds an exclusive lock on ``workdir`` (``flock`` on ``.lock``) for a whole run: a second
  run on it is refused in one line. The kernel drops the lock when its process dies, so a killed
  run leaves no stale lock. (Local paths only: a bucket has no locks.)"""
  directory = path(workdir)
  if not _is_local(directory):
    yield
    return
  file = open(os.fspath(directory / LOCK_FILE), "a+")  # noqa: SIM115 (held for the run)
  try:
    try:
      fcntl.flock(file, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
      file.seek(0)
      holder = file.read().strip() or "another process"
      raise WorkdirError(
        f"{directory}: another run ({holder}) is training in it; wait for it to end or use "
        "another workdir"
      ) from None
    file.seek(0)
    file.truncate()
    file.write(f"pid {os.getpid()} on {socket.gethostname()}")
    file.flush()
    yield
  finally:
    file.close()


def write_json(file: PathLike, value: Any) -> None:
  """Writes JSON atomically: a reader never sees a half-written file."""
  file = path(file)
  temporary = file.parent / (file.name + ".tmp")
  temporary.write_text(json.dumps(value, indent=2) + "\n")
  temporary.replace(file)  # Atomic on a local filesystem; a copy + delete on GCS.


def read_json(file: PathLike, hint: str = "move it away to resume") -> Any:
  """Parses a JSON file; an empty, damaged or non-text one is a one-line error naming it and
  ending with ``hint`` (what to do)."""
  file = path(file)
  try:
    return json.loads(file.read_text())
  except UnicodeDecodeError:
    raise FlaxMnistError(f"{file}: not valid JSON (not UTF-8 text); {hint}") from None
  except json.JSONDecodeError as error:
    if not error.doc.strip():
      raise FlaxMnistError(f"{file}: empty; {hint}") from None
    raise FlaxMnistError(
      f"{file}: not valid JSON ({error.msg} at line {error.lineno}); {hint}"
    ) from None


def read_history(workdir: PathLike, last_epoch: int) -> list[dict[str, Any]]:
  """A workdir's recorded epochs up to ``last_epoch`` ([] if it has no history.json)."""
  file = path(workdir) / HISTORY_FILE
  if not file.exists():
    return []
  return [record for record in read_json(file) if record["epoch"] <= last_epoch]


# What a field held in runs written before it existed (their config.json lacks it).
LEGACY_VALUES = {
  "optimizer": "adam",
  "lr_schedule": "constant",
  "model_kwargs": {},
  "label_smoothing": 0.0,
  "grad_clip_norm": 0.0,
  "weight_decay": 0.0,
}


def check_resumable(
  workdir: PathLike, config: Mapping[str, Any], fields: Sequence[str] = ("model", "seed")
) -> None:
  """A workdir's run may be resumed only by a config equal to it in ``fields`` (those that change
  what training computes): a one-line error names every field that differs."""
  file = path(workdir) / CONFIG_FILE
  if not file.exists():
    return
  previous = read_json(file)
  changed = []
  for field in fields:
    if field not in config:
      continue
    before = previous.get(field, LEGACY_VALUES.get(field, config[field]))
    if before != config[field]:
      changed.append((field, before, config[field]))
  if not changed:
    return
  held = ", ".join(f"{field} {before!r}" for field, before, _ in changed)
  wanted = ", ".join(f"config.{field} is {now!r}" for field, _, now in changed)
  raise ConfigError(f"{workdir}: holds a run with {held}, {wanted}; use another workdir")
