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
"""

from __future__ import annotations

import difflib
import os
import re
import signal
import sys
import tempfile
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, NoReturn

from absl import app, flags, logging
from ml_collections.config_flags import config_flags

from flax_mnist import FlaxMnistError, models
from flax_mnist.config import load_config_file
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
    reason = error.strerror or type(error).__name__
    if directory.exists() and not directory.is_dir():
      reason = "a file, not a directory"
    elif isinstance(error, (FileExistsError, NotADirectoryError)):
      reason = "under a file, not a directory"
    fail(f"{directory}: cannot write there ({reason}); pass {flag} with a writable directory")
  return directory


def _terminated(signum: int, frame: object) -> None:
  """SIGTERM (a scheduler's pre-emption, ``kill``) unwinds like Ctrl-C: the run saves what it
  finished, says how to resume, and exits 143."""
  del signum, frame
  raise Interrupted("terminated", 143)


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
      fail(f"{error.filename}: {error.strerror or type(error).__name__}", 1)

  app.run(wrapped, flags_parser=_parse_flags)


def _debugging(argv: Sequence[str] | None = None) -> bool:
  """Whether --debug or FLAX_MNIST_DEBUG asks for tracebacks (from ``argv`` before parsing)."""
  if os.environ.get(DEBUG_ENV, "") not in ("", "0", "false", "False"):
    return True
  if argv is None:
    return _DEBUG.present and _DEBUG.value
  return any(re.fullmatch(r"--?debug(=(1|true|True))?", arg) for arg in argv)


def _parse_flags(argv: list[str]) -> list[str]:
  """absl's flag parsing, with every error one line (exit 2) instead of absl's FATAL message or a
  traceback from inside ml_collections: config files are loaded and their overrides checked
  first, with the project's messages."""
  configs: dict[str, Any] = {}
  try:
    configs = _check_config_flags(argv)
    return flags.FLAGS(argv)
  except FlaxMnistError as error:
    if _debugging(argv):
      raise
    fail(str(error), error.exit_code)
  except flags.Error as error:
    if _debugging(argv):
      raise
    fail(_flag_error(error, configs))
  except Exception as error:  # ml_collections raises plain exceptions while parsing.
    if _debugging(argv):
      raise
    fail(f"command line: {type(error).__name__}: {_first_line(error)}")


def _check_config_flags(argv: Sequence[str]) -> dict[str, Any]:
  """Loads the file of each config-file flag given in ``argv`` (a missing file, a syntax error,
  no get_config(), a misspelt field: one line) and checks every ``--<flag>.<field>`` override
  names a field it has. Returns {flag name: its config}."""
  argv = list(argv[1 : argv.index("--")] if "--" in argv else argv[1:])
  configs = {}
  for name in list(flags.FLAGS):
    flag = flags.FLAGS[name]
    if not (
      config_flags.is_config_flag(flag)
      and isinstance(flag.parser, config_flags.ConfigFileFlagParser)
    ):
      continue
    path = _flag_argument(argv, name)
    if path is None or ":" in path:  # Not given (absl says so), or a get_config argument.
      continue
    try:
      config = load_config_file(path)
    except FlaxMnistError:
      raise
    except Exception as error:  # The file itself raised (an import, get_config()).
      raise ConfigError(
        f"{path}: loading it raised {type(error).__name__}: {_first_line(error)}"
      ) from error
    configs[name] = config
    for arg in argv:
      match = re.match(rf"--?(?:no)?{re.escape(name)}\.([^=]+)", arg)
      if match:
        _check_field(name, path, config, match.group(1))
  return configs


def _flag_argument(argv: Sequence[str], name: str) -> str | None:
  """The value given to flag ``name`` in ``argv`` (``--name=value`` or ``--name value``)."""
  value = None
  for index, arg in enumerate(argv):
    match = re.fullmatch(rf"--?{re.escape(name)}(=(.*))?", arg)
    if match:
      if match.group(1) is not None:
        value = match.group(2)
      elif index + 1 < len(argv):
        value = argv[index + 1]
  return value


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
      f"--{flag}.{field}: {'.'.join([flag, *parts[:depth]])} in {path} is {_kind(node)}, "
      "not a config with fields"
    )


def _flag_error(error: flags.Error, configs: Mapping[str, Any]) -> str:
  """absl's flag error as the message of one line: culprit first, then what was expected."""
  message = _one_line(str(error))
  required = re.fullmatch(
    r"flag --(\S+)=None: Flag --\S+ must have a value other than None\.", message
  )
  if required:
    return f"--{required.group(1)}: required, not given (see --helpshort)"
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
        expected = f"; expected {_kind(default)} (the config file has {default!r})"
      except (KeyError, TypeError):
        pass
    elif name in flags.FLAGS:
      kinds = {"int": "an integer", "float": "a number", "bool": "true or false"}
      kind = kinds.get(flags.FLAGS[name].flag_type())
      expected = f"; expected {kind}" if kind else ""
    return f"--{name}={value}: {reason}{expected}"
  return f"{message} (see --helpshort)"


def _kind(value: Any) -> str:
  """What a config field's value is, in words, for "expected ..."."""
  if isinstance(value, bool):
    return "true or false"
  if isinstance(value, int):
    return "an integer"
  if isinstance(value, float):
    return "a number"
  if isinstance(value, str):
    return "a string"
  if isinstance(value, (tuple, list)):
    return "a tuple such as '(0, 1)'"
  return f"a {type(value).__name__}"


def _nearest(name: str, choices: Sequence[str], prefix: str = "") -> str:
  nearest = difflib.get_close_matches(name, list(choices), n=1)
  return f" (did you mean {prefix}{nearest[0]}?)" if nearest else ""


def _first_line(error: BaseException) -> str:
  lines = str(error).strip().splitlines()
  return lines[0] if lines else type(error).__name__


def _one_line(message: str) -> str:
  return "; ".join(line.strip() for line in str(message).strip().splitlines() if line.strip())
