"""Synthetic per-seed histories and comparison results, for the study's tests (no training)."""

from __future__ import annotations

import numpy as np

from flax_mnist.study import stats


def make_history(val_accuracies, *, train_offset=0.01, seconds=2.0, parallel_seeds=1):
  """One seed's history: one record per epoch with the fields the trainer writes."""
  return [
    {
      "epoch": epoch,
      "train_loss": 1.0 / epoch,
      "train_accuracy": min(1.0, accuracy + train_offset),
      "val_loss": 1.0 - accuracy,
      "val_accuracy": accuracy,
      "seconds": seconds + epoch / 100,
      "train_seconds": seconds,
      "eval_seconds": 0.1,
      "parallel_seeds": parallel_seeds,
      "images_per_second": 60_000 / seconds,
    }
    for epoch, accuracy in enumerate(val_accuracies, start=1)
  ]


def synthetic_results(names, seeds=3, epochs=4):
  """Results as run_comparison returns them, with the models' real facts and made-up histories
  (model i a point more accurate and a second per epoch slower than model i - 1)."""
  rng = np.random.default_rng(0)
  results = {"models": {}}
  for index, name in enumerate(names):
    histories = {}
    for seed in range(seeds):
      accuracies = (
        0.9 + 0.01 * index + 0.015 * np.arange(epochs) + 0.002 * rng.standard_normal(epochs)
      )
      histories[str(seed)] = make_history(accuracies.tolist(), seconds=1.0 + index)
    results["models"][name] = {
      "facts": stats.model_facts(name),
      "config": {"batch_size": 512, "learning_rate": 1e-3, "optimizer": "keras_adam"},
      "compile_seconds": 3.0,
      "seed_parallelism": "loop",
      "wall_seconds": 100.0,
      "histories": histories,
    }
  return stats.build_results(results, seeds=list(range(seeds)), num_epochs=epochs)
