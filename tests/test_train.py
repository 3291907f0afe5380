"""Tests for flax_mnist.train: the loop, the workdir it writes, several seeds (one compiled
program, looped or vmapped, resumed together), bfloat16 compute (resume: test_seed_run.py)."""

from __future__ import annotations

import json

import jax.numpy as jnp
import numpy as np
import pytest
from conftest import REPO_ROOT, TIMING_KEYS, small_config, without_timing

from flax_mnist import checkpoint, data, evaluation, train
from flax_mnist import config as config_lib
from flax_mnist.errors import ConfigError, RunError, WorkdirError


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


@pytest.mark.integration  # Several epochs of several runs: too slow for the fast tier.
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
    # The same program: bit for bit.
    assert without_timing(histories[seed]) == without_timing(single)
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


@pytest.mark.integration  # Several epochs of several runs: too slow for the fast tier.
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
    for got, want in zip(without_timing(histories[seed]), without_timing(single)):
      assert got.keys() == want.keys()
      for key in got:
        # Float reassociation under vmap: the train losses agree to ~1e-7; the val loss of the
        # first epochs (eval-mode BatchNorm on young moving statistics, 100 images) to ~1e-4,
        # and that can move one image across the decision boundary.
        tolerance = {"abs": 0.011} if key.endswith("accuracy") else {"rel": 1e-3, "abs": 1e-6}
        assert got[key] == pytest.approx(want[key], **tolerance), (seed, key)


@pytest.mark.integration  # Several epochs of several runs: too slow for the fast tier.
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
    assert without_timing(resumed[seed]) == without_timing(straight[seed])
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


@pytest.mark.integration  # Compiles and trains whole models: seconds each.
def test_a_bfloat16_run_trains_and_records_its_compute_dtype(idx_dir, tmp_path):
  config = small_config(idx_dir, model="cnn_pool_bn", compute_dtype="bfloat16", num_epochs=3)
  history = train.train_and_evaluate(config, tmp_path, print_fn=None)
  assert all(np.isfinite(record["train_loss"]) for record in history)
  assert history[-1]["train_loss"] < history[0]["train_loss"]
  assert json.loads((tmp_path / "config.json").read_text())["compute_dtype"] == "bfloat16"
  with pytest.raises(ConfigError, match="config.compute_dtype 'float16': expected one of"):
    config_lib.resolve(small_config(idx_dir, compute_dtype="float16"))


@pytest.mark.integration  # Compiles and trains whole models: seconds each.
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


def test_divergence_is_reported(idx_dir, tmp_path):
  with pytest.raises(RunError, match="training diverged at epoch 1"):
    train.train_and_evaluate(
      small_config(idx_dir, learning_rate=1e30, num_epochs=1), tmp_path / "run", print_fn=None
    )


@pytest.mark.integration  # Trains, loads and resumes whole runs.
def test_your_own_arrays_train_load_and_resume_and_other_data_is_refused(idx_dir, tmp_path):
  rng = np.random.default_rng(0)
  labels = rng.integers(0, 5, 220)
  # Five classes told apart by the brightness of one channel: learnable in a few epochs.
  images = rng.integers(0, 30, (220, 16, 14, 3), dtype=np.uint8)
  images[..., 1] += (labels * 55).astype(np.uint8)[:, None, None]
  dataset = data.from_arrays(images[:160], labels[:160], images[160:], labels[160:], name="bars")
  config = small_config(idx_dir, model="cnn_pool", num_epochs=1, batch_size=16, learning_rate=3e-3)
  run = tmp_path / "run"
  first = train.train_and_evaluate(config, run, data=dataset, print_fn=None)
  recorded = json.loads((run / "config.json").read_text())
  assert recorded["input_shape"] == [16, 14, 3] and recorded["num_classes"] == 5
  assert recorded["data_source"] == "arrays (bars)" and recorded["data"].startswith("bars: ")
  model, info = checkpoint.load_model(run)
  assert model(jnp.zeros((2, 16, 14, 3))).shape == (2, 5)
  result = evaluation.evaluate_model(model, dataset.test.images, dataset.test.labels)
  assert result["accuracy"] == info["val_accuracy"]  # The recorded best, reproduced.
  config.num_epochs = 3
  resumed = train.train_and_evaluate(config, run, data=dataset, print_fn=None)
  assert without_timing(resumed[:1]) == without_timing(first)
  assert resumed[-1]["val_accuracy"] > 0.5  # Chance is 0.2; this run reached 1.0 (AMD).
  other = data.from_arrays(images[:150], labels[:150], images[160:], labels[160:], name="bars")
  config.num_epochs = 4
  with pytest.raises(ConfigError, match=r"holds a run with data 'bars: 160 train"):
    train.train_and_evaluate(config, run, data=other, print_fn=None)
  with pytest.raises(ConfigError, match=r"holds a run with data 'bars: .*this run's data"):
    train.train_and_evaluate(config, run, print_fn=None)  # MNIST now: refused too.


@pytest.mark.integration  # Trains a whole (small) model.
def test_a_model_that_ignores_compute_dtype_is_warned_and_recorded_as_float32(
  idx_dir, tmp_path, monkeypatch
):
  monkeypatch.syspath_prepend(str(REPO_ROOT / "examples"))  # my_models: stock nnx layers.
  config = small_config(
    idx_dir, model="my_models:wide_cnn", model_kwargs={"width": 2}, compute_dtype="bfloat16"
  )
  config.num_epochs = 1
  lines = []
  train.train_and_evaluate(config, tmp_path, print_fn=lines.append)
  warning = (
    "warning: model 'my_models:wide_cnn' does not take compute_dtype, so config.compute_dtype "
    "'bfloat16' is not applied (it computes in its own dtype); recorded as float32"
  )
  assert warning in lines
  assert json.loads((tmp_path / "config.json").read_text())["compute_dtype"] == "float32"
  assert json.loads((tmp_path / "run.json").read_text())["resolved"]["compute_dtype"] == "float32"
