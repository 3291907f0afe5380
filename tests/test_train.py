"""Tests for flax_mnist.train: the loop, the workdir it writes, resume, several seeds."""

from __future__ import annotations

import json
import shutil

import ml_collections
import numpy as np
import pytest
from conftest import write_mnist_dir

from flax_mnist import config as config_lib
from flax_mnist import train
from flax_mnist.errors import ConfigError, RunError, WorkdirError

TIMING_KEYS = {"seconds", "train_seconds", "eval_seconds", "images_per_second", "parallel_seeds"}


def small_config(idx_dir, **overrides) -> ml_collections.ConfigDict:
  config = config_lib.default_config()
  config.model = "mlp"
  config.data_dir = str(idx_dir)
  config.batch_size = 64
  config.eval_batch_size = 32
  config.num_epochs = 2
  config.progress_bar = False
  config.update(overrides)
  return config


def _without_timing(history):
  return [
    {key: value for key, value in record.items() if key not in TIMING_KEYS} for record in history
  ]


def test_train_and_evaluate_writes_the_workdir(idx_dir, tmp_path):
  workdir = tmp_path / "run"
  lines = []
  history = train.train_and_evaluate(small_config(idx_dir), workdir, print_fn=lines.append)
  assert [record["epoch"] for record in history] == [1, 2]
  for record in history:
    assert (
      set(record)
      == {"epoch", "train_loss", "train_accuracy", "val_loss", "val_accuracy"} | TIMING_KEYS
    )
    assert 0 <= record["val_accuracy"] <= 1 and record["seconds"] > 0
    assert record["val_accuracy"] * 100 == pytest.approx(
      round(record["val_accuracy"] * 100)
    )  # n / 100 images.
  assert json.loads((workdir / "history.json").read_text()) == history
  assert json.loads((workdir / "config.json").read_text())["model"] == "mlp"
  assert any('Model: "mlp"' in line for line in lines)
  assert sum(line.startswith("epoch ") for line in lines) == 2
  best = max(history, key=lambda record: record["val_accuracy"])
  assert (workdir / "checkpoints" / "best" / str(best["epoch"])).is_dir()
  assert (workdir / "checkpoints" / "latest" / "2").is_dir()


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
  assert _without_timing(resumed) == _without_timing(straight)
  # Already done: nothing to train, the history comes back as it is.
  again = train.train_and_evaluate(
    small_config(idx_dir, num_epochs=3), tmp_path / "b", print_fn=None
  )
  assert _without_timing(again) == _without_timing(straight)


def test_workdir_of_another_model_or_seed_is_refused(idx_dir, tmp_path):
  train.train_and_evaluate(small_config(idx_dir, num_epochs=1), tmp_path / "run", print_fn=None)
  with pytest.raises(ConfigError, match="holds a run with model 'mlp', config.model is 'cnn_pool'"):
    train.train_and_evaluate(
      small_config(idx_dir, model="cnn_pool"), tmp_path / "run", print_fn=None
    )
  with pytest.raises(ConfigError, match="holds a run with seed 0, config.seed is 1"):
    train.train_and_evaluate(small_config(idx_dir, seed=1), tmp_path / "run", print_fn=None)


def test_divergence_is_reported(idx_dir, tmp_path):
  with pytest.raises(RunError, match="training diverged at epoch 1"):
    train.train_and_evaluate(
      small_config(idx_dir, learning_rate=1e30, num_epochs=1), tmp_path / "run", print_fn=None
    )


def _metrics_only(history):
  return [
    {key: value for key, value in record.items() if key not in TIMING_KEYS} for record in history
  ]


