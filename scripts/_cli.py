"""What every script shares: absl flag parsing, quiet library logs, and errors as one line.

Every error a user can cause prints one line, ``error: <culprit>: <what is wrong, what was
expected>``, on stderr, with no Python traceback; ``--debug`` (or ``FLAX_MNIST_DEBUG=1`` in the
environment) shows the traceback instead. Exit status:

  0    done;
  1    a failure at run time: training failed (``RunError``), a file system error while writing;
  2    bad input: a flag, a config file or field, a data file, a workdir, an image, a checkpoint
       (every ``FlaxMnistError`` but ``RunError``); nothing saved before is changed;
  130  interrupted (Ctrl-C, SIGINT); 143: terminated (SIGTERM).

A warning (``warning: ...``, on stderr) leaves the exit status 0. An unexpected exception, a bug,
keeps its traceback and exits 1. Not part of the library: the library reads no flags.

A config flag takes ``--config=path`` or ml_collections' ``--config=path:arg``, which passes ``arg``
to the file's ``get_config(arg)``; the project's configs take no argument, and say so in one line.
"""

from __future__ import annotations

import difflib
import errno
import os
import re
import signal
import socket
import sys
import tempfile
import threading
import time
import traceback
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, NoReturn

from absl import app, flags, logging
from ml_collections.config_flags import config_flags

from flax_mnist import FlaxMnistError, models
from flax_mnist.config import config_file_raised, kind_of, load_config_file
from flax_mnist.errors import ConfigError, Interrupted

REPO_ROOT = Path(__file__).resolve().parents[1]
CONFIGS_DIR = REPO_ROOT / "configs"
DEBUG_ENV = "FLAX_MNIST_DEBUG"

_DEBUG = flags.DEFINE_bool(
  "debug", False, f"On an error, show the Python traceback (or set {DEBUG_ENV}=1)."
)


def fail(message: str, exit_code: int = 2) -> NoReturn:
  """Prints ``error: message`` (one line) on stderr and exits with ``exit_code``."""
  print(f"error: {_one_line(message)}", file=sys.stderr)
  sys.exit(exit_code)


def fail_now(message: str, exit_code: int = 1) -> NoReturn:
  """``fail`` from any thread, at once: for a process whose main thread is blocked inside JAX (in
  ``jax.distributed.initialize`` or a collective waiting for another process), which neither
  unwinds nor runs exit handlers (JAX's would wait for the other processes again)."""
  os.write(2, f"error: {_one_line(message)}\n".encode())
  os._exit(exit_code)


def warn(message: str) -> None:
  """Prints ``warning: message`` (one line) on stderr; the run goes on."""
  print(f"warning: {_one_line(message)}", file=sys.stderr)


def model_config(name: str):
  """The experiment config of model ``name``: ``configs/<name>.py``."""
  return load_config_file(CONFIGS_DIR / f"{name}.py")


def check_model_names(names: Sequence[str], flag: str = "--models") -> list[str]:
  """``names`` if it lists at least one model of the family, each once; else a one-line error."""
  known = models.model_names()
  expected = f"expected a comma-separated list of {', '.join(known)}"
  if not names:
    fail(f"{flag}: empty, {expected}")
  unknown = [name for name in names if name not in known]
  if unknown:
    fail(
      f"{flag}: unknown {', '.join(map(repr, unknown))}{_nearest(unknown[0], known)}; {expected}"
    )
  repeated = sorted({name for name in names if names.count(name) > 1})
  if repeated:
    fail(f"{flag}: {', '.join(repeated)} given more than once; {expected}, each once")
  return list(names)


def check_writable_dir(directory: str | os.PathLike, flag: str) -> Path:
  """Creates ``directory`` if needed and checks a file can be written in it, before any work is
  done (so that a long run does not fail at its last step); a one-line error names ``flag``."""
  directory = Path(directory)
  if "://" in os.fspath(directory):  # A bucket: nothing to check locally.
    return directory
  try:
    directory.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryFile(dir=directory):
      pass
  except OSError as error:
    fail(
      f"{directory}: cannot write there ({_path_problem(directory, error)}); pass {flag} with a "
      "writable directory"
    )
  return directory


def _path_problem(path: Path, error: OSError) -> str:
  """Why ``path`` cannot be created or written in, in words (``error`` came from trying)."""
  if error.errno == errno.ENAMETOOLONG:
    return _name_too_long(path)
  if os.path.exists(path) and not os.path.isdir(path):  # (os.path's never raise.)
    return "a file, not a directory"
  if isinstance(error, (FileExistsError, NotADirectoryError)):
    return "under a file, not a directory"
  return error.strerror or type(error).__name__


