"""The project's exception types: one line for the user, no traceback at the CLI.

Each carries the exit status the scripts give it: 2 for bad input (a config, a data file, a
workdir, an image), 1 for a failure at run time.
"""


class FlaxMnistError(Exception):
  """Base class of every error the project raises for bad input or bad state."""

  exit_code = 2


class DatasetError(FlaxMnistError, ValueError):
  """A dataset file is missing or malformed; the message names the file."""


class ConfigError(FlaxMnistError, ValueError):
  """A config field holds a value the project cannot use; the message names the field."""


class CheckpointError(FlaxMnistError):
  """A workdir holds no usable checkpoint, or one that does not match the run."""


class RunError(FlaxMnistError):
  """Training failed at run time (it diverged, a device or file system failed)."""

  exit_code = 1