def test_looped_seeds_equal_their_single_seed_runs_and_compile_once(idx_dir, tmp_path):
  config = small_config(idx_dir, model="cnn_pool_bn", seeds=(0, 5), seed_parallelism="loop")
  lines = []
  histories = train.train_seeds(config, tmp_path / "seeds", print_fn=lines.append)
  assert list(histories) == [0, 5]
  assert sum("compiled the train epoch" in line for line in lines) == 1
  for seed in (0, 5):
    single = train.train_and_evaluate(
      small_config(idx_dir, model="cnn_pool_bn", seed=seed),
      tmp_path / f"single{seed}",
      print_fn=None,
    )
    assert _metrics_only(histories[seed]) == _metrics_only(single)  # The same program: bit for bit.
    seed_dir = tmp_path / "seeds" / f"seed_{seed}"
    assert json.loads((seed_dir / "config.json").read_text())["seed"] == seed
    assert (seed_dir / "checkpoints" / "best").is_dir()
    assert json.loads((seed_dir / "history.json").read_text()) == histories[seed]
  assert histories[0][-1]["val_loss"] != histories[5][-1]["val_loss"]  # Different seeds differ.
  aggregate = json.loads((tmp_path / "seeds" / "seeds.json").read_text())
  last = [histories[seed][-1]["val_loss"] for seed in (0, 5)]
  assert aggregate["epochs"][-1]["val_loss"]["mean"] == pytest.approx(np.mean(last))
  assert aggregate["epochs"][-1]["val_loss"]["std"] == pytest.approx(np.std(last, ddof=1))
  best = [max(r["val_accuracy"] for r in histories[seed]) for seed in (0, 5)]
  assert aggregate["best_val_accuracy"]["max"] == max(best)


def test_vmapped_seeds_equal_their_single_seed_runs(idx_dir, tmp_path):
  # One compiled program over the seed axis: params, optimizer state, BatchNorm statistics,
  # dropout and shuffle RNGs all batched. Equal to the separate runs up to float reassociation.
  settings = dict(model="cnn_pool_bn", dropout_rng_impl="threefry2x32", num_epochs=3)
  histories = train.train_seeds(
    small_config(idx_dir, num_seeds=2, seed_parallelism="vmap", **settings),
    tmp_path / "seeds",
    print_fn=None,
  )
  assert all(record["parallel_seeds"] == 2 for record in histories[0])
  for seed in (0, 1):
    single = train.train_and_evaluate(
      small_config(idx_dir, seed=seed, **settings), tmp_path / f"single{seed}", print_fn=None
    )
    for got, want in zip(_metrics_only(histories[seed]), _metrics_only(single)):
      assert got.keys() == want.keys()
      for key in got:
        # Float reassociation under vmap: the train losses agree to ~1e-7; the val loss of the
        # first epochs (eval-mode BatchNorm on young moving statistics, 100 images) to ~1e-4,
        # and that can move one image across the decision boundary.
        tolerance = {"abs": 0.011} if key.endswith("accuracy") else {"rel": 1e-3, "abs": 1e-6}
        assert got[key] == pytest.approx(want[key], **tolerance), (seed, key)


def test_vmapped_seeds_resume_and_refuse_seeds_at_different_epochs(idx_dir, tmp_path):
  settings = dict(
    model="mlp", dropout_rng_impl="threefry2x32", num_seeds=2, seed_parallelism="vmap"
  )
  straight = train.train_seeds(
    small_config(idx_dir, num_epochs=2, **settings), tmp_path / "a", print_fn=None
  )
  train.train_seeds(small_config(idx_dir, num_epochs=1, **settings), tmp_path / "b", print_fn=None)
  resumed = train.train_seeds(
    small_config(idx_dir, num_epochs=2, **settings), tmp_path / "b", print_fn=None
  )
  for seed in (0, 1):
    assert _metrics_only(resumed[seed]) == _metrics_only(straight[seed])
  # Seed 1 one epoch further than seed 0: a vmapped resume cannot line them up.
  train.train_and_evaluate(
    small_config(idx_dir, seed=1, num_epochs=3, dropout_rng_impl="threefry2x32"),
    tmp_path / "b" / "seed_1",
    print_fn=None,
  )
  with pytest.raises(
    ConfigError, match="resumes only seeds stopped at the same epoch; these are at 0: 2, 1: 3"
  ):
    train.train_seeds(
      small_config(idx_dir, num_epochs=4, **settings), tmp_path / "b", print_fn=None
    )


