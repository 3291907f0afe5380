"""Data parallelism over a mesh and across processes, each in a subprocess: the device count is
fixed when JAX's backend starts (forced CPU devices, or jax.distributed)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import numpy as np
import pytest
from conftest import REPO_ROOT, small_config

from flax_mnist import checkpoint, data, evaluation, models, train
from flax_mnist.config import resolve_impl

pytestmark = pytest.mark.integration

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


# What a data-parallel run must share with its one-device run, and how closely, measured on the
# 2-core AMD EPYC VM here with cnn_pool_bn on these 300 images for 2 epochs (10 Adam steps): 1, 2
# and 4 data devices, the 2 x 2 seed-by-data mesh and vmapped seeds against single-seed runs, and,
# as the same reassociation in another form, the im2col and batch_minor impls against s2d; at jax
# 0.10.2 and at the floor stack (.ci/floor-constraints.txt, jax 0.7.2). A real change for scale:
# other dropout masks (threefry2x32 for rbg) move the train losses by 6-16%, the parameters by
# 1.03 and the BatchNorm statistics by 0.15 of their movement.
#
# Train losses, per epoch: within 3.1e-6 (jax 0.10.2) and 2.4e-5 (jax 0.7.2, the mesh) relative.
TRAIN_LOSS_REL = 2e-4
# Train accuracies: equal in every run; one image of 300 is what a logit tie within that spread
# could flip.
TRAIN_ACCURACY_ABS = 1.01 / 300
# The latest parameters, as ||got - want|| / ||want - init||, the fraction of the way training
# moved them: within 5.6e-3 across device counts and 7.8e-3 across impls (jax 0.7.2; 3.8e-3 and
# 5.9e-3 at jax 0.10.2). Nearly all of it is conv2d/bias: ReLU, max-pool and BatchNorm all but
# cancel its gradient, rounding sets its sign and Adam steps ~lr either way (0.5-1.0 of its own
# movement); every other parameter array agrees to 2.8e-3 of its norm. An elementwise comparison
# would test that noise.
PARAMS_DRIFT = 3e-2
# BatchNorm's moving statistics, alike: within 3.1e-4 across device counts, 4.5e-4 across impls.
BATCH_STATS_DRIFT = 2e-3
# Val metrics are not compared: eval-mode BatchNorm on 10 steps' moving statistics (the first
# layer's mean tracks that noisy bias) turns these differences into val losses 1.4e-4 apart and
# val accuracies of 0.29, 0.30 and 0.31 (0.29 vs 0.31 on an Intel AVX-512 VM). That a sharded
# evaluation counts every image is the checkpoint check below: one device, the same parameters,
# exactly the recorded accuracy.


def _assert_trains_like(got: list[dict], want: list[dict]) -> None:
  """The same train losses and accuracies, epoch by epoch, to the measured spread above."""
  assert [record["epoch"] for record in got] == [record["epoch"] for record in want]
  for got_record, want_record in zip(got, want):
    epoch = want_record["epoch"]
    assert got_record["train_loss"] == pytest.approx(
      want_record["train_loss"], rel=TRAIN_LOSS_REL
    ), epoch
    assert got_record["train_accuracy"] == pytest.approx(
      want_record["train_accuracy"], abs=TRAIN_ACCURACY_ABS
    ), epoch


def _latest_arrays(workdir) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray], dict]:
  """The latest checkpoint's parameters and BatchNorm statistics by name, and its metadata."""
  model, info = checkpoint.load_model(workdir, "latest")
  as_numpy = lambda arrays: {name: np.asarray(value) for name, value in arrays.items()}
  return as_numpy(models.named_params(model)), as_numpy(models.named_batch_stats(model)), info


def _drift(got: dict[str, np.ndarray], want: dict[str, np.ndarray], init: dict) -> float:
  """||got - want|| / ||want - init|| over all the arrays together."""
  apart = sum(float(np.sum((got[name] - want[name]) ** 2)) for name in want)
  moved = sum(float(np.sum((want[name] - init[name]) ** 2)) for name in want)
  return (apart / moved) ** 0.5


def _assert_same_state(workdir, reference_workdir) -> None:
  """The latest parameters and BatchNorm statistics of two runs from the same seed agree to the
  measured spread above, as a fraction of how far training moved the reference's."""
  params, stats, info = _latest_arrays(workdir)
  want_params, want_stats, want_info = _latest_arrays(reference_workdir)
  assert info["epoch"] == want_info["epoch"]
  config = want_info["config"]
  initial = models.init_model(
    config["model"],
    config["seed"],
    impl=resolve_impl("auto"),
    dropout_rng_impl=config["dropout_rng_impl"],
  )
  params_drift = _drift(params, want_params, models.named_params(initial))
  assert params_drift < PARAMS_DRIFT
  if want_stats:
    stats_drift = _drift(stats, want_stats, models.named_batch_stats(initial))
    assert stats_drift < BATCH_STATS_DRIFT


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
  _assert_trains_like(four, one)
  _assert_same_state(workdir, tmp_path / "one")
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
  _assert_trains_like(two, one)
  _assert_same_state(workdir, tmp_path / "one")


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
    _assert_trains_like(mesh, one)
    _assert_same_state(workdir / f"seed_{seed}", tmp_path / f"one_{seed}")
