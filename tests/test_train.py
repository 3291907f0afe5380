"""Tests for flax_mnist.train: steps, batching with remainders, config, the loop and resume."""

from __future__ import annotations

import importlib.util
import json

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest
from conftest import REPO_ROOT, make_digits
from flax import nnx

from flax_mnist import models, train
from flax_mnist.errors import ConfigError

TIMING_KEYS = {"seconds", "train_seconds", "eval_seconds", "images_per_second", "parallel_seeds"}


def small_config(idx_dir, **overrides) -> ml_collections.ConfigDict:
  config = train.default_config()
  config.model = "mlp"
  config.data_dir = str(idx_dir)
  config.batch_size = 64
  config.eval_batch_size = 32
  config.num_epochs = 2
  config.progress_bar = False
  config.update(overrides)
  return config


def _split(name="mlp", seed=0):
  model = models.create_model(name, rngs=nnx.Rngs(params=seed, dropout=seed + 1))
  model.train()
  return nnx.split(model, nnx.Param, ...)


def test_train_steps_on_a_fixed_batch_lower_the_loss():
  images, labels = make_digits(64, seed=0)
  images, labels = jnp.asarray(images[..., None]), jnp.asarray(labels.astype(np.int32))
  graphdef, params, model_state = _split()
  tx = optax.adam(1e-3, eps=1e-7)
  epoch = train.make_train_epoch(graphdef, tx, batch_size=64, shuffle=False)
  opt_state = tx.init(params)
  losses = []
  for _ in range(15):
    params, model_state, opt_state, metrics = epoch(params, model_state, opt_state, images, labels,
                                                    jax.random.key(0))
    losses.append(float(metrics["loss_sum"]) / 64)
  assert losses[-1] < 0.5 * losses[0]


def test_epoch_covers_every_image_with_a_last_partial_batch():
  images, labels = make_digits(100, seed=0)
  images, labels = jnp.asarray(images[..., None]), jnp.asarray(labels.astype(np.int32))
  graphdef, params, model_state = _split()
  tx = optax.adam(1e-3)
  _, _, _, metrics = train.make_train_epoch(graphdef, tx, batch_size=32)(
      params, model_state, tx.init(params), images, labels, jax.random.key(0))
  assert int(metrics["count"]) == 100 and int(metrics["steps"]) == 4  # 3 x 32 + 1 x 4.
  model = nnx.merge(graphdef, params, model_state)
  model.eval()
  eval_metrics = train.make_evaluate(nnx.graphdef(model), batch_size=48)(params, model_state, images, labels)
  assert int(eval_metrics["count"]) == 100 and int(eval_metrics["steps"]) == 3


def test_evaluation_is_independent_of_the_batch_size():
  images, labels = make_digits(90, seed=2)
  model = models.create_model("cnn_pool", rngs=nnx.Rngs(0))
  results = [train.evaluate_model(model, images[..., None], labels.astype(np.int32), batch_size=size)
             for size in (90, 40, 7)]
  assert {result["correct"] for result in results} == {results[0]["correct"]}
  assert all(result["count"] == 90 for result in results)
  np.testing.assert_allclose([r["loss"] for r in results], results[0]["loss"], rtol=1e-5)


def test_shuffle_is_seeded_and_changes_per_key():
  images, labels = make_digits(64, seed=0)
  images, labels = jnp.asarray(images[..., None]), jnp.asarray(labels.astype(np.int32))
  graphdef, params, model_state = _split()
  tx = optax.adam(1e-3)
  epoch = train.make_train_epoch(graphdef, tx, batch_size=16)
  run = lambda key: epoch(params, model_state, tx.init(params), images, labels, jax.random.key(key))[0]
  leaves = lambda state: np.concatenate([np.ravel(x) for x in jax.tree_util.tree_leaves(state)])
  np.testing.assert_array_equal(leaves(run(1)), leaves(run(1)))
  assert not np.allclose(leaves(run(1)), leaves(run(2)))


@pytest.mark.parametrize("field, value, message", [
    ("model", "vgg", "config.model 'vgg': unknown"),
    ("batch_size", 0, "config.batch_size 0: expected a positive integer"),
    ("num_epochs", -1, "config.num_epochs -1: expected an integer >= 0"),
    ("learning_rate", float("nan"), "config.learning_rate nan: expected a positive number"),
    ("impl", "winograd", "impl 'winograd': unknown"),
    ("dropout_rng_impl", "mt19937", "config.dropout_rng_impl 'mt19937': expected one of auto, rbg"),
    ("num_seeds", 0, "config.num_seeds 0: expected a positive integer"),
    ("seeds", (3, 3), r"config.seeds \(3, 3\): expected distinct seeds"),
    ("seed_parallelism", "threads", "config.seed_parallelism 'threads': expected one of auto, loop, vmap"),
    ("best_metric", "loss", "config.best_metric 'loss': expected one of val_accuracy, val_loss"),
])
def test_bad_config_values_are_named(field, value, message):
  config = train.default_config()
  config.unlock()
  config[field] = value
  with pytest.raises(ConfigError, match=message):
    train.validate_config(config)


