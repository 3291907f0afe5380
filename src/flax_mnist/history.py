"""A training history (one ``EpochRecord`` per epoch) and what is read off it: the best epoch,
the steady epochs, and the spread of a figure over seeds. Plain data in, plain data out: no JAX,
no files.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, TypedDict

import numpy as np


class _EpochFigures(TypedDict):
  epoch: int
  train_loss: float  # Mean over the epoch's training images, dropout on (as Keras reports it).
  train_accuracy: float
  val_loss: float  # Over every test image, eval mode.
  val_accuracy: float
  seconds: float  # Train + eval, compile excluded.
  train_seconds: float
  eval_seconds: float
  parallel_seeds: int  # Seeds trained together in this epoch (vmap), else 1.
  images_per_second: float  # Training throughput (over every parallel seed).


class EpochRecord(_EpochFigures, total=False):
  """One epoch of a history (history.json, each checkpoint, the value ``train`` returns): the
  field names in one place."""

  stopped_early: bool  # Only on the epoch where early stopping ended the run.


Record = Mapping[str, Any]  # An EpochRecord, or one read from a file.
# The per-epoch figures that seeds.json and the study aggregate over seeds.
AGGREGATED = ("train_loss", "train_accuracy", "val_loss", "val_accuracy")


def best_record(history: Sequence[Record], metric: str = "val_accuracy") -> Record:
  """The epoch with the best ``metric``: highest accuracy or lowest loss, the earliest on a tie."""
  if metric.endswith("loss"):
    return min(history, key=lambda record: record[metric])
  return max(history, key=lambda record: record[metric])


def steady(history: Sequence[Record]) -> list[Record]:
  """The steady-state epochs: 2..N (the first may still warm caches), or the only one."""
  return list(history[1:]) if len(history) > 1 else list(history)


def spread(values: Any) -> dict[str, float]:
  """Mean, sample std (ddof 1; 0 for one value), min, max and count of ``values`` (over seeds)."""
  array = np.asarray(values, np.float64)
  return {
    "mean": float(array.mean()),
    "std": float(array.std(ddof=1)) if array.size > 1 else 0.0,
    "min": float(array.min()),
    "max": float(array.max()),
    "n": int(array.size),
  }


def aggregate_seeds(histories: Mapping[int, Sequence[Record]]) -> dict[str, Any]:
  """``spread`` over seeds of each epoch's metrics and of the best epoch."""
  best = {seed: best_record(history) for seed, history in histories.items() if history}
  num_epochs = min((len(history) for history in histories.values()), default=0)
  epochs = [
    {
      "epoch": epoch + 1,
      **{
        name: spread([history[epoch][name] for history in histories.values()])
        for name in AGGREGATED
      },
    }
    for epoch in range(num_epochs)
  ]
  return {
    "seeds": list(histories),
    "best": {
      str(seed): {
        "epoch": record["epoch"],
        "val_accuracy": record["val_accuracy"],
        "val_loss": record["val_loss"],
      }
      for seed, record in best.items()
    },
    "best_val_accuracy": spread([record["val_accuracy"] for record in best.values()])
    if best
    else None,
    "epochs": epochs,
  }
