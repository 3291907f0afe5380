"""Tests for flax_mnist.workdir: atomic JSON, history reads, gs:// paths, resume checks."""

import json

import pytest

from flax_mnist import workdir
from flax_mnist.errors import ConfigError, FlaxMnistError, WorkdirError


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


def test_check_resumable_names_each_field_that_differs_and_one_recorded_on_one_side_only():
  recorded = {"model": "mlp", "seed": 0, "loss": "custom: focal"}
  workdir.check_resumable("run", recorded, {"model": "mlp", "seed": 0, "loss": "custom: focal"})
  with pytest.raises(ConfigError, match="holds a run with model 'mlp', config.model is 'cnn'"):
    workdir.check_resumable("run", recorded, {**recorded, "model": "cnn"})
  # A loss_fn passed from Python is recorded; resuming without it would train another loss.
  with pytest.raises(ConfigError, match="loss 'custom: focal', config.loss is '\\(not set\\)'"):
    workdir.check_resumable("run", recorded, {"model": "mlp", "seed": 0}, ("model", "loss"))


@pytest.mark.parametrize(
  "name, text, message",
  [
    ("config.json", "[1, 2]", "config.json: a JSON list, expected an object"),
    ("history.json", '{"epoch": 1}', "history.json: expected a list of epoch records"),
    ("history.json", '[{"epoch": "1"}]', "history.json: expected a list of epoch records"),
  ],
)
def test_json_of_the_wrong_shape_is_one_line_naming_the_file(tmp_path, name, text, message):
  (tmp_path / name).write_text(text)
  with pytest.raises(FlaxMnistError, match=message):
    workdir.read_config(tmp_path) if name == "config.json" else workdir.read_history(tmp_path, 9)


def test_no_path_in_a_workdir_may_lead_out_of_it(tmp_path):
  other, run = tmp_path / "other", tmp_path / "run"
  (other / "checkpoints" / "latest").mkdir(parents=True)
  (run / "checkpoints").mkdir(parents=True)
  (run / "checkpoints" / "best").mkdir()
  (run / "inside").symlink_to(run / "checkpoints" / "best")  # Within the workdir: fine.
  workdir.check_contained(run)
  for name, target in (("checkpoints/latest", other / "checkpoints" / "latest"), (".lock", other)):
    (run / name).symlink_to(target)
    with pytest.raises(WorkdirError, match=f"run/{name}: a link to {target}, outside the workdir"):
      workdir.check_contained(run)
    (run / name).unlink()


def test_a_multi_seed_workdir_and_a_single_seed_one_do_not_mix(tmp_path):
  multi, single = tmp_path / "multi", tmp_path / "single"
  workdir.write_json(workdir.seed_dir(multi, 0).mkdir(parents=True) or multi / "seeds.json", {})
  workdir.write_json(workdir.seed_dir(multi, 0) / "config.json", {"model": "cnn_pool", "seed": 0})
  workdir.seed_dir(multi, 1).mkdir()
  with pytest.raises(WorkdirError, match="multi: holds a multi-seed run"):
    workdir.check_single_seed(multi)
  run = {"model": "cnn_pool", "seed": 5}
  workdir.check_multi_seed(multi, [0, 1, 2], run, ("model", "seed"))  # More seeds: fine.
  with pytest.raises(ConfigError, match="holds a run with model 'cnn_pool', config.model is 'mlp'"):
    workdir.check_multi_seed(multi, [0, 1, 5], {"model": "mlp", "seed": 5}, ("model", "seed"))
  with pytest.raises(ConfigError, match="holds seeds 0, 1; training seeds 0, 5 would drop 1"):
    workdir.check_multi_seed(multi, [0, 5], run, ("model", "seed"))
  workdir.write_json(single.mkdir() or single / "config.json", {"model": "mlp"})
  with pytest.raises(WorkdirError, match="single: holds a single-seed run"):
    workdir.check_multi_seed(single, [0, 1], run, ("model",))


def test_write_text_is_atomic_and_names_the_file_it_could_not_write(tmp_path):
  target = tmp_path / "report.md"
  workdir.write_text(target, "first")
  workdir.write_text(target, "second")
  assert target.read_text() == "second" and sorted(tmp_path.iterdir()) == [target]
  (tmp_path / "a_dir").mkdir()
  with pytest.raises(IsADirectoryError) as raised:
    workdir.write_text(tmp_path / "a_dir", "text")
  assert raised.value.filename == str(tmp_path / "a_dir")  # _cli prints it as one line.
  assert not list(tmp_path.rglob("*.tmp"))  # Nothing half-written left behind.