def _name_too_long(path: str | os.PathLike) -> str:
  """Which part of ``path`` is too long for the file system (ENAMETOOLONG), and its limit."""
  path = Path(path)
  existing = next((parent for parent in path.parents if os.path.isdir(parent)), Path("."))
  try:
    name_max, path_max = (os.pathconf(existing, name) for name in ("PC_NAME_MAX", "PC_PATH_MAX"))
  except (OSError, ValueError):
    name_max, path_max = 255, 4096  # Linux's.
  longest = max(path.parts, key=lambda part: len(os.fsencode(part)), default="")
  if len(os.fsencode(longest)) > name_max:
    return (
      f"File name too long: a name of {len(os.fsencode(longest))} bytes, the file system takes "
      f"at most {name_max}"
    )
  return (
    f"File name too long: a path of {len(os.fsencode(path))} bytes, the file system takes at "
    f"most {path_max}"
  )


def _terminated(signum: int, frame: object) -> None:
  """SIGTERM (a scheduler's pre-emption, ``kill``) unwinds like Ctrl-C: the run saves what it
  finished, says how to resume, and exits 143."""
  del signum, frame
  raise Interrupted("terminated", 143)


def _interrupted(signum: int, frame: object) -> None:
  """Ctrl-C while the command line is parsed (a config file loading): 130, not a config error."""
  del signum, frame
  raise Interrupted("interrupted", 130)


_SIGNAL_WATCH: dict[str, Any] = {}


def end_promptly_on_signals(grace_s: float, on_signal: Callable[[int], None] | None = None) -> None:
  """Makes SIGTERM and SIGINT end the process within ``grace_s`` seconds even while its main
  thread is blocked inside JAX (``jax.distributed.initialize`` waiting for the other processes, a
  collective waiting for a dead one), where no Python signal handler runs. The handlers still run
  when they can (a run stopped between epochs saves and says so, as always); past ``grace_s``,
  one line and exit 143 (130 for SIGINT). ``on_signal(signum)`` runs first, in another thread.
  Calling it again changes the grace and the hook, and installs the SIGTERM handler again (JAX's
  preemption service replaces it in ``jax.distributed.initialize``: SIGTERM was then ignored).
  Uses ``signal.set_wakeup_fd``: main thread only."""
  signal.signal(signal.SIGTERM, _terminated)
  _SIGNAL_WATCH.update(grace_s=grace_s, on_signal=on_signal)
  if "thread" in _SIGNAL_WATCH:
    return
  reader, writer = socket.socketpair()
  writer.setblocking(False)
  signal.set_wakeup_fd(writer.fileno(), warn_on_full_buffer=False)
  thread = threading.Thread(target=_watch_signals, args=(reader,), name="signals", daemon=True)
  _SIGNAL_WATCH.update(thread=thread, sockets=(reader, writer))  # Kept open for the process.
  thread.start()


def _watch_signals(reader: socket.socket) -> None:
  """The thread of ``end_promptly_on_signals``: the C signal handler writes each signal's number
  to the wakeup socket, whatever the main thread is doing."""
  names = {signal.SIGTERM: "terminated", signal.SIGINT: "interrupted"}
  while True:
    signum = reader.recv(1)[0]
    if signum not in names:
      continue
    if _SIGNAL_WATCH["on_signal"] is not None:
      try:
        _SIGNAL_WATCH["on_signal"](signum)
      except Exception:  # noqa: BLE001 (a courtesy to the other processes; ending comes first)
        pass
    time.sleep(_SIGNAL_WATCH["grace_s"])
    message = f"{names[signum]} while blocked in JAX, waiting for the other processes; rerun "
    os.write(2, f"{message}the same command to resume\n".encode())
    os._exit(128 + signum)


_REQUIRED: list[str] = []


def require(*names: str) -> None:
  """Flags the script cannot run without: checked once the command line is parsed, each missing
  one a line of its own making (absl's ``mark_flag_as_required`` would be a validator whose
  message had to be read back)."""
  _REQUIRED.extend(names)


