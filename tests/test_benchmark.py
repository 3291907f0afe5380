"""Tests for flax_mnist.benchmark and scripts/benchmark.py: FLOP counts, tables, a tiny real run."""

from __future__ import annotations

import json

import pytest
from conftest import run_script
from flax import nnx

from flax_mnist import FlaxMnistError, benchmark, models


def test_layer_flops_of_the_cnn_follow_the_formulas():
  flops = dict(models.layer_flops(models.create_model("cnn", rngs=nnx.Rngs(0))))
  assert flops["conv2d"] == 2 * 3 * 3 * 1 * 8 * 26 * 26
  assert flops["conv2d_1"] == 2 * 3 * 3 * 8 * 16 * 24 * 24
  assert flops["dense"] == 2 * 9216 * 128 and flops["dense_2"] == 2 * 32 * 10
  assert flops["flatten"] == 0 and flops["dropout"] == 0
  train_flops, forward_flops = models.training_flops(models.create_model("cnn", rngs=nnx.Rngs(0)))
  assert forward_flops == sum(flops.values()) == 3_792_576
  assert (
    train_flops == 3 * forward_flops - flops["conv2d"]
  )  # No input gradient for the first layer.


def test_epoch_flops_count_train_and_eval_images():
  counts = benchmark.epoch_flops("mlp")
  assert counts["train_flops"] == 60_000 * counts["train_flops_per_image"]
  assert counts["eval_flops"] == 10_000 * counts["forward_flops_per_image"] == 10_000 * 209_536


def test_markdown_shows_the_keras_ratio_when_there_is_a_baseline():
  row = {
    "compile_seconds": 2.0,
    "epoch_seconds": 3.0,
    "train_seconds": 2.8,
    "eval_seconds": 0.2,
    "train_images_per_second": 21_000.0,
    "gflops_per_second": 30.0,
    "fraction_of_matmul_peak": 0.15,
    "peak_host_memory_mb": 900.0,
    "best_val_accuracy": 0.98,
    "ratio_to_keras": 1.5,
    "impl": "s2d",
    "compute_dtype": "float32",
  }
  environment = {
    "platform": "cpu",
    "cpu": "Test CPU",
    "cpu_count": 2,
    "device_count": 1,
    "device_kind": "cpu",
    "versions": {"jax": "0", "flax": "0"},
  }
  result = {
    "environment": environment,
    "matmul_peak_gflops": 200.0,
    "epochs": 3,
    "models": {"cnn_pool": row},
    "baseline": {
      "environment": {"keras": "3", "tensorflow": "2", "intra_op_threads": 2},
      "models": {"cnn_pool": {"epoch_seconds": 2.0}},
    },
  }
  text = benchmark.to_markdown(result)
  assert "| cnn_pool | 2.0 | 3.00 |" in text and "| 2.00 | 1.50x |" in text
  assert "| cnn_pool | conv2d_1 | 0.279 |" in text
  assert "impl and compute dtype: s2d, float32." in text
  assert (
    "CPU: Test CPU, 2 cores" in text and "f32 matmul peak measured in this run: 200 GFLOP/s" in text
  )  # 2*9*8*16*11*11 FLOPs per image.


@pytest.mark.integration
def test_tiny_benchmark_run_writes_json_and_tables(real_data_dir, tmp_path):
  out = tmp_path / "bench.json"
  result = run_script(
    "benchmark.py",
    "--models",
    "mlp",
    "--epochs",
    "1",
    "--json",
    str(out),
    "--data_dir",
    str(real_data_dir),
    "--seeds",
    "2",
  )
  assert result.returncode == 0, result.stderr[-3000:]
  assert "| mlp |" in result.stdout and "forward MFLOP / image" in result.stdout
  report = json.loads(out.read_text())
  mlp = report["models"]["mlp"]
  assert report["matmul_peak_gflops"] > 1 and report["environment"]["platform"] == "cpu"
  assert (
    mlp["compile_seconds"] > 0 and mlp["epoch_seconds"] > 0 and mlp["train_images_per_second"] > 0
  )
  assert 0 < mlp["fraction_of_matmul_peak"] < 1 and mlp["peak_host_memory_mb"] > 100
  assert mlp["best_val_accuracy"] > 0.85 and len(mlp["epoch_seconds_all"]) == 1
  seeds = mlp["seeds"]  # Two seeds in a loop on CPU, compiled once.
  assert (
    seeds["num_seeds"] == 2
    and seeds["seed_parallelism"] == "loop"
    and seeds["dropout_rng_impl"] == "rbg"
  )
  # Its value is a timing (read in the benchmark's output, not asserted): here only its presence.
  assert seeds["ratio_to_one_seed"] > 0 and seeds["compile_seconds"] > 0
  assert "| mlp | 2 | loop | rbg |" in result.stdout


def test_keras_baseline_needs_an_idx_directory(monkeypatch):
  monkeypatch.delenv("FLAX_MNIST_DATA_DIR", raising=False)
  with pytest.raises(FlaxMnistError, match="the Keras baseline reads IDX files: pass --data_dir"):
    benchmark.run_keras(["mlp"], 1, None, "python3")
