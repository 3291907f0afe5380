"""Tests for flax_mnist.workdir: atomic JSON, history reads, gs:// paths, resume checks."""

import json

import pytest

from flax_mnist import workdir
from flax_mnist.errors import ConfigError, FlaxMnistError


def test_write_json_replaces_atomically_and_leaves_no_temporary(tmp_path):
  path = tmp_path / "x.json"
  workdir.write_json(path, {"a": 1})
  workdir.write_json(path, {"a": 2})
  assert json.loads(path.read_text()) == {"a": 2}
  assert [p.name for p in tmp_path.iterdir()] == ["x.json"]


def test_read_history_stops_at_the_checkpointed_epoch_and_names_a_damaged_file(tmp_path):
  workdir.write_json(tmp_path / workdir.HISTORY_FILE, [{"epoch": 1}, {"epoch": 2}, {"epoch": 3}])
  assert workdir.read_history(tmp_path, 2) == [{"epoch": 1}, {"epoch": 2}]
  assert workdir.read_history(tmp_path / "none", 2) == []
  (tmp_path / workdir.HISTORY_FILE).write_text("[{")
  with pytest.raises(FlaxMnistError, match=r"history.json: not valid JSON"):
    workdir.read_history(tmp_path, 2)


def test_a_bucket_workdir_stays_a_url():
  # pathlib would make this the local folder "gs:/bucket/run".
  assert str(workdir.seed_dir("gs://bucket/run", 3)) == "gs://bucket/run/seed_3"
  assert str(workdir.absolute("gs://bucket/run")) == "gs://bucket/run"


def test_check_resumable_refuses_another_model(tmp_path):
  workdir.write_json(tmp_path / workdir.CONFIG_FILE, {"model": "mlp", "seed": 0})
  workdir.check_resumable(tmp_path, {"model": "mlp", "seed": 0})
  with pytest.raises(ConfigError, match="holds a run with model 'mlp', config.model is 'cnn'"):
    workdir.check_resumable(tmp_path, {"model": "cnn", "seed": 0})