def run(main: Callable[[], None]) -> None:
  """``app.run`` with the shared preamble: no positional arguments, WARNING-level logs (orbax
  logs every save at INFO), line-buffered stdout (epoch lines show at once through a pipe), flag
  and config-file errors as one line, and the project's errors as one line with their status."""

  def wrapped(argv: list[str]) -> None:
    logging.set_verbosity(logging.WARNING)
    sys.stdout.reconfigure(line_buffering=True)
    signal.signal(signal.SIGTERM, _terminated)
    if len(argv) > 1:
      fail(f"unexpected arguments: {' '.join(argv[1:])} (every option is a --flag)")
    for name in _REQUIRED:
      if flags.FLAGS[name].value is None:
        fail(f"--{name}: required, not given (see --helpshort)")
    try:
      main()
    except FlaxMnistError as error:
      if _debugging():
        raise
      fail(str(error), error.exit_code)
    except KeyboardInterrupt as interrupt:  # Ctrl-C, or the library's Interrupted (SIGTERM too).
      if _debugging():
        raise
      print(_one_line(str(interrupt)) or "interrupted", file=sys.stderr)
      sys.exit(getattr(interrupt, "exit_code", 130))
    except OSError as error:  # The file system failed under a run (disk full, a lost mount).
      if _debugging() or error.filename is None:
        raise
      if error.errno == errno.ENAMETOOLONG:  # A path given too long: bad input.
        fail(f"{error.filename}: {_name_too_long(error.filename)}; expected a shorter path")
      fail(f"{error.filename}: {error.strerror or type(error).__name__}", 1)

  app.run(wrapped, flags_parser=_parse_flags)


def debugging() -> bool:
  """Whether --debug or FLAX_MNIST_DEBUG asks for tracebacks (after flags are parsed)."""
  return _debugging()


def _debugging(argv: Sequence[str] | None = None) -> bool:
  """Whether --debug or FLAX_MNIST_DEBUG asks for tracebacks (from ``argv`` before parsing)."""
  if os.environ.get(DEBUG_ENV, "") not in ("", "0", "false", "False"):
    return True
  if argv is None:
    return _DEBUG.present and _DEBUG.value
  return any(re.fullmatch(r"--?debug(=(1|true|True))?", arg) for arg in argv)


def _parse_flags(argv: list[str]) -> list[str]:
  """absl's flag parsing, with every error one line (exit 2) instead of absl's FATAL message or a
  traceback from inside ml_collections. Each config-file flag parses through
  ``_ConfigFileParser``: its file runs once, with the project's messages, and the
  ``--<flag>.<field>`` overrides are checked against it before ml_collections applies them."""
  parsers = _install_config_parsers(argv)
  previous = signal.signal(signal.SIGINT, _interrupted)  # Ctrl-C: 130, a config's raise: 2.
  try:
    return flags.FLAGS(argv)
  except Interrupted as interrupt:
    if _debugging(argv):
      raise
    print(str(interrupt), file=sys.stderr)
    sys.exit(interrupt.exit_code)
  except _BadConfigFile as bad:
    if _debugging(argv):  # The config file's own traceback, chained.
      raise bad.error from bad.error.__cause__
    fail(str(bad.error), bad.error.exit_code)
  except flags.Error as error:
    if _debugging(argv):
      raise
    loaded = {name: p.loaded for name, p in parsers.items() if p.loaded is not None}
    fail(_flag_error(error, loaded))
  except Exception as error:  # ml_collections raises plain exceptions while parsing.
    if _debugging(argv):
      raise
    fail(f"command line: {type(error).__name__}: {_first_line(error)}")
  finally:
    signal.signal(signal.SIGINT, previous)


class _BadConfigFile(Exception):
  """A config file's one-line error, carried through absl (which would turn a ValueError, as
  ConfigError is, into its own message)."""

  def __init__(self, error: FlaxMnistError):
    super().__init__(str(error))
    self.error = error


class _ConfigFileParser(config_flags.ConfigFileFlagParser):
  """ml_collections' parser of a config-file flag, loading through the project's loader (one
  line for every failure) and checking the overrides given in ``argv`` name fields of it."""

  def __init__(self, flag: flags.Flag, argv: Sequence[str]):
    super().__init__(flag.name, lock_config=True)
    self.flag, self.argv, self.loaded = flag, list(argv), None

  def parse(self, value: str) -> Any:
    try:
      config = _load_config(self.flag.name, value)
      path = value.partition(":")[0]
      for arg in self.argv:
        match = re.match(rf"--?(?:no)?{re.escape(self.flag.name)}\.([^=]+)", arg)
        if match:
          _check_field(self.flag.name, path, config, match.group(1))
    except FlaxMnistError as error:
      raise _BadConfigFile(error) from None
    self.loaded = config
    config.lock()  # As ml_collections locks it: an override of no field is refused.
    return config


