"""Data parallelism over a mesh and across processes, each in a subprocess: the device count is
fixed when JAX's backend starts (forced CPU devices, or jax.distributed)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import pytest
from conftest import REPO_ROOT
from test_train import TIMING_KEYS, small_config

from flax_mnist import checkpoint, data, evaluation, train

SCRIPT = str(REPO_ROOT / "scripts" / "train.py")


def _env(**extra: str) -> dict[str, str]:
  env = {key: value for key, value in os.environ.items() if key != "XLA_FLAGS"}
  env.update(extra)
  return env


def _train_args(idx_dir, workdir, model: str, *more: str) -> list[str]:
  return [
    sys.executable,
    SCRIPT,
    "--config",
    str(REPO_ROOT / "configs" / f"{model}.py"),
    "--workdir",
    str(workdir),
    f"--config.data_dir={idx_dir}",
    "--config.batch_size=64",
    "--config.eval_batch_size=32",
    "--config.progress_bar=False",
    *more,
  ]


def _close(got: list[dict], want: list[dict], rel: float) -> None:
  """Equal to float tolerance: losses within ``rel``; an accuracy within one image of 100 (the
  sharded sums reassociate, and early in cnn_pool_bn, with young BatchNorm moving statistics,
  that can move one test image across the decision boundary)."""
  assert len(got) == len(want)
  for got_record, want_record in zip(got, want):
    for key in want_record:
      if key in TIMING_KEYS:
        continue
      tolerance = {"abs": 0.011} if key.endswith("accuracy") else {"rel": rel, "abs": 1e-6}
      assert got_record[key] == pytest.approx(want_record[key], **tolerance), key


def test_four_devices_train_like_one_and_their_checkpoint_loads_on_one(idx_dir, tmp_path):
  # cnn_pool_bn: BatchNorm statistics and the masked last batch (300 = 4 x 64 + 44) must come out
  # global when each device holds a quarter of every batch.
  workdir = tmp_path / "four"
  flags = "--xla_force_host_platform_device_count=4"
  result = subprocess.run(
    _train_args(
      idx_dir, workdir, "cnn_pool_bn", "--config.num_epochs=2", "--config.data_devices=4"
    ),
    env=_env(XLA_FLAGS=flags),
    capture_output=True,
    text=True,
    cwd=REPO_ROOT,
  )
  assert result.returncode == 0, result.stderr[-3000:]
  run = json.loads((workdir / "run.json").read_text())
  assert run["mesh"] == {"seed": 1, "data": 4} and run["device_count"] == 4
  four = json.loads((workdir / "history.json").read_text())
  one = train.train_and_evaluate(
    small_config(idx_dir, model="cnn_pool_bn"), tmp_path / "one", print_fn=None
  )
  _close(four, one, rel=1e-4)
  # Written by 4 devices, loaded in this 1-device process: the recorded val accuracy again.
  model, info = checkpoint.load_model(workdir)
  test = data.load_mnist(idx_dir).test
  result = evaluation.evaluate_model(model, test.images, test.labels, batch_size=32)
  assert result["accuracy"] == info["val_accuracy"]


def test_a_batch_that_does_not_split_over_the_devices_is_refused(idx_dir, tmp_path):
  result = subprocess.run(
    _train_args(
      idx_dir, tmp_path / "run", "mlp", "--config.data_devices=4", "--config.batch_size=66"
    ),
    env=_env(XLA_FLAGS="--xla_force_host_platform_device_count=4"),
    capture_output=True,
    text=True,
    cwd=REPO_ROOT,
  )
  assert result.returncode == 2
  assert result.stderr.strip().splitlines()[-1] == (
    "error: config.batch_size 66 does not divide over 4 data devices: expected a multiple of 4"
  )
  assert "Traceback" not in result.stderr and not (tmp_path / "run").exists()


def _free_port() -> int:
  with socket.socket() as sock:
    sock.bind(("127.0.0.1", 0))
    return sock.getsockname()[1]


def test_two_processes_train_like_one(idx_dir, tmp_path):
  workdir = tmp_path / "two"
  port = _free_port()
  processes = [
    subprocess.Popen(
      _train_args(
        idx_dir,
        workdir,
        "mlp",
        "--config.num_epochs=1",
        "--distributed",
        f"--coordinator_address=127.0.0.1:{port}",
        "--num_processes=2",
        f"--process_id={index}",
      ),
      env=_env(JAX_NUM_CPU_DEVICES="2"),
      stdout=subprocess.PIPE,
      stderr=subprocess.PIPE,
      text=True,
      cwd=REPO_ROOT,
    )
    for index in range(2)
  ]
  outputs = [process.communicate(timeout=300) for process in processes]
  for process, (_, stderr) in zip(processes, outputs):
    assert process.returncode == 0, stderr[-3000:]
  assert "epoch   1/1" in outputs[0][0] and "epoch" not in outputs[1][0]  # Process 0 prints.
  run = json.loads((workdir / "run.json").read_text())
  assert run["process_count"] == 2 and run["device_count"] == 4
  assert run["mesh"] == {"seed": 1, "data": 4}
  two = json.loads((workdir / "history.json").read_text())
  one = train.train_and_evaluate(
    small_config(idx_dir, num_epochs=1), tmp_path / "one", print_fn=None
  )
  _close(two, one, rel=1e-4)


def test_vmapped_seeds_on_a_seed_by_data_mesh_equal_their_one_device_runs(idx_dir, tmp_path):
  # 2 seeds x 2 data devices: each seed's batches split over 'data', the seeds over 'seed'.
  workdir = tmp_path / "mesh"
  result = subprocess.run(
    _train_args(
      idx_dir,
      workdir,
      "cnn_pool_bn",
      "--config.num_epochs=2",
      "--config.num_seeds=2",
      "--config.seed_parallelism=vmap",
      "--config.dropout_rng_impl=threefry2x32",
      "--config.seed_devices=2",
      "--config.data_devices=2",
    ),
    env=_env(XLA_FLAGS="--xla_force_host_platform_device_count=4"),
    capture_output=True,
    text=True,
    cwd=REPO_ROOT,
  )
  assert result.returncode == 0, result.stderr[-3000:]
  for seed in (0, 1):
    run = json.loads((workdir / f"seed_{seed}" / "run.json").read_text())
    assert run["mesh"] == {"seed": 2, "data": 2}
    mesh = json.loads((workdir / f"seed_{seed}" / "history.json").read_text())
    one = train.train_and_evaluate(
      small_config(idx_dir, model="cnn_pool_bn", seed=seed, dropout_rng_impl="threefry2x32"),
      tmp_path / f"one_{seed}",
      print_fn=None,
    )
    for got, want in zip(mesh, one):
      for key in ("train_loss", "val_loss"):
        assert got[key] == pytest.approx(want[key], rel=1e-4), (seed, key)
