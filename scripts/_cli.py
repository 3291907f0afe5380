"""What every script shares: absl flag parsing, quiet library logs, and errors as one line.

An error of the project's (``FlaxMnistError``) prints ``error: <what, where, what was expected>``
and exits with its status (2 bad input, 1 failure at run time); Ctrl-C exits 130. ``--debug``
shows the Python traceback instead. Not part of the library: the library reads no flags.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path

from absl import app, flags, logging

from flax_mnist import FlaxMnistError
from flax_mnist.config import load_config_file

REPO_ROOT = Path(__file__).resolve().parents[1]
CONFIGS_DIR = REPO_ROOT / "configs"

_DEBUG = flags.DEFINE_bool("debug", False, "On an error, show the Python traceback.")


def fail(message: str, exit_code: int = 2) -> None:
  """Prints ``error: message`` on stderr and exits with ``exit_code``."""
  print(f"error: {message}", file=sys.stderr)
  sys.exit(exit_code)


def model_config(name: str):
  """The experiment config of model ``name``: ``configs/<name>.py``."""
  return load_config_file(CONFIGS_DIR / f"{name}.py")


def run(main: Callable[[], None]) -> None:
  """``app.run`` with the shared preamble: no positional arguments, WARNING-level logs (orbax
  logs every save at INFO), line-buffered stdout (epoch lines show at once through a pipe), and
  the project's errors as one line with their exit status."""

  def wrapped(argv: list[str]) -> None:
    logging.set_verbosity(logging.WARNING)
    sys.stdout.reconfigure(line_buffering=True)
    if len(argv) > 1:
      fail(f"unexpected arguments: {' '.join(argv[1:])}")
    try:
      main()
    except FlaxMnistError as error:
      if _DEBUG.value:
        raise
      fail(str(error), error.exit_code)

  app.run(wrapped)
