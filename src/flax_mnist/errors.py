"""The project's exception types: one line for the user, no traceback at the CLI."""


class FlaxMnistError(Exception):
  """Base class of every error the project raises for bad input or bad state."""


class DatasetError(FlaxMnistError, ValueError):
  """A dataset file is missing or malformed; the message names the file."""


class ConfigError(FlaxMnistError, ValueError):
  """A config field holds a value the project cannot use; the message names the field."""


class CheckpointError(FlaxMnistError):
  """A workdir holds no usable checkpoint, or one that does not match the run."""
