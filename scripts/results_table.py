"""Summarises finished training workdirs as a Markdown table (the README's results).

  python scripts/results_table.py --workdirs runs/mlp,runs/cnn,runs/cnn_pool,runs/cnn_pool_bn \
      --out results/notebook_family

writes ``table.md`` and copies each run's ``history.json``, ``config.json``, ``run.json`` and, if
the run was logged there, ``train.log`` beside it (``<out>/<model>/``; ``<model>_1``, ``_2``, ...
for a model given more than once), so the committed figures can be checked against the raw
per-epoch data. A model a workdir names by import path is imported only with --trust_model_code.
"""

import shutil
import statistics
import sys
from pathlib import Path

import _cli
import jax
from absl import flags
from flax import nnx

from flax_mnist import history, log, models
from flax_mnist import workdir as workdir_lib
from flax_mnist.errors import FlaxMnistError

_WORKDIRS = flags.DEFINE_list("workdirs", None, "Comma-separated training workdirs.")
_OUT = flags.DEFINE_string("out", None, "Directory for table.md and the copied histories.")
_TRUST = flags.DEFINE_bool(
  "trust_model_code",
  False,
  "Import a model a workdir names by import path ('package.module:factory'): that runs its code, "
  "so only for workdirs you trust. Registered models need no opt-in.",
)
_cli.require("workdirs", "out")


# What a row reads from each file: every history record's figures, and the config's settings.
_RECORD_FIELDS = (
  "epoch",
  "val_accuracy",
  "train_accuracy",
  "seconds",
  "images_per_second",
)
_CONFIG_FIELDS = ("model", "model_kwargs", "batch_size", "optimizer", "learning_rate", "seed")


def _read(file: Path, kind: type, fields: tuple[str, ...]):
  """A workdir's JSON file as written by train.py: a ``kind`` (dict, or non-empty list of dicts)
  with ``fields``; anything else (missing, empty, corrupt, another shape) is one line naming it."""
  expected = f"expected the {file.name} that scripts/train.py writes"
  if not file.is_file():
    raise FlaxMnistError(
      f"{file}: missing (is {file.parent} a finished training workdir?); {expected}"
    )
  value = workdir_lib.read_record(file, kind, fields, hint=expected)
  if not value:
    raise FlaxMnistError(f"{file}: an empty list, {expected} (a non-empty list of epoch records)")
  return value


def summarize(directory: Path) -> dict:
  """One row: the run's model, size, best and final val accuracy, median seconds per epoch."""
  workdir_lib.check_contained(directory)  # Nothing copied from outside it.
  records = _read(directory / workdir_lib.HISTORY_FILE, list, _RECORD_FIELDS)
  config = _read(directory / workdir_lib.CONFIG_FILE, dict, _CONFIG_FIELDS)
  best = history.best_record(records)
  where = directory / workdir_lib.CONFIG_FILE
  kwargs = config["model_kwargs"]
  try:
    if not isinstance(kwargs, dict):
      raise FlaxMnistError(f"model_kwargs {kwargs!r:.60}: expected an object")
    model = models.build_model(config["model"], kwargs, rngs=nnx.Rngs(0), trust_code=_TRUST.value)
  except FlaxMnistError as error:
    raise type(error)(f"{where}: {error}") from None
  trainable, non_trainable = models.count_params(model)
  return {
    "model": config["model"],
    "config": config,
    "epochs": len(records),
    "trainable": trainable,
    "non_trainable": non_trainable,
    "best_val_accuracy": best["val_accuracy"],
    "best_epoch": best["epoch"],
    "final_val_accuracy": records[-1]["val_accuracy"],
    "final_train_accuracy": records[-1]["train_accuracy"],
    "median_seconds": statistics.median(record["seconds"] for record in records),
    "median_images_per_second": statistics.median(
      record["images_per_second"] for record in records
    ),
  }


def _name_rows(rows: list[dict]) -> None:
  """Each row's name, also its folder in --out: the model, or ``<model>_<k>`` (k = 1, 2, ... in
  the order given) for a model given more than once, so that no run's files overwrite another's."""
  models_given = [row["model"] for row in rows]
  seen: dict[str, int] = {}
  for row in rows:
    model = row["model"]
    if models_given.count(model) == 1:
      row["name"] = model
    else:
      seen[model] = seen.get(model, 0) + 1
      row["name"] = f"{model}_{seen[model]}"


def to_markdown(rows: list[dict]) -> str:
  """The results table."""
  lines = [
    "| model | params (trainable + BN stats) | best val acc (epoch) | final val acc | "
    "final train acc | s / epoch (median) | train images/s |",
    "| --- | ---: | ---: | ---: | ---: | ---: | ---: |",
  ]
  for row in rows:
    params = f"{row['trainable']:,}" + (
      f" + {row['non_trainable']:,}" if row["non_trainable"] else ""
    )
    lines.append(
      f"| {row['name']} | {params} | {row['best_val_accuracy']:.4f} ({row['best_epoch']}) | "
      f"{row['final_val_accuracy']:.4f} | {row['final_train_accuracy']:.4f} | "
      f"{row['median_seconds']:.2f} | {row['median_images_per_second']:,.0f} |"
    )
  return "\n".join(lines) + "\n"


def _settings(rows: list[dict]) -> str:
  """The shared settings, read from the runs' config.json (one value, or each run's)."""

  def values(field: str) -> str:
    return ", ".join(sorted({str(row["config"][field]) for row in rows}))

  epochs = sorted({str(row["epochs"]) for row in rows})
  return (
    f"{', '.join(epochs)} epochs, batch {values('batch_size')}, "
    f"{values('optimizer')} {values('learning_rate')}, seed {values('seed')}"
  )


def main() -> None:
  if not _WORKDIRS.value:
    _cli.fail("--workdirs: empty, expected a comma-separated list of training workdirs")
  directories = [Path(directory) for directory in _WORKDIRS.value]
  rows = [summarize(directory) for directory in directories]  # Every workdir read, then written.
  _name_rows(rows)
  out = _cli.check_writable_dir(_OUT.value, "--out")
  for directory, row in zip(directories, rows):
    (out / row["name"]).mkdir(exist_ok=True)
    copied = (workdir_lib.HISTORY_FILE, workdir_lib.CONFIG_FILE, workdir_lib.RUN_FILE, "train.log")
    for name in copied:
      if (directory / name).is_file():  # train.log is there for runs logged with tee.
        shutil.copyfile(directory / name, out / row["name"] / name)
  footer = (
    f"\n{_settings(rows)}; seconds per epoch = train 60,000 + evaluate 10,000 images, "
    f"compilation excluded; {log.describe_hardware(log.environment())}; "
    f"jax {jax.__version__}.\n"
  )
  workdir_lib.write_text(out / "table.md", to_markdown(rows) + footer)
  sys.stdout.write(to_markdown(rows) + footer)


if __name__ == "__main__":
  _cli.run(main)
