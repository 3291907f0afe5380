"""A training workdir's files: their names, atomic JSON writes, the history, resume checks.

Paths are ``etils.epath.Path``, so a ``gs://bucket/run`` workdir is a bucket path, not a
local folder named ``gs:`` (``pathlib.Path`` collapses the double slash).

A workdir may come from elsewhere (a colleague's, a download): what it holds is data. Every JSON
file is checked for the shape this module writes before a field is read (one line naming the file
otherwise), and no path under a workdir may lead out of it (``check_contained``): a symlinked
``checkpoints/latest`` would make a resume delete and overwrite another run's checkpoint.
"""

from __future__ import annotations

import contextlib
import errno
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
# Beside a study model's seed workdirs: the wall time of the invocation that trained them
# (re-running the report later, with nothing left to train, does not lose it).
WALL_FILE = "wall_seconds.json"
TRIAL_FILE = "trial.json"  # A sweep trial's overrides, and the process that last ran it.
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
  except OSError as error:  # A name too long, a read-only file system: the path is unusable.
    reason = os.strerror(error.errno) if error.errno else type(error).__name__
    raise WorkdirError(f"{directory}: cannot be created ({reason}); use another workdir") from None
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


def write_bytes(file: PathLike, data: bytes) -> None:
  """Writes ``data`` atomically: a reader never sees a half-written file (a temporary beside it,
  then renamed over it)."""
  file = path(file)
  if file.is_dir():
    raise IsADirectoryError(errno.EISDIR, "a directory, not a file", os.fspath(file))
  temporary = file.parent / (file.name + ".tmp")
  try:
    temporary.write_bytes(data)
    temporary.replace(file)  # Atomic on a local filesystem; a copy + delete on GCS.
  except OSError as error:
    if temporary.exists():
      temporary.unlink()  # Nothing half-written is left beside the file.
    if error.filename is None:  # (epath's replace names no file.)
      raise OSError(error.errno, error.strerror or str(error), os.fspath(file)) from error
    raise


def write_text(file: PathLike, text: str) -> None:
  """Writes ``text`` (UTF-8) atomically, as ``write_bytes``."""
  write_bytes(file, text.encode("utf-8"))


def write_json(file: PathLike, value: Any) -> None:
  """Writes JSON atomically: a reader never sees a half-written file."""
  write_text(file, json.dumps(value, indent=2) + "\n")


def write_config(workdir: PathLike, record: Mapping[str, Any]) -> None:
  """config.json: the config the run trains with, every "auto" resolved, and its data."""
  write_json(path(workdir) / CONFIG_FILE, record)


def write_history(workdir: PathLike, records: Sequence[Mapping[str, Any]]) -> None:
  """history.json: one record per epoch."""
  write_json(path(workdir) / HISTORY_FILE, list(records))


def write_run(workdir: PathLike, record: Mapping[str, Any]) -> None:
  """run.json: the last invocation that trained (compile times, hardware, versions)."""
  write_json(path(workdir) / RUN_FILE, record)


def write_seeds(workdir: PathLike, record: Mapping[str, Any]) -> None:
  """seeds.json: a multi-seed workdir's aggregate over its seeds."""
  write_json(path(workdir) / SEEDS_FILE, record)


def write_wall_seconds(workdir: PathLike, record: Mapping[str, Any]) -> None:
  """wall_seconds.json: how long a study's invocation took to train a model's seeds."""
  write_json(path(workdir) / WALL_FILE, record)


def write_trial(workdir: PathLike, record: Mapping[str, Any]) -> None:
  """trial.json: a sweep trial's name and overrides, and which process ran it, from when to when."""
  write_json(path(workdir) / TRIAL_FILE, record)


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


def read_record(
  file: PathLike,
  kind: type,
  fields: Sequence[str] = (),
  hint: str = "move it away to resume",
) -> Any:
  """A JSON file of this module's shape: a ``kind`` (``dict``, or ``list`` of dicts) whose every
  object has ``fields``; anything else (empty, damaged, another shape) is one line naming the
  file and ending with ``hint``."""
  value = read_json(file, hint)
  items = value if kind is list else [value]
  if not isinstance(value, kind) or not all(isinstance(item, dict) for item in items):
    wanted = "a list of objects" if kind is list else "an object"
    raise WorkdirError(f"{path(file)}: a JSON {type(value).__name__}, expected {wanted}; {hint}")
  for item in items:
    missing = [field for field in fields if field not in item]
    if missing:
      raise WorkdirError(f"{path(file)}: no {', '.join(missing)} in {item!r:.80}; {hint}")
  return value


def check_history(records: Any, where: str, hint: str = "move it away to resume") -> list:
  """``records`` is a history: a list of objects, each with an integer ``epoch``."""
  if not isinstance(records, list) or not all(
    isinstance(record, dict)
    and isinstance(record.get("epoch"), int)
    and not isinstance(record.get("epoch"), bool)
    for record in records
  ):
    raise WorkdirError(
      f"{where}: expected a list of epoch records, each with an integer epoch; {hint}"
    )
  return records