def test_a_measured_impl_is_recorded_and_reused_on_resume(idx_dir, tmp_path):
  lines = []
  config = small_config(idx_dir, model="cnn_pool", impl="measure", num_epochs=1)
  train.train_and_evaluate(config, tmp_path, print_fn=lines.append)
  run = json.loads((tmp_path / "run.json").read_text())
  timings = run["impl_seconds_per_step"]
  assert set(timings) == set(config_lib.impl_candidates()) and all(t > 0 for t in timings.values())
  chosen = min(timings, key=timings.get)
  assert json.loads((tmp_path / "config.json").read_text())["impl"] == chosen
  assert run["resolved"]["impl"] == chosen
  assert any(line.startswith("impl measured:") for line in lines)
  lines.clear()
  config.num_epochs = 2
  train.train_and_evaluate(config, tmp_path, print_fn=lines.append)
  assert any(f"impl {chosen} (recorded in" in line for line in lines)
  assert not any(line.startswith("impl measured:") for line in lines)
  assert "impl_seconds_per_step" not in json.loads((tmp_path / "run.json").read_text())


def test_a_bfloat16_run_trains_and_records_its_compute_dtype(idx_dir, tmp_path):
  config = small_config(idx_dir, model="cnn_pool_bn", compute_dtype="bfloat16", num_epochs=3)
  history = train.train_and_evaluate(config, tmp_path, print_fn=None)
  assert all(np.isfinite(record["train_loss"]) for record in history)
  assert history[-1]["train_loss"] < history[0]["train_loss"]
  assert json.loads((tmp_path / "config.json").read_text())["compute_dtype"] == "bfloat16"
  with pytest.raises(ConfigError, match="config.compute_dtype 'float16': expected one of"):
    config_lib.resolve(small_config(idx_dir, compute_dtype="float16"))


def test_a_multi_seed_workdir_refuses_another_model_dropped_seeds_and_a_single_seed(
  idx_dir, tmp_path
):
  workdir = tmp_path / "seeds"
  train.train_seeds(small_config(idx_dir, num_epochs=1, seeds=(0, 1)), workdir, print_fn=None)
  seeds_json = (workdir / "seeds.json").read_bytes()
  refusals = [
    # Another model's seeds beside these would be aggregated with them in seeds.json.
    (
      dict(model="cnn_pool", seeds=(5, 6)),
      ConfigError,
      "holds a run with model 'mlp', config.model is 'cnn_pool'",
    ),
    # A rerun with fewer seeds would rewrite seeds.json without seed 1.
    (dict(seeds=(0, 5)), ConfigError, "holds seeds 0, 1; training seeds 0, 5 would drop 1 from"),
  ]
  for overrides, error, message in refusals:
    with pytest.raises(error, match=message):
      train.train_seeds(small_config(idx_dir, num_epochs=1, **overrides), workdir, print_fn=None)
  with pytest.raises(WorkdirError, match="seeds: holds a multi-seed run"):
    train.train_and_evaluate(small_config(idx_dir, num_epochs=1, seed=1), workdir, print_fn=None)
  assert (workdir / "seeds.json").read_bytes() == seeds_json
  assert sorted(path.name for path in workdir.iterdir()) == ["seed_0", "seed_1", "seeds.json"]
  single = tmp_path / "single"
  train.train_and_evaluate(small_config(idx_dir, num_epochs=1), single, print_fn=None)
  with pytest.raises(WorkdirError, match="single: holds a single-seed run"):
    train.train_seeds(small_config(idx_dir, num_epochs=1, seeds=(0, 1)), single, print_fn=None)
  more_seeds = small_config(idx_dir, num_epochs=1, seeds=(0, 1, 2))
  more = train.train_seeds(more_seeds, workdir, print_fn=None)
  assert list(more) == [0, 1, 2]  # More seeds are welcome: seeds.json then holds all three.


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
