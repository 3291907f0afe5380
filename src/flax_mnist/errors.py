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


class WorkdirError(FlaxMnistError):
  """A workdir cannot be used: a file, not writable, or held by another run."""


class UntrustedCodeError(FlaxMnistError):
  """A file (a workdir's config.json, a checkpoint) names a model by import path, and the caller
  did not opt in to importing it (``trust_model_code``): nothing was imported."""


class RunError(FlaxMnistError):
  """Training failed at run time (it diverged, a device or file system failed)."""

  exit_code = 1


class Interrupted(KeyboardInterrupt):
  """Training was stopped by SIGINT (exit 130) or SIGTERM (exit 143); ``str()`` says what is
  saved and how to resume."""

  def __init__(self, message: str, exit_code: int = 130):
    super().__init__(message)
    self.exit_code = exit_code
