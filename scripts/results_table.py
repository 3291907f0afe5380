"""Summarises finished training workdirs as a Markdown table (the README's results).

  python scripts/results_table.py --workdirs runs/mlp,runs/cnn,runs/cnn_pool,runs/cnn_pool_bn \
      --out results/notebook_family

writes ``table.md`` and copies each run's ``history.json``, ``config.json``, ``run.json`` and, if
the run was logged there, ``train.log`` beside it (``<out>/<model>/``), so the committed figures
can be checked against the raw per-epoch data.
"""

import json
import shutil
import statistics
import sys
from pathlib import Path

import jax
from absl import app, flags
from flax import nnx

from flax_mnist import log, models

_WORKDIRS = flags.DEFINE_list("workdirs", None, "Comma-separated training workdirs.")
_OUT = flags.DEFINE_string("out", None, "Directory for table.md and the copied histories.")
flags.mark_flags_as_required(["workdirs", "out"])


def summarize(workdir: Path) -> dict:
  """One row: the run's model, size, best and final val accuracy, median seconds per epoch."""
  for name in ("history.json", "config.json"):
    if not (workdir / name).is_file():
      raise SystemExit(f"error: {workdir / name}: missing (is {workdir} a finished training workdir?)")
  history = json.loads((workdir / "history.json").read_text())
  config = json.loads((workdir / "config.json").read_text())
  best = max(history, key=lambda record: record["val_accuracy"])
  trainable, non_trainable = models.count_params(models.create_model(config["model"], rngs=nnx.Rngs(0)))
  return {
      "model": config["model"], "seed": config["seed"], "epochs": len(history), "trainable": trainable, "non_trainable": non_trainable,
      "best_val_accuracy": best["val_accuracy"], "best_epoch": best["epoch"],
      "final_val_accuracy": history[-1]["val_accuracy"], "final_train_accuracy": history[-1]["train_accuracy"],
      "median_seconds": statistics.median(record["seconds"] for record in history),
      "median_images_per_second": statistics.median(record["images_per_second"] for record in history),
  }


def to_markdown(rows: list[dict]) -> str:
  """The results table."""
  lines = ["| model | params (trainable + BN stats) | best val acc (epoch) | final val acc | "
           "final train acc | s / epoch (median) | train images/s |",
           "| --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
  for row in rows:
    params = f"{row['trainable']:,}" + (f" + {row['non_trainable']:,}" if row["non_trainable"] else "")
    lines.append(f"| {row['model']} | {params} | {row['best_val_accuracy']:.4f} ({row['best_epoch']}) | "
                 f"{row['final_val_accuracy']:.4f} | {row['final_train_accuracy']:.4f} | "
                 f"{row['median_seconds']:.2f} | {row['median_images_per_second']:,.0f} |")
  return "\n".join(lines) + "\n"


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
  out = Path(_OUT.value)
  out.mkdir(parents=True, exist_ok=True)
  rows = []
  for workdir in map(Path, _WORKDIRS.value):
    row = summarize(workdir)
    rows.append(row)
    (out / row["model"]).mkdir(exist_ok=True)
    for name in ("history.json", "config.json", "run.json", "train.log"):
      if (workdir / name).is_file():  # run.json and train.log are there for runs of this version / with tee.
        shutil.copyfile(workdir / name, out / row["model"] / name)
  seeds = sorted({row["seed"] for row in rows})
  footer = (f"\n{rows[0]['epochs']} epochs, batch 512, Adam 1e-3, seed {', '.join(map(str, seeds))}; seconds per epoch = train 60,000 + "
            f"evaluate 10,000 images, compilation excluded; {log.describe_hardware(log.environment())}; jax {jax.__version__}.\n")
  (out / "table.md").write_text(to_markdown(rows) + footer)
  sys.stdout.write(to_markdown(rows) + footer)


if __name__ == "__main__":
  app.run(main)
