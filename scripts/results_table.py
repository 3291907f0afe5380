"""Summarises finished training workdirs as a Markdown table (the README's results).

  python scripts/results_table.py --workdirs runs/mlp,runs/cnn,runs/cnn_pool,runs/cnn_pool_bn \
      --out results/notebook_family

writes ``table.md`` and copies each run's ``history.json``, ``config.json``, ``run.json`` and, if
the run was logged there, ``train.log`` beside it (``<out>/<model>/``), so the committed figures
can be checked against the raw per-epoch data.
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
flags.mark_flags_as_required(["workdirs", "out"])


def summarize(directory: Path) -> dict:
  """One row: the run's model, size, best and final val accuracy, median seconds per epoch."""
  for name in (workdir_lib.HISTORY_FILE, workdir_lib.CONFIG_FILE):
    if not (directory / name).is_file():
      raise FlaxMnistError(
        f"{directory / name}: missing (is {directory} a finished training workdir?)"
      )
  records = workdir_lib.read_json(directory / workdir_lib.HISTORY_FILE)
  config = workdir_lib.read_json(directory / workdir_lib.CONFIG_FILE)
  best = history.best_record(records)
  model = models.create_model(config["model"], rngs=nnx.Rngs(0))
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
      f"| {row['model']} | {params} | {row['best_val_accuracy']:.4f} ({row['best_epoch']}) | "
      f"{row['final_val_accuracy']:.4f} | {row['final_train_accuracy']:.4f} | "
      f"{row['median_seconds']:.2f} | {row['median_images_per_second']:,.0f} |"
    )
  return "\n".join(lines) + "\n"


def _settings(rows: list[dict]) -> str:
  """The shared settings, read from the runs' config.json (one value, or each run's)."""

  def values(field: str) -> str:
    found = sorted({str(row["config"][field]) for row in rows})
    return ", ".join(found)

  epochs = sorted({str(row["epochs"]) for row in rows})
  return (
    f"{', '.join(epochs)} epochs, batch {values('batch_size')}, "
    f"Adam {values('learning_rate')}, seed {values('seed')}"
  )


def main() -> None:
  out = Path(_OUT.value)
  out.mkdir(parents=True, exist_ok=True)
  rows = []
  for directory in map(Path, _WORKDIRS.value):
    row = summarize(directory)
    rows.append(row)
    (out / row["model"]).mkdir(exist_ok=True)
    copied = (workdir_lib.HISTORY_FILE, workdir_lib.CONFIG_FILE, workdir_lib.RUN_FILE, "train.log")
    for name in copied:
      if (directory / name).is_file():  # train.log is there for runs logged with tee.
        shutil.copyfile(directory / name, out / row["model"] / name)
  footer = (
    f"\n{_settings(rows)}; seconds per epoch = train 60,000 + evaluate 10,000 images, "
    f"compilation excluded; {log.describe_hardware(log.environment())}; "
    f"jax {jax.__version__}.\n"
  )
  (out / "table.md").write_text(to_markdown(rows) + footer)
  sys.stdout.write(to_markdown(rows) + footer)


if __name__ == "__main__":
  _cli.run(main)
