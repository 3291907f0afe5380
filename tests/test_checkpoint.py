"""Tests for flax_mnist.checkpoint: best vs latest, restore, load_model, clear errors."""

from __future__ import annotations

import gc

import jax.numpy as jnp
import numpy as np
import pytest
from conftest import small_config

from flax_mnist import checkpoint, data, evaluation, train
from flax_mnist.errors import CheckpointError


def _state(value: float):
  return {"params": {"w": jnp.full((3,), value)}, "step": jnp.asarray(int(value), jnp.int32)}


def test_best_is_not_replaced_by_a_worse_epoch_and_latest_is(tmp_path):
  checkpoints = checkpoint.Checkpoints(tmp_path)
  accuracies = {1: 0.50, 2: 0.70, 3: 0.60, 4: 0.70}  # 4 ties 2: not strictly better, not saved.
  saved_best = [
    checkpoints.save_epoch(epoch, _state(epoch), {"epoch": epoch, "val_accuracy": accuracy})
    for epoch, accuracy in accuracies.items()
  ]
  checkpoints.wait()
  assert saved_best == [True, True, False, False]
  assert checkpoints.epoch("best") == 2 and checkpoints.epoch("latest") == 4
  best, best_meta = checkpoints.restore("best", _state(0))
  latest, latest_meta = checkpoints.restore("latest", _state(0))
  np.testing.assert_array_equal(np.asarray(best["params"]["w"]), 2.0)
  np.testing.assert_array_equal(np.asarray(latest["params"]["w"]), 4.0)
  assert best_meta["val_accuracy"] == 0.70 and latest_meta["epoch"] == 4
  checkpoints.close()
  # Only one of each kind is kept on disk.
  assert sorted(
    p.name for p in (tmp_path / "checkpoints" / "best").iterdir() if p.name.isdigit()
  ) == ["2"]
  assert sorted(
    p.name for p in (tmp_path / "checkpoints" / "latest").iterdir() if p.name.isdigit()
  ) == ["4"]
  # A new manager on the same workdir knows the best so far (as a resumed run does).
  reopened = checkpoint.Checkpoints(tmp_path)
  assert reopened.best_value() == 0.70
  assert reopened.save_epoch(5, _state(5), {"epoch": 5, "val_accuracy": 0.65}) is False
  reopened.close()


def test_best_by_val_loss_keeps_the_lowest(tmp_path):
  checkpoints = checkpoint.Checkpoints(tmp_path, best_metric="val_loss")
  losses = {1: 0.30, 2: 0.20, 3: 0.25}
  saved_best = [
    checkpoints.save_epoch(
      epoch, _state(epoch), {"epoch": epoch, "val_loss": loss, "val_accuracy": 0.9}
    )
    for epoch, loss in losses.items()
  ]
  checkpoints.close()
  assert saved_best == [True, True, False]
  reopened = checkpoint.Checkpoints(tmp_path, read_only=True)
  assert reopened.epoch("best") == 2
  reopened.close()
  with pytest.raises(CheckpointError, match="best metric 'accuracy': unknown"):
    checkpoint.Checkpoints(tmp_path, best_metric="accuracy")


# Orbax leaves the failed restore's read coroutine to the garbage collector; collect it here.
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_restore_into_a_mismatched_template_is_a_clear_error(tmp_path):
  checkpoints = checkpoint.Checkpoints(tmp_path)
  checkpoints.save_epoch(1, _state(1), {"epoch": 1, "val_accuracy": 0.5})
  checkpoints.wait()
  with pytest.raises(
    CheckpointError, match="cannot be restored .* or was written for another model"
  ):
    checkpoints.restore(
      "latest", {"params": {"w": jnp.zeros((7,))}, "step": jnp.zeros((), jnp.int32)}
    )
  checkpoints.close()
  gc.collect()


def test_load_model_without_checkpoints_is_a_clear_error(tmp_path):
  with pytest.raises(CheckpointError, match="no checkpoints directory"):
    checkpoint.load_model(tmp_path)
  (tmp_path / "checkpoints").mkdir()
  with pytest.raises(CheckpointError, match="no best checkpoint"):
    checkpoint.load_model(tmp_path)
  with pytest.raises(CheckpointError, match="checkpoint 'first': unknown"):
    checkpoint.load_model(tmp_path, "first")


@pytest.mark.integration  # Compiles and trains whole models: seconds each.
def test_load_model_reproduces_the_recorded_best_val_accuracy(idx_dir, tmp_path):
  history = train.train_and_evaluate(
    small_config(idx_dir, model="cnn_pool_bn", num_epochs=3), tmp_path, print_fn=None
  )
  model, info = checkpoint.load_model(tmp_path)
  best = max(history, key=lambda record: record["val_accuracy"])
  assert info["epoch"] == best["epoch"] and info["model"] == "cnn_pool_bn"
  assert info["val_accuracy"] == best["val_accuracy"] and info["config"]["num_epochs"] == 3
  assert model.layers[2].use_running_average  # Eval mode: BatchNorm uses its moving statistics.
  test = data.load_idx_dir(idx_dir).test
  result = evaluation.evaluate_model(
    model, test.images, test.labels, batch_size=info["config"]["eval_batch_size"]
  )
  assert result["accuracy"] == best["val_accuracy"]
  assert result["loss"] == pytest.approx(best["val_loss"], rel=1e-6)
  latest_model, latest_info = checkpoint.load_model(tmp_path, "latest")
  assert latest_info["epoch"] == 3
  result = evaluation.evaluate_model(latest_model, test.images, test.labels, batch_size=32)
  assert result["accuracy"] == history[-1]["val_accuracy"]
