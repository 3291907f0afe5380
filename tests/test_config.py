"""Tests for flax_mnist.config: validation, "auto" resolved once, config files."""

from __future__ import annotations

import dataclasses
import json

import pytest
from conftest import REPO_ROOT

from flax_mnist import config as config_lib
from flax_mnist import models, train
from flax_mnist.errors import ConfigError


@pytest.mark.parametrize(
  "field, value, message",
  [
    ("model", "vgg", "config.model 'vgg': unknown"),
    ("batch_size", 0, "config.batch_size 0: expected a positive integer"),
    ("num_epochs", -1, "config.num_epochs -1: expected an integer >= 0"),
    ("learning_rate", float("nan"), "config.learning_rate nan: expected a positive number"),
    ("impl", "winograd", "config.impl 'winograd': expected one of auto, lax, im2col, s2d"),
    ("dropout_rng_impl", "mt19937", "config.dropout_rng_impl 'mt19937': expected one of auto, rbg"),
    ("num_seeds", 0, "config.num_seeds 0: expected a positive integer"),
    ("seeds", (3, 3), r"config.seeds \(3, 3\): expected distinct seeds"),
    # int() would train seeds 0 and 1 and record 0.2 and 1.9.
    ("seeds", (0.2, 1.9), r"config.seeds \(0.2, 1.9\): 0.2 is not a seed, expected integers"),
    ("seeds", ("a", "b"), r"config.seeds \('a', 'b'\): 'a' is not a seed, expected integers"),
    ("seeds", (True,), r"config.seeds \(True,\): True is not a seed"),
    ("seed", -1, "config.seed -1: -1 is not a seed, expected integers in 0..2"),
    (
      "seed_parallelism",
      "threads",
      "config.seed_parallelism 'threads': expected one of auto, loop, vmap",
    ),
    ("best_metric", "loss", "config.best_metric 'loss': expected one of val_accuracy, val_loss"),
  ],
)
def test_bad_config_values_are_named(field, value, message):
  config = config_lib.default_config()
  config.unlock()
  config[field] = value
  with pytest.raises(ConfigError, match=message):
    config_lib.resolve(config)


def test_vmapped_seeds_refuse_the_rbg_dropout_prng():
  # rbg draws other bits under vmap than alone: vmapped seeds would not equal their single runs.
  config = config_lib.default_config()
  config.update(num_seeds=2, seed_parallelism="vmap", dropout_rng_impl="rbg")
  with pytest.raises(
    ConfigError, match="config.dropout_rng_impl 'rbg' with seed_parallelism 'vmap'"
  ):
    config_lib.resolve(config)
  config.dropout_rng_impl = "threefry2x32"
  config_lib.resolve(config)


def test_seed_list_and_auto_choices_on_cpu():
  config = config_lib.default_config()
  config.update(seed=4, num_seeds=3)
  assert config_lib.seed_list(config) == [4, 5, 6]
  config.seeds = (9, 2)
  assert config_lib.seed_list(config) == [9, 2]
  assert (
    config_lib.resolve_seed_parallelism("auto") == "loop"
  )  # vmapping seeds measured no gain on CPU.
  assert config_lib.resolve_dropout_rng_impl("auto") == "rbg"
  with pytest.raises(ConfigError, match=r"config trains seeds \[9, 2\]: use train_seeds"):
    train.train_and_evaluate(config, "unused", print_fn=None)


@pytest.mark.parametrize("name", models.model_names())
def test_config_files_hold_the_notebook_settings(name):
  config = config_lib.load_config_file(REPO_ROOT / "configs" / f"{name}.py")
  assert config.model == name and config.seed == 0 and config.batch_size == 512
  assert config.num_epochs == 20 and config.learning_rate == 1e-3 and config.adam_eps == 1e-7
  config_lib.resolve(config)


def test_resolve_records_every_auto_as_a_concrete_choice():
  run = config_lib.resolve(config_lib.default_config())
  assert (run.impl, run.dropout_rng_impl, run.seed_parallelism) == ("s2d", "rbg", "loop")
  assert run.seeds == (0,) and run.resolved()["seeds"] == [0] and run.data_devices == 1
  record = run.for_seed(0).to_dict()
  assert "auto" not in (record["impl"], record["dropout_rng_impl"], record["seed_parallelism"])
  assert json.loads(json.dumps(record)) == record


def test_the_run_config_has_every_config_field_and_resolves_the_seeds():
  fields = [field.name for field in dataclasses.fields(config_lib.RunConfig)]
  config = config_lib.default_config()
  added = {"process_count", "data", "data_source", "input_shape", "num_classes", "loss"}
  assert set(fields) - added == set(config.keys()) and len(fields) == len(config.keys()) + 6
  config.seed, config.num_seeds = 3, 2
  run = config_lib.resolve(config)
  assert run.seeds == (3, 4) and run.num_seeds == 2
  config.seeds = (5,)  # config.seeds names the seeds, config.seed then says nothing.
  assert (config_lib.resolve(config).seed, config_lib.resolve(config).seeds) == (5, (5,))
  seed_run = run.for_seed(4)
  assert (seed_run.seed, seed_run.seeds, seed_run.num_seeds) == (4, (4,), 1)
  assert set(seed_run.to_dict()) == set(config.keys())  # data, loss: only once set.
  with pytest.raises(dataclasses.FrozenInstanceError):
    run.seed = 1


def test_resolve_refuses_a_field_the_defaults_do_not_have():
  config = config_lib.default_config()
  config.learning_rat = 0.1
  with pytest.raises(ConfigError, match=r"unknown field config.learning_rat; did you mean"):
    config_lib.resolve(config)


def test_a_misspelt_field_in_a_config_file_is_refused_with_the_nearest_name(tmp_path):
  path = tmp_path / "typo.py"
  path.write_text(
    "from flax_mnist.config import default_config\n\n"
    "def get_config():\n  config = default_config()\n  config.num_epoch = 3\n  return config\n"
  )
  with pytest.raises(
    ConfigError, match=r"typo.py: unknown field config.num_epoch; did you mean 'num_epochs'"
  ):
    config_lib.load_config_file(path)


@pytest.mark.parametrize(
  "text, message",
  [
    (None, "no such config file"),
    ("def get_config(:\n", r"broken.py:1: syntax error"),
    ("x = 1\n", r"defines no get_config\(\)"),
  ],
)
def test_a_missing_or_broken_config_file_is_one_line(tmp_path, text, message):
  path = tmp_path / "broken.py"
  if text is not None:
    path.write_text(text)
  with pytest.raises(ConfigError, match=message):
    config_lib.load_config_file(path)


@pytest.mark.parametrize(
  "body, raised",
  [
    ("import sys\nsys.exit(0)\n", r"SystemExit\(0\): a config file must not exit"),
    ("def get_config():\n  raise SystemExit(3)\n", r"SystemExit\(3\): a config file must not exit"),
  ],
)
def test_a_config_file_that_exits_is_one_line_not_a_successful_run(tmp_path, body, raised):
  path = tmp_path / "exits.py"
  path.write_text(body)
  with pytest.raises(ConfigError, match=f"exits.py: loading it raised {raised}"):
    config_lib.load_config_file(path)
