"""Tests for flax_mnist.seed_run: a seed's resume from its latest checkpoint (the history an
uninterrupted run gives), the runs and data a workdir refuses to resume."""

from __future__ import annotations

import json
import shutil

import pytest
from conftest import small_config, without_timing, write_mnist_dir

from flax_mnist import train
from flax_mnist.errors import ConfigError


@pytest.mark.integration  # Compiles and trains whole models: seconds each.
def test_resume_continues_the_history_exactly(idx_dir, tmp_path):
  straight = train.train_and_evaluate(
    small_config(idx_dir, num_epochs=3), tmp_path / "a", print_fn=None
  )
  train.train_and_evaluate(small_config(idx_dir, num_epochs=1), tmp_path / "b", print_fn=None)
  lines = []
  resumed = train.train_and_evaluate(
    small_config(idx_dir, num_epochs=3), tmp_path / "b", print_fn=lines.append
  )
  assert any("resumed from" in line and "at epoch 1" in line for line in lines)
  assert sum(line.startswith("epoch ") for line in lines) == 2  # Epochs 2 and 3 only.
  assert without_timing(resumed) == without_timing(straight)
  # Already done: nothing to train, the history comes back as it is.
  again = train.train_and_evaluate(
    small_config(idx_dir, num_epochs=3), tmp_path / "b", print_fn=None
  )
  assert without_timing(again) == without_timing(straight)


@pytest.mark.integration  # Trains and resumes whole runs.
def test_workdir_of_another_model_or_seed_is_refused(idx_dir, tmp_path):
  train.train_and_evaluate(small_config(idx_dir, num_epochs=1), tmp_path / "run", print_fn=None)
  with pytest.raises(ConfigError, match="holds a run with model 'mlp', config.model is 'cnn_pool'"):
    train.train_and_evaluate(
      small_config(idx_dir, model="cnn_pool"), tmp_path / "run", print_fn=None
    )
  with pytest.raises(ConfigError, match="holds a run with seed 0, config.seed is 1"):
    train.train_and_evaluate(small_config(idx_dir, seed=1), tmp_path / "run", print_fn=None)


@pytest.mark.integration  # Trains and resumes whole runs.
def test_the_data_is_recorded_and_a_resume_on_other_data_is_refused(idx_dir, tmp_path):
  run = tmp_path / "run"
  train.train_and_evaluate(small_config(idx_dir, num_epochs=1), run, print_fn=None)
  recorded = json.loads((run / "config.json").read_text())
  assert recorded["data"].startswith("300 train + 100 test images, blake2b ")
  assert recorded["data_source"] == f"IDX files in {idx_dir.resolve()}"
  assert json.loads((run / "run.json").read_text())["data"] == recorded["data"]
  moved = tmp_path / "moved"  # The same files elsewhere are the same data.
  shutil.copytree(idx_dir, moved)
  train.train_and_evaluate(small_config(moved, num_epochs=2), run, print_fn=None)
  other = write_mnist_dir(tmp_path / "other", num_train=200)
  with pytest.raises(ConfigError, match=r"holds a run with data '300 train .*, this run's data "):
    train.train_and_evaluate(small_config(other, num_epochs=3), run, print_fn=None)
