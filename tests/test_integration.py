"""End to end on the real MNIST (../shared/datasets/mnist or $FLAX_MNIST_DATA_DIR), and the CLI."""

from __future__ import annotations

import json

import pytest
from conftest import run_script, write_mnist_dir

from flax_mnist import checkpoint, data, evaluation, train
from flax_mnist.config import default_config

pytestmark = pytest.mark.integration


def test_real_mnist_loads_with_the_documented_shapes(real_data_dir):
  mnist = data.load_mnist(real_data_dir)
  assert mnist.train.images.shape == (60_000, 28, 28, 1) and mnist.test.images.shape == (
    10_000,
    28,
    28,
    1,
  )
  assert mnist.train.images.dtype.name == "uint8" and mnist.train.labels.dtype.name == "int32"
  assert mnist.train.labels[:10].tolist() == [5, 0, 4, 1, 9, 2, 1, 3, 1, 4]  # The original order.
  assert mnist.test.labels[:5].tolist() == [7, 2, 1, 0, 4]
  assert sorted(set(mnist.train.labels.tolist())) == list(range(10))


def test_cli_trains_with_overrides_and_evaluate_reproduces_the_best_val_accuracy(
  real_data_dir, tmp_path
):
  workdir = tmp_path / "mlp"
  result = run_script(
    "train.py",
    "--config",
    "configs/mlp.py",
    "--workdir",
    str(workdir),
    "--config.num_epochs=2",
    f"--config.data_dir={real_data_dir}",
  )
  assert result.returncode == 0, result.stderr[-3000:]
  assert "Total params: 104,938" in result.stdout and "epoch   2/2" in result.stdout
  config = json.loads((workdir / "config.json").read_text())
  assert config["num_epochs"] == 2 and config["data_dir"] == str(real_data_dir)
  history = json.loads((workdir / "history.json").read_text())
  assert len(history) == 2
  assert history[-1]["val_accuracy"] > 0.92  # Keras: 0.938 after 2 epochs.
  result = run_script("evaluate.py", "--workdir", str(workdir), "--json")
  assert result.returncode == 0, result.stderr[-3000:]
  report = json.loads(result.stdout.strip().splitlines()[-1])
  best = max(history, key=lambda record: record["val_accuracy"])
  assert report["count"] == 10_000 and report["epoch"] == best["epoch"]
  assert report["test_accuracy"] == best["val_accuracy"] == report["recorded_val_accuracy"]


@pytest.mark.parametrize("name, minimum", [("cnn", 0.95), ("cnn_pool", 0.92)])
def test_one_epoch_on_real_mnist_and_the_best_checkpoint_reproduces_it(
  real_data_dir, tmp_path, name, minimum
):
  config = default_config()
  config.model, config.num_epochs, config.data_dir, config.progress_bar = (
    name,
    1,
    str(real_data_dir),
    False,
  )
  history = train.train_and_evaluate(config, tmp_path, print_fn=None)
  assert history[0]["val_accuracy"] > minimum  # Keras after 1 epoch: cnn ~0.96, cnn_pool ~0.94.
  model, info = checkpoint.load_model(tmp_path)
  test = data.load_mnist(real_data_dir).test
  result = evaluation.evaluate_model(
    model, test.images, test.labels, batch_size=config.eval_batch_size
  )
  assert result["count"] == 10_000
  assert result["accuracy"] == info["val_accuracy"] == history[0]["val_accuracy"]


def _assert_one_line_error(result, *fragments):
  assert result.returncode != 0
  assert "Traceback" not in result.stderr
  lines = [line for line in result.stderr.splitlines() if line.startswith("error:")]
  assert len(lines) == 1, result.stderr[-2000:]
  for fragment in fragments:
    assert fragment in lines[0]


def test_cli_errors_are_one_line(tmp_path):
  _assert_one_line_error(
    run_script("evaluate.py", "--workdir", str(tmp_path / "nowhere")),
    "nowhere",
    "no checkpoints directory",
  )
  bad_dir = write_mnist_dir(tmp_path / "bad", num_train=10, num_test=5, compress=False)
  (bad_dir / "train-images-idx3-ubyte").write_bytes(b"\x00\x00\x08\x01garbage")
  result = run_script(
    "train.py",
    "--config",
    "configs/mlp.py",
    "--workdir",
    str(tmp_path / "run"),
    f"--config.data_dir={bad_dir}",
  )
  _assert_one_line_error(
    result, "train-images-idx3-ubyte", "bad magic number 0x00000801, expected 0x00000803"
  )
  result = run_script(
    "train.py",
    "--config",
    "configs/mlp.py",
    "--workdir",
    str(tmp_path / "run"),
    "--config.model=vgg",
  )
  _assert_one_line_error(result, "config.model 'vgg': unknown, expected one of mlp, cnn")


def test_tiny_seed_comparison_writes_the_report(real_data_dir, tmp_path):
  # CI's small version of the committed 5-seed, 20-epoch report: 2 seeds, 1 epoch, 2 models.
  from flax_mnist import study

  out = tmp_path / "report"
  result = run_script(
    "compare.py",
    "--models",
    "mlp,cnn_pool",
    "--seeds",
    "2",
    "--epochs",
    "1",
    "--out",
    str(out),
    "--workdir",
    str(tmp_path / "runs"),
    "--data_dir",
    str(real_data_dir),
  )
  assert result.returncode == 0, result.stderr[-3000:]
  report = (out / "report.md").read_text()
  for section in study.SECTIONS:
    assert f"## {section}" in report, section
  for plot in ("val_curves", "accuracy_vs_params", "train_vs_val"):
    assert (out / study.PLOTS[plot]).stat().st_size > 10_000
  results = json.loads((out / "results.json").read_text())
  assert results["settings"] == {"models": ["mlp", "cnn_pool"], "seeds": [0, 1], "num_epochs": 1}
  assert results["environment"]["platform"] == "cpu" and results["environment"]["versions"]["jax"]
  for name in ("mlp", "cnn_pool"):
    histories = results["models"][name]["histories"]
    assert set(histories) == {"0", "1"} and all(len(history) == 1 for history in histories.values())
    assert results["models"][name]["seed_parallelism"] == "loop"
    assert (tmp_path / "runs" / name / "seed_1" / "checkpoints" / "best").is_dir()
    assert not list(out.rglob("checkpoints"))  # The report directory holds no checkpoints.
  assert results["models"]["cnn_pool"]["summary"]["best_val_accuracy"]["mean"] > 0.9
  mlp_best = [
    histories[0]["val_accuracy"] for histories in results["models"]["mlp"]["histories"].values()
  ]
  assert f"| mlp | {sum(mlp_best) / 2:.4f} ±" in report
  # Seed 0 of the comparison is the single-seed run: the same history.
  single = train.train_and_evaluate(
    _config_from(results["models"]["mlp"]["config"], seed=0, seeds=()),
    tmp_path / "single",
    print_fn=None,
  )
  assert single[0]["val_accuracy"] == results["models"]["mlp"]["histories"]["0"][0]["val_accuracy"]


def _config_from(saved, **overrides):
  config = default_config()
  config.update({key: value for key, value in saved.items() if key not in ("seeds",)})
  config.update(overrides)
  return config