def read_history(workdir: PathLike, last_epoch: int) -> list[dict[str, Any]]:
  """A workdir's recorded epochs up to ``last_epoch`` ([] if it has no history.json)."""
  file = path(workdir) / HISTORY_FILE
  if not file.exists():
    return []
  records = check_history(read_json(file), str(file))
  return [record for record in records if record["epoch"] <= last_epoch]


def read_config(workdir: PathLike) -> dict[str, Any] | None:
  """A workdir's config.json (an object), or None if it has none."""
  file = path(workdir) / CONFIG_FILE
  return read_record(file, dict) if file.exists() else None


def check_contained(workdir: PathLike) -> None:
  """Refuses a workdir in which any path (a file, a checkpoint directory, ``.lock``) is a link
  that resolves outside it: resuming or reading through it would touch another run's files."""
  directory = path(workdir)
  if not _is_local(directory) or not directory.is_dir():
    return
  root = os.path.realpath(os.fspath(directory))
  for parent, names, files in os.walk(root):
    for name in (*names, *files):
      entry = os.path.join(parent, name)
      if not os.path.islink(entry):
        continue
      target = os.path.realpath(entry)
      if os.path.commonpath([root, target]) != root:
        shown = os.path.join(os.fspath(directory), os.path.relpath(entry, root))
        raise WorkdirError(
          f"{shown}: a link to {target}, outside the workdir; a workdir's files must be its "
          "own (copy them in, or use another workdir)"
        )


# What a run recorded before a result field existed computed: its value then (no augmentation),
# so that such a workdir resumes under the same settings and is refused under others.
RECORDED_BEFORE_THE_FIELD = {"augment": {"shift": 0}, "adam_b1": 0.9, "adam_b2": 0.999}


def check_resumable(
  where: str,
  previous: Mapping[str, Any],
  config: Mapping[str, Any],
  fields: Sequence[str] = ("model", "seed"),
  *,
  names: Mapping[str, str] | None = None,
) -> None:
  """A run recorded as ``previous`` (its checkpoint's config, else config.json; ``where`` names
  it) may be resumed only by a config equal to it in ``fields`` (those that change what
  training computes): a one-line error names every field that differs. A field recorded on one
  side only differs too. ``names``: how to name this run's value of a field that is not a config
  field (default ``config.<field> is``)."""
  previous = {**RECORDED_BEFORE_THE_FIELD, **previous}
  changed = []
  for field in fields:
    if field not in config and field not in previous:
      continue
    before, now = previous.get(field, "(not set)"), config.get(field, "(not set)")
    if before != now:
      changed.append((field, before, now))
  if not changed:
    return
  held = ", ".join(f"{field} {before!r}" for field, before, _ in changed)
  names = names or {}
  wanted = ", ".join(
    f"{names.get(field, f'config.{field} is')} {now!r}" for field, _, now in changed
  )
  raise ConfigError(f"{where}: holds a run with {held}, {wanted}; use another workdir")


def seed_dirs(workdir: PathLike) -> dict[int, epath.Path]:
  """The ``seed_<seed>`` directories of a multi-seed workdir, by seed."""
  directory = path(workdir)
  if not directory.is_dir():
    return {}
  prefix = SEED_DIR.format("")
  found = {}
  for entry in directory.iterdir():
    suffix = entry.name[len(prefix) :]
    if entry.name.startswith(prefix) and suffix.isdigit() and entry.is_dir():
      found[int(suffix)] = entry
  return dict(sorted(found.items()))


def check_single_seed(workdir: PathLike) -> None:
  """Refuses to train one seed into a multi-seed workdir (it would sit beside its seeds)."""
  directory = path(workdir)
  if (directory / SEEDS_FILE).exists() or seed_dirs(directory):
    raise WorkdirError(
      f"{directory}: holds a multi-seed run ({SEEDS_FILE}, {SEED_DIR.format('<seed>')}/): "
      f"train it with several seeds, or give {directory / SEED_DIR.format('<seed>')} or another "
      "workdir"
    )


def check_multi_seed(
  workdir: PathLike, seeds: Sequence[int], run: Mapping[str, Any], fields: Sequence[str]
) -> None:
  """Several seeds go into ``workdir`` only if it holds no single-seed run, its seeds trained
  ``run`` (equal in ``fields``, the seed apart), and ``seeds`` keeps every seed it holds:
  seeds.json aggregates them all, so a rerun with fewer seeds would drop some from it."""
  directory = path(workdir)
  if (directory / CONFIG_FILE).exists() or (directory / CHECKPOINTS_DIR).exists():
    raise WorkdirError(
      f"{directory}: holds a single-seed run ({CONFIG_FILE}, {CHECKPOINTS_DIR}/): train several "
      "seeds into another workdir"
    )
  held = seed_dirs(directory)
  for seed_directory in held.values():
    recorded = read_config(seed_directory)
    if recorded is not None:
      check_resumable(f"{directory}", recorded, run, [f for f in fields if f != "seed"])
  dropped = [seed for seed in held if seed not in seeds]
  if dropped:
    raise ConfigError(
      f"{directory}: holds seeds {', '.join(map(str, held))}; training seeds "
      f"{', '.join(map(str, seeds))} would drop {', '.join(map(str, dropped))} from its "
      f"{SEEDS_FILE}: list every seed in config.seeds, or use another workdir"
    )