def _install_config_parsers(argv: Sequence[str]) -> dict[str, _ConfigFileParser]:
  """Gives every config-file flag a ``_ConfigFileParser`` for this command line."""
  argv = list(argv[1 : argv.index("--")] if "--" in argv else argv[1:])
  parsers = {}
  for name in list(flags.FLAGS):
    flag = flags.FLAGS[name]
    if config_flags.is_config_flag(flag) and isinstance(
      flag.parser, config_flags.ConfigFileFlagParser
    ):
      flag.parser = parsers[name] = _ConfigFileParser(flag, argv)
  return parsers


def _load_config(name: str, value: str) -> Any:
  """The config ``--<name>=value`` names (``path`` or ml_collections' ``path:arg``, which passes
  ``arg`` to ``get_config``), through the project's loader: every failure one line. A file that
  raises KeyboardInterrupt while it loads is a broken config file (exit 2), not a Ctrl-C."""
  path, colon, arg = value.partition(":")
  try:
    return load_config_file(path, arg if colon else None)
  except ConfigError as error:
    cause = error.__cause__
    if colon and isinstance(cause, TypeError) and not _raised_in(cause, path):  # The call failed.
      raise ConfigError(
        f"--{name}={value}: ml_collections passes '{arg}' to get_config(), which cannot take it "
        f"({_first_line(cause)}); expected --{name}={path}, with fields set as "
        f"--{name}.<field>=value"
      ) from cause
    raise
  except Interrupted:  # A real Ctrl-C (``_interrupted``).
    raise
  except KeyboardInterrupt as error:  # Raised by the file itself.
    what = f"get_config({arg!r})" if colon else "loading it"
    raise ConfigError(config_file_raised(path, error, what)) from error


def _raised_in(error: BaseException, path: str) -> bool:
  """Whether ``error`` was raised inside the file ``path`` (not by calling into it)."""
  target = os.path.abspath(path)
  return any(
    os.path.abspath(frame.filename) == target for frame in traceback.extract_tb(error.__traceback__)
  )


def _check_field(flag: str, path: str, config: Any, field: str) -> None:
  """Refuses ``--<flag>.<field>`` when the config loaded from ``path`` has no such field."""
  node = config
  parts = field.split(".")
  for depth, part in enumerate(parts):
    if isinstance(node, Mapping) or hasattr(node, "keys"):
      keys = sorted(node.keys())
      if part in keys:
        node = node[part]
        continue
      where = ".".join([flag, *parts[:depth]])
      if keys:
        expected = f"expected a field of flax_mnist.config.default_config(){_nearest(part, keys)}"
      else:
        expected = f"{where} has no fields: set it whole, --{where}=\"{{'{part}': ...}}\""
      raise ConfigError(f"--{flag}.{field}: {path} has no field {where}.{part}; {expected}")
    raise ConfigError(
      f"--{flag}.{field}: {'.'.join([flag, *parts[:depth]])} in {path} is {kind_of(node)}, "
      "not a config with fields"
    )


def _flag_error(error: flags.Error, configs: Mapping[str, Any]) -> str:
  """absl's flag error as the message of one line: culprit first, then what was expected."""
  message = _one_line(str(error))
  if isinstance(error, flags.UnrecognizedFlagError):
    known = [name for name in flags.FLAGS if len(name) > 1]
    return (
      f"--{error.flagname}: unknown flag{_nearest(error.flagname, known, '--')} (see --helpshort)"
    )
  bad_value = re.fullmatch(r"flag --(\S+?)=(.*?): (.*)", message)
  if bad_value:
    name, value, reason = bad_value.groups()
    reason = re.sub(r"^\('(.*?)', .*\)$", r"\1", reason)  # absl's tuple-shaped messages.
    expected = ""
    flag, _, field = name.partition(".")
    if field and flag in configs:
      try:
        default = configs[flag]
        for part in field.split("."):
          default = default[part]
        expected = f"; expected {kind_of(default)} (the config file has {default!r})"
      except (KeyError, TypeError):
        pass
    elif name in flags.FLAGS:
      kinds = {"int": "an integer", "float": "a number", "bool": "true or false"}
      kind = kinds.get(flags.FLAGS[name].flag_type())
      expected = f"; expected {kind}" if kind else ""
    return f"--{name}={value}: {reason}{expected}"
  return f"{message} (see --helpshort)"


def _nearest(name: str, choices: Sequence[str], prefix: str = "") -> str:
  nearest = difflib.get_close_matches(name, list(choices), n=1)
  return f" (did you mean {prefix}{nearest[0]}?)" if nearest else ""


def _first_line(error: BaseException) -> str:
  lines = str(error).strip().splitlines()
  return lines[0] if lines else type(error).__name__


def _one_line(message: str) -> str:
  return "; ".join(line.strip() for line in str(message).strip().splitlines() if line.strip())
