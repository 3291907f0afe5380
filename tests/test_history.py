"""Tests for flax_mnist.history: best epoch, steady epochs, spread and the seed aggregate."""

import numpy as np
import pytest

from flax_mnist import history


def _records(accuracies, losses):
  return [
    {
      "epoch": index + 1,
      "val_accuracy": accuracy,
      "val_loss": loss,
      "train_loss": loss,
      "train_accuracy": accuracy,
    }
    for index, (accuracy, loss) in enumerate(zip(accuracies, losses))
  ]


def test_best_record_is_the_earliest_best_by_accuracy_or_lowest_loss():
  records = _records([0.5, 0.9, 0.9, 0.8], [1.0, 0.4, 0.3, 0.2])
  assert history.best_record(records)["epoch"] == 2  # A tie keeps the earlier epoch, as Keras.
  assert history.best_record(records, "val_loss")["epoch"] == 4


def test_steady_drops_the_first_epoch_unless_it_is_the_only_one():
  records = _records([0.1, 0.2, 0.3], [1, 1, 1])
  assert [record["epoch"] for record in history.steady(records)] == [2, 3]
  assert [record["epoch"] for record in history.steady(records[:1])] == [1]


def test_spread_and_aggregate_over_seeds():
  values = [0.97, 0.98, 0.99]
  figures = history.spread(values)
  assert figures["mean"] == pytest.approx(0.98) and figures["std"] == pytest.approx(
    np.std(values, ddof=1)
  )
  assert history.spread([0.5])["std"] == 0.0
  aggregate = history.aggregate_seeds(
    {0: _records([0.9, 0.95], [0.3, 0.2]), 3: _records([0.92, 0.91], [0.25, 0.3])}
  )
  assert aggregate["seeds"] == [0, 3]
  assert aggregate["best"]["3"]["epoch"] == 1
  assert aggregate["best_val_accuracy"]["mean"] == pytest.approx((0.95 + 0.92) / 2)
  assert aggregate["epochs"][1]["val_loss"]["max"] == 0.3