def test_vmapped_seeds_refuse_the_rbg_dropout_prng():
  # rbg draws other bits under vmap than alone: vmapped seeds would not equal their single runs.
  config = train.default_config()
  config.update(num_seeds=2, seed_parallelism="vmap", dropout_rng_impl="rbg")
  with pytest.raises(ConfigError, match="config.dropout_rng_impl 'rbg' with seed_parallelism 'vmap'"):
    train.validate_config(config)
  config.dropout_rng_impl = "threefry2x32"
  train.validate_config(config)


def test_seed_list_and_auto_choices_on_cpu():
  config = train.default_config()
  config.update(seed=4, num_seeds=3)
  assert train.seed_list(config) == [4, 5, 6]
  config.seeds = (9, 2)
  assert train.seed_list(config) == [9, 2]
  assert train.resolve_seed_parallelism("auto") == "loop"  # vmapping seeds measured no gain on CPU.
  assert train.resolve_dropout_rng_impl("auto") == "rbg"
  with pytest.raises(ConfigError, match=r"config trains seeds \[9, 2\]: use train_seeds"):
    train.train_and_evaluate(config, "unused", print_fn=None)


@pytest.mark.parametrize("name", models.model_names())
def test_config_files_hold_the_notebook_settings(name):
  spec = importlib.util.spec_from_file_location(f"config_{name}", REPO_ROOT / "configs" / f"{name}.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  config = module.get_config()
  assert config.model == name and config.seed == 0 and config.batch_size == 512
  assert config.num_epochs == 20 and config.learning_rate == 1e-3 and config.adam_eps == 1e-7
  train.validate_config(config)


def _without_timing(history):
  return [{key: value for key, value in record.items() if key not in TIMING_KEYS} for record in history]


def test_train_and_evaluate_writes_the_workdir(idx_dir, tmp_path):
  workdir = tmp_path / "run"
  lines = []
  history = train.train_and_evaluate(small_config(idx_dir), workdir, print_fn=lines.append)
  assert [record["epoch"] for record in history] == [1, 2]
  for record in history:
    assert set(record) == {"epoch", "train_loss", "train_accuracy", "val_loss", "val_accuracy"} | TIMING_KEYS
    assert 0 <= record["val_accuracy"] <= 1 and record["seconds"] > 0
    assert record["val_accuracy"] * 100 == pytest.approx(round(record["val_accuracy"] * 100))  # n / 100 images.
  assert json.loads((workdir / "history.json").read_text()) == history
  assert json.loads((workdir / "config.json").read_text())["model"] == "mlp"
  assert any('Model: "mlp"' in line for line in lines)
  assert sum(line.startswith("epoch ") for line in lines) == 2
  best = max(history, key=lambda record: record["val_accuracy"])
  assert (workdir / "checkpoints" / "best" / str(best["epoch"])).is_dir()
  assert (workdir / "checkpoints" / "latest" / "2").is_dir()


def test_resume_continues_the_history_exactly(idx_dir, tmp_path):
  straight = train.train_and_evaluate(small_config(idx_dir, num_epochs=3), tmp_path / "a", print_fn=None)
  train.train_and_evaluate(small_config(idx_dir, num_epochs=1), tmp_path / "b", print_fn=None)
  lines = []
  resumed = train.train_and_evaluate(small_config(idx_dir, num_epochs=3), tmp_path / "b", print_fn=lines.append)
  assert any("resumed from" in line and "at epoch 1" in line for line in lines)
  assert sum(line.startswith("epoch ") for line in lines) == 2  # Epochs 2 and 3 only.
  assert _without_timing(resumed) == _without_timing(straight)
  # Already done: nothing to train, the history comes back as it is.
  again = train.train_and_evaluate(small_config(idx_dir, num_epochs=3), tmp_path / "b", print_fn=None)
  assert _without_timing(again) == _without_timing(straight)


def test_workdir_of_another_model_or_seed_is_refused(idx_dir, tmp_path):
  train.train_and_evaluate(small_config(idx_dir, num_epochs=1), tmp_path / "run", print_fn=None)
  with pytest.raises(ConfigError, match="holds a run with model 'mlp', config.model is 'cnn_pool'"):
    train.train_and_evaluate(small_config(idx_dir, model="cnn_pool"), tmp_path / "run", print_fn=None)
  with pytest.raises(ConfigError, match="holds a run with seed 0, config.seed is 1"):
    train.train_and_evaluate(small_config(idx_dir, seed=1), tmp_path / "run", print_fn=None)


def test_divergence_is_reported(idx_dir, tmp_path):
  with pytest.raises(train.FlaxMnistError, match="training diverged at epoch 1"):
    train.train_and_evaluate(small_config(idx_dir, learning_rate=1e30, num_epochs=1), tmp_path / "run",
                             print_fn=None)


@pytest.mark.parametrize("impl", ["im2col", "batch_minor"])
def test_a_padded_masked_batch_steps_like_the_unpadded_one(impl):
  # The epoch pads its last partial batch to the batch size; the mask must make that step the
  # same as a step on the real rows alone: loss mean, gradients, BatchNorm statistics, metrics.
  rngs = nnx.Rngs(params=0)
  layers = [models.Conv(1, 4, rngs=rngs), models.BatchNorm(4, rngs=rngs), models.Flatten(),
            models.Dense(26 * 26 * 4, 10, rngs=rngs)]
  model = models.Classifier("conv_bn", layers, impl=impl)
  model.train()
  graphdef, params, model_state = nnx.split(model, nnx.Param, ...)
  tx = optax.adam(1e-2)
  images, labels = make_digits(12, seed=3)
  images, labels = jnp.asarray(images[..., None]), jnp.asarray(labels.astype(np.int32))
  padded_images = jnp.concatenate([images, jnp.full((4, 28, 28, 1), 255, jnp.uint8)])
  padded_labels = jnp.concatenate([labels, jnp.zeros(4, jnp.int32)])
  mask = jnp.arange(16) < 12
  carry = (params, model_state, tx.init(params), train._zero_metrics())
  plain = train.train_step(graphdef, tx, carry, (images, labels, None))
  masked = train.train_step(graphdef, tx, carry, (padded_images, padded_labels, mask))
  for got, want in zip(jax.tree.leaves(masked[:3]), jax.tree.leaves(plain[:3])):
    np.testing.assert_allclose(got, want, rtol=2e-5, atol=1e-6)
  assert int(masked[3]["count"]) == 12 and int(masked[3]["correct"]) == int(plain[3]["correct"])
  np.testing.assert_allclose(masked[3]["loss_sum"], plain[3]["loss_sum"], rtol=1e-5)
  # Without the mask the padding would move the BatchNorm statistics.
  unmasked = train.train_step(graphdef, tx, carry, (padded_images, padded_labels, None))
  assert not np.allclose(jax.tree.leaves(unmasked[1])[0], jax.tree.leaves(plain[1])[0])


def _metrics_only(history):
  return [{key: value for key, value in record.items() if key not in TIMING_KEYS} for record in history]


def test_looped_seeds_equal_their_single_seed_runs_and_compile_once(idx_dir, tmp_path):
  config = small_config(idx_dir, model="cnn_pool_bn", seeds=(0, 5), seed_parallelism="loop")
  lines = []
  histories = train.train_seeds(config, tmp_path / "seeds", print_fn=lines.append)
  assert list(histories) == [0, 5]
  assert sum("compiled the train epoch" in line for line in lines) == 1
  for seed in (0, 5):
    single = train.train_and_evaluate(small_config(idx_dir, model="cnn_pool_bn", seed=seed), tmp_path / f"single{seed}",
                                      print_fn=None)
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
  histories = train.train_seeds(small_config(idx_dir, num_seeds=2, seed_parallelism="vmap", **settings),
                                tmp_path / "seeds", print_fn=None)
  assert all(record["parallel_seeds"] == 2 for record in histories[0])
  for seed in (0, 1):
    single = train.train_and_evaluate(small_config(idx_dir, seed=seed, **settings), tmp_path / f"single{seed}",
                                      print_fn=None)
    for got, want in zip(_metrics_only(histories[seed]), _metrics_only(single)):
      assert got.keys() == want.keys()
      for key in got:
        assert got[key] == pytest.approx(want[key], rel=1e-4, abs=1e-6), (seed, key)


def test_vmapped_seeds_resume_and_refuse_seeds_at_different_epochs(idx_dir, tmp_path):
  settings = dict(model="mlp", dropout_rng_impl="threefry2x32", num_seeds=2, seed_parallelism="vmap")
  straight = train.train_seeds(small_config(idx_dir, num_epochs=2, **settings), tmp_path / "a", print_fn=None)
  train.train_seeds(small_config(idx_dir, num_epochs=1, **settings), tmp_path / "b", print_fn=None)
  resumed = train.train_seeds(small_config(idx_dir, num_epochs=2, **settings), tmp_path / "b", print_fn=None)
  for seed in (0, 1):
    assert _metrics_only(resumed[seed]) == _metrics_only(straight[seed])
  # Seed 1 one epoch further than seed 0: a vmapped resume cannot line them up.
  train.train_and_evaluate(small_config(idx_dir, seed=1, num_epochs=3, dropout_rng_impl="threefry2x32"),
                           tmp_path / "b" / "seed_1", print_fn=None)
  with pytest.raises(ConfigError, match="resumes only seeds stopped at the same epoch; these are at 0: 2, 1: 3"):
    train.train_seeds(small_config(idx_dir, num_epochs=4, **settings), tmp_path / "b", print_fn=None)
