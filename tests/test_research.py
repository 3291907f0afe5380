"""Research use from outside the package: own models by import path, optimizers, schedules and
losses from the config or from Python, early stopping, and the examples/ recipes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import warnings

import numpy as np
import pytest
from conftest import REPO_ROOT, small_config, write_mnist_dir
from flax import nnx

from flax_mnist import checkpoint, models, train
from flax_mnist.errors import ConfigError

EXAMPLES = REPO_ROOT / "examples"


def _run(args, idx_dir, **env):
  environment = {**os.environ, "FLAX_MNIST_DATA_DIR": str(idx_dir), **env}
  return subprocess.run(
    [sys.executable, *map(str, args)],
    capture_output=True,
    text=True,
    env=environment,
    cwd=REPO_ROOT,
  )


@pytest.mark.integration
def test_a_stock_nnx_model_outside_the_package_trains_by_import_path_and_loads_fresh(
  idx_dir, tmp_path
):
  workdir = tmp_path / "wide"
  pythonpath = {"PYTHONPATH": str(EXAMPLES)}
  result = _run(
    [
      REPO_ROOT / "scripts" / "train.py",
      "--config",
      REPO_ROOT / "configs" / "cnn_pool.py",
      "--workdir",
      workdir,
      "--config.model=my_models:wide_cnn",
      "--config.num_epochs=1",
      "--config.batch_size=64",
      "--config.eval_batch_size=50",
      "--config.progress_bar=False",
    ],
    idx_dir,
    **pythonpath,
  )
  assert result.returncode == 0, result.stderr[-3000:]
  assert "Model WideCnn" in result.stdout
  recorded = json.loads((workdir / "history.json").read_text())[0]["val_accuracy"]
  evaluate = [REPO_ROOT / "scripts" / "evaluate.py", "--workdir", workdir]
  # The workdir names the model by import path: importing it takes the caller's opt-in.
  result = _run([*evaluate, "--json"], idx_dir, **pythonpath)
  assert result.returncode == 2 and "Traceback" not in result.stderr
  assert "'my_models:wide_cnn': an import path" in result.stderr
  assert "--trust_model_code" in result.stderr
  result = _run([*evaluate, "--json", "--trust_model_code"], idx_dir, **pythonpath)
  assert result.returncode == 0, result.stderr[-3000:]
  assert json.loads(result.stdout.strip().splitlines()[-1])["test_accuracy"] == recorded
  assert "WARNING" not in result.stderr  # load_model is quiet.
  # Without the module on the path: one line that says how to name a model.
  result = _run([*evaluate, "--trust_model_code"], idx_dir)
  assert result.returncode == 2 and "Traceback" not in result.stderr
  assert "cannot import 'my_models'" in result.stderr and "PYTHONPATH" in result.stderr


def test_an_adamw_cosine_run_loads_alone_and_refuses_a_resume_under_another_optimizer(
  idx_dir, tmp_path
):
  settings = dict(model="cnn_pool", optimizer="adamw", weight_decay=1e-3, lr_schedule="cosine")
  history = train.train_and_evaluate(small_config(idx_dir, **settings), tmp_path, print_fn=None)
  model, info = checkpoint.load_model(tmp_path)  # The model alone: no optimizer state needed.
  assert isinstance(model, models.Classifier) and info["config"]["optimizer"] == "adamw"
  assert info["val_accuracy"] == max(record["val_accuracy"] for record in history)
  other = small_config(idx_dir, num_epochs=3, model="cnn_pool")  # keras_adam, constant.
  with pytest.raises(ConfigError) as error:
    train.train_and_evaluate(other, tmp_path, print_fn=None)
  message = str(error.value)
  assert "holds a run with optimizer 'adamw'" in message
  assert (
    "config.optimizer is 'keras_adam'" in message and "config.lr_schedule is 'constant'" in message
  )
  assert "config.weight_decay is 0.0" in message
  # The same optimizer resumes; with a schedule over the run, num_epochs is part of it.
  with pytest.raises(ConfigError, match="holds a run with num_epochs 2, config.num_epochs is 3"):
    train.train_and_evaluate(
      small_config(idx_dir, num_epochs=3, **settings), tmp_path, print_fn=None
    )


def test_early_stopping_ends_the_run_and_a_rerun_trains_nothing(idx_dir, tmp_path):
  # A learning rate too small to change a prediction: epoch 1 stays the best.
  config = small_config(idx_dir, num_epochs=5, learning_rate=1e-12, early_stopping_patience=2)
  lines = []
  history = train.train_and_evaluate(config, tmp_path, print_fn=lines.append)
  assert [record["epoch"] for record in history] == [1, 2, 3]
  assert history[-1]["stopped_early"] and not any(r.get("stopped_early") for r in history[:-1])
  assert any("stopped early at epoch 3" in line and "(best at epoch 1)" in line for line in lines)
  again = train.train_and_evaluate(config, tmp_path, print_fn=None)
  assert [record["epoch"] for record in again] == [1, 2, 3]


def test_registering_a_name_again_replaces_it_with_a_warning():
  @models.register("test_tiny")
  def tiny(*, rngs):
    return nnx.Linear(784, 10, rngs=rngs)

  with pytest.warns(UserWarning, match="model 'test_tiny' was registered already: replaced"):

    @models.register("test_tiny")
    def tiny_again(*, rngs):
      return nnx.Linear(784, 10, rngs=rngs)

  assert models.resolve_model("test_tiny") is tiny_again
  with warnings.catch_warnings():
    warnings.simplefilter("error")
    models.register("test_tiny")(tiny_again)  # The same factory again: nothing to say.


@pytest.mark.parametrize(
  "field, value, message",
  [
    ("optimizer", "lamb", "config.optimizer 'lamb': expected one of keras_adam, adam, adamw, sgd"),
    ("lr_schedule", "step", "config.lr_schedule 'step': expected one of constant, cosine"),
    ("weight_decay", 0.01, "config.weight_decay 0.01: only config.optimizer 'adamw' decays"),
    ("label_smoothing", 1.5, r"config.label_smoothing 1.5: expected a number in \[0, 1\)"),
    ("warmup_epochs", 25.0, "config.warmup_epochs 25.0: expected fewer than config.num_epochs 20"),
    ("early_stopping_patience", -1, "config.early_stopping_patience -1: expected an integer >= 0"),
    ("adam_b1", 1.0, r"config.adam_b1 1.0: expected a number in \[0, 1\)"),
  ],
)
def test_bad_optimizer_fields_are_named(field, value, message):
  from flax_mnist import config as config_lib

  config = config_lib.default_config()
  config.unlock()
  config[field] = value
  with pytest.raises(ConfigError, match=message):
    config_lib.resolve(config)


@pytest.mark.integration
@pytest.mark.parametrize(
  "recipe",
  ["own_model", "adamw_warmup_cosine", "frozen_layer", "own_loss", "own_data", "dropin_layers"],
)
def test_each_example_runs(recipe, idx_dir, tmp_path):
  workdir = tmp_path / recipe
  result = _run([EXAMPLES / f"{recipe}.py", workdir, 1], idx_dir)
  assert result.returncode == 0, result.stderr[-3000:]
  history = json.loads((workdir / "history.json").read_text())
  assert len(history) == 1 and np.isfinite(history[0]["val_loss"])
  recorded = json.loads((workdir / "config.json").read_text())
  if recipe == "frozen_layer":
    assert recorded["optimizer"] == "custom"
    model, _ = checkpoint.load_model(workdir, "latest")
    initial = models.init_model("cnn_pool", 0, impl="lax", dropout_rng_impl="rbg")
    np.testing.assert_array_equal(model.layers[0].kernel[...], initial.layers[0].kernel[...])
    assert not np.array_equal(model.layers[2].kernel[...], initial.layers[2].kernel[...])
  if recipe == "own_loss":
    assert recorded["loss"] == "custom: focal_loss"
  if recipe == "own_model":
    assert "reloaded WideCnn" in result.stdout
  if recipe == "dropin_layers":  # The fused drop-ins: no warning about stock layers.
    assert recorded["model_kwargs"] == {"mode": "fused"} and "stock" not in result.stdout
  if recipe == "own_data":
    assert recorded["num_classes"] == 5 and recorded["model_kwargs"] == {"width": 0.5}
    assert recorded["data_source"] == "arrays (rotated_digits_0to4)"
    model, _ = checkpoint.load_model(workdir)
    assert models.count_params(model)[0] == (
      4 * 9 + 4 + 8 * 4 * 9 + 8 + 200 * 64 + 64 + 64 * 16 + 16 + 16 * 5 + 5
    )  # Half width on 5 classes: conv 4 and 8, a 5x5x8 flatten, Dense 64 and 16.


@pytest.mark.integration
def test_fashion_mnist_trains_from_its_idx_directory_and_fails_offline_at_once_without(tmp_path):
  fashion_dir = write_mnist_dir(tmp_path / "fashion", num_train=64, num_test=32)
  workdir = tmp_path / "fashion_run"
  flags = ["--config.batch_size=32", "--config.eval_batch_size=32", "--config.progress_bar=False"]
  train_args = [REPO_ROOT / "scripts" / "train.py", "--config", REPO_ROOT / "configs" / "mlp.py"]
  fashion = ["--config.dataset=fashion_mnist", f"--config.data_dir={fashion_dir}"]
  result = _run([*train_args, *fashion, *flags, "--config.num_epochs=1", "--workdir", workdir], "")
  assert result.returncode == 0, result.stderr[-3000:]
  recorded = json.loads((workdir / "config.json").read_text())
  assert recorded["dataset"] == "fashion_mnist"
  assert recorded["data"].startswith("fashion_mnist: 64 train + 32 test images of 28x28x1")
  evaluated = _run([REPO_ROOT / "scripts" / "evaluate.py", "--workdir", workdir, "--json"], "")
  assert evaluated.returncode == 0, evaluated.stderr[-3000:]
  assert json.loads(evaluated.stdout)["count"] == 32
  # The same files as MNIST are other data: no resume on them.
  as_mnist = [f"--config.data_dir={fashion_dir}", "--config.num_epochs=2", "--workdir", workdir]
  refused = _run([*train_args, *as_mnist, *flags], "")
  assert refused.returncode == 2 and "data" in refused.stderr, refused.stderr[-3000:]
  # No files and no network (every download refused by a dead proxy): one line, in seconds.
  offline = {"http_proxy": "http://127.0.0.1:9", "https_proxy": "http://127.0.0.1:9"}
  offline |= {"HTTP_PROXY": offline["http_proxy"], "HTTPS_PROXY": offline["https_proxy"]}
  offline |= {"no_proxy": "", "NO_PROXY": ""}
  no_files = [f"--config.tfds_data_dir={tmp_path / 'tfds'}", "--workdir", tmp_path / "none"]
  started = time.monotonic()
  failed = _run([*train_args, "--config.dataset=fashion_mnist", *no_files], "", **offline)
  assert time.monotonic() - started < 60  # TFDS's own retries take minutes.
  assert failed.returncode == 2, failed.stderr[-3000:]
  assert failed.stderr.startswith("error: no fashion_mnist files given"), failed.stderr[-3000:]
  assert failed.stderr.count("\n") == 1 and "Traceback" not in failed.stderr


@pytest.mark.integration
def test_a_model_of_stock_nnx_convs_gets_one_warning_on_cpu_naming_the_drop_in(idx_dir, tmp_path):
  sys.path.insert(0, str(EXAMPLES))
  try:
    config = small_config(idx_dir, model="dropin_layers:cnn_pool", num_epochs=1)
    for mode, warned in (("stock", True), ("dropin", False)):
      config.model_kwargs = {"mode": mode}
      lines = []
      train.train_and_evaluate(config, tmp_path / mode, print_fn=lines.append)
      warned_lines = [line for line in lines if line.startswith("warning:")]
      assert len(warned_lines) == warned, lines
      if warned:
        assert "stock flax.nnx.Conv layers (conv1, conv2)" in warned_lines[0]
        assert "flax_mnist.nn.Conv" in warned_lines[0]
  finally:
    sys.path.remove(str(EXAMPLES))
