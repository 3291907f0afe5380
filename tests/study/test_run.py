"""Tests for flax_mnist.study.run: the study trains each model's experiment config as given."""

from __future__ import annotations

import json

import pytest
from conftest import REPO_ROOT

from flax_mnist import workdir as workdir_lib
from flax_mnist.config import load_config_file
from flax_mnist.errors import ConfigError
from flax_mnist.study import run


def _config(name, **overrides):
  config = load_config_file(REPO_ROOT / "configs" / f"{name}.py")
  config.update(overrides)
  return config


def test_tiny_comparison_trains_each_config_as_given_and_resumes(idx_dir, tmp_path):
  # batch_size stands for an override in configs/mlp.py: it reaches the study.
  config = _config("mlp", data_dir=str(idx_dir), batch_size=64)
  workdir = tmp_path / "runs"
  results = run.run_comparison({"mlp": config}, [0, 1], 1, workdir, print_fn=None)
  assert results["settings"] == {"models": ["mlp"], "seeds": [0, 1], "num_epochs": 1}
  entry = results["models"]["mlp"]
  assert entry["config"]["batch_size"] == 64 and entry["config"]["seeds"] == [0, 1]
  assert entry["config"]["num_epochs"] == 1 and entry["config"]["progress_bar"] is False
  assert config.num_epochs == 20 and tuple(config.seeds) == ()  # The caller's config is a copy.
  assert set(entry["histories"]) == {"0", "1"}
  assert all(len(history) == 1 for history in entry["histories"].values())
  assert entry["seed_parallelism"] == "loop" and entry["compile_seconds"] > 0
  assert entry["facts"]["trainable"] == 104_938 and entry["summary"]["num_seeds"] == 2
  assert results["pairwise"] == []
  wall = json.loads((workdir / "mlp" / workdir_lib.WALL_FILE).read_text())
  assert wall["wall_seconds"] == entry["wall_seconds"] and wall["seeds"] == [0, 1]
  # Again: nothing left to train, the first run's wall time kept.
  again = run.run_comparison({"mlp": config}, [0, 1], 1, workdir, print_fn=None)
  assert again["models"]["mlp"]["histories"] == entry["histories"]
  assert again["models"]["mlp"]["wall_seconds"] == entry["wall_seconds"]


def test_every_config_is_checked_before_any_model_trains(tmp_path):
  with pytest.raises(ConfigError, match="its config trains model 'mlp'"):
    run.study_config("cnn", _config("mlp"), [0], 1)
  configs = {"mlp": _config("mlp"), "cnn": _config("cnn", batch_size=0)}
  with pytest.raises(ConfigError, match="batch_size"):
    run.run_comparison(configs, [0], 1, tmp_path / "runs", print_fn=None)
  assert not (tmp_path / "runs").exists()


def test_workdirs_trained_longer_than_the_study_asks_are_refused(idx_dir, tmp_path):
  # A report of 1 epoch from 2-epoch histories would mix: refused, naming the epochs to pass.
  config = _config("mlp", data_dir=str(idx_dir), batch_size=64)
  workdir = tmp_path / "runs"
  run.run_comparison({"mlp": config}, [0], 2, workdir, print_fn=None)
  with pytest.raises(
    ConfigError, match=r"seed_0: holds 2 epochs, the study asks for 1: .*--epochs 2"
  ):
    run.run_comparison({"mlp": config}, [0], 1, workdir, print_fn=None)
