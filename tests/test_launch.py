"""The launch scripts in scripts/launch/: their dry runs print the exact commands; the TPU VM
script runs those same commands (through a stand-in gcloud) and deletes the VM even when training
fails; the SLURM script trains for real under a stand-in srun that starts two local processes with
SLURM's variables set, so jax.distributed's own SLURM detection joins them."""

from __future__ import annotations

import json
import os
import random
import shlex
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO_ROOT

pytestmark = pytest.mark.integration

TPU_VM = REPO_ROOT / "scripts" / "launch" / "tpu_vm.sh"
SLURM = REPO_ROOT / "scripts" / "launch" / "slurm.sbatch"
REPO_URL = "https://github.com/example/flax_mnist"

# A stand-in gcloud: logs its arguments as one shell line; fails where FAKE_GCLOUD_FAIL matches.
FAKE_GCLOUD = """\
import os, shlex, sys
line = shlex.join(["gcloud", *sys.argv[1:]])
with open(os.environ["FAKE_LOG"], "a") as log:
  log.write(line + "\\n")
fail = os.environ.get("FAKE_GCLOUD_FAIL")
sys.exit(1 if fail and fail in line else 0)
"""

# A stand-in srun: starts FAKE_SRUN_NTASKS copies of the command on this machine, each as task i
# of a one-task-per-node step (the variables jax._src.clusters.slurm_cluster reads, and more), and
# ends them all when one fails (--kill-on-bad-exit).
FAKE_SRUN = """\
import os, shlex, subprocess, sys, time
with open(os.environ["FAKE_LOG"], "a") as log:
  log.write(shlex.join(["srun", *sys.argv[1:]]) + "\\n")
command = sys.argv[1:]
while command[0].startswith("-"):
  command.pop(0)
ntasks = int(os.environ.get("FAKE_SRUN_NTASKS", "2"))
processes = []
for task in range(ntasks):
  env = dict(
    os.environ,
    SLURM_STEP_ID="0",
    SLURM_STEP_NODELIST=",".join(["127.0.0.1"] * ntasks),
    SLURM_STEP_NUM_NODES=str(ntasks),
    SLURM_STEP_NUM_TASKS=str(ntasks),
    SLURM_NTASKS=str(ntasks),
    SLURM_PROCID=str(task),
    SLURM_NODEID=str(task),
    SLURM_LOCALID="0",
  )
  processes.append(subprocess.Popen(command, env=env))
while any(process.poll() is None for process in processes):
  if any(process.poll() for process in processes):
    for process in processes:
      if process.poll() is None:
        process.kill()
  time.sleep(0.2)
sys.exit(max(abs(process.returncode) for process in processes))
"""


def _stand_in(directory: Path, name: str, source: str) -> None:
  directory.mkdir(exist_ok=True)
  path = directory / name
  path.write_text(f"#!{sys.executable}\n{source}")
  path.chmod(0o755)


def _env(**extra: str) -> dict[str, str]:
  """This environment less anything that would steer the scripts or JAX from outside."""
  env = {
    key: value
    for key, value in os.environ.items()
    if not key.startswith(("SLURM_", "JAX_")) and key not in ("XLA_FLAGS", "DRY_RUN")
  }
  env.update(extra)
  return env


def _run(command: list[str], env: dict[str, str], cwd: Path, timeout: int = 60):
  return subprocess.run(command, env=env, cwd=cwd, capture_output=True, text=True, timeout=timeout)


def _tpu_commands(**override: str) -> list[str]:
  """What tpu_vm.sh runs for the arguments of ``_tpu_args``."""
  where = ["--zone=europe-west4-a", "--project=proj"]
  train = [
    "python3",
    "scripts/train.py",
    "--config",
    "configs/cnn_pool.py",
    "--workdir",
    "gs://bucket/runs/cnn pool",
    "--distributed",
    "--config.num_epochs=3",
    "--config.seeds=(0, 1)",
  ]
  setup = (
    f"set -e; rm -rf flax_mnist; git clone -q {REPO_URL} flax_mnist && git -C flax_mnist "
    "checkout -q v1.0; cd flax_mnist; python3 -m pip install -q -U pip; python3 -m pip install -q "
    '-e ".[tpu]" gcsfs'
  )
  ssh = ["gcloud", "compute", "tpus", "tpu-vm", "ssh", "mnist-pod", *where, "--worker=all"]
  commands = [
    ["gcloud", "compute", "tpus", "tpu-vm", "create", "mnist-pod", *where]
    + ["--accelerator-type=v4-32", "--version=tpu-ubuntu2204-base"],
    [*ssh, "--command", setup],
    [*ssh, "--command", "cd flax_mnist && " + shlex.join(train)],
    ["mkdir", "-p", "results"],
    ["gcloud", "storage", "cp", "--recursive", "gs://bucket/runs/cnn pool", "results"],
    ["gcloud", "compute", "tpus", "tpu-vm", "delete", "mnist-pod", *where, "--quiet"],
  ]
  return [shlex.join(command) for command in commands]


def _tpu_args(*more: str) -> list[str]:
  return [
    "bash",
    str(TPU_VM),
    "--name",
    "mnist-pod",
    "--zone",
    "europe-west4-a",
    "--project",
    "proj",
    "--accelerator",
    "v4-32",
    "--repo",
    REPO_URL,
    "--ref",
    "v1.0",
    "--config",
    "configs/cnn_pool.py",
    "--workdir",
    "gs://bucket/runs/cnn pool",
    "--results",
    "results",
    *more,
    "--",
    "--config.num_epochs=3",
    "--config.seeds=(0, 1)",
  ]


def test_tpu_vm_dry_run_prints_the_exact_commands(tmp_path):
  _stand_in(tmp_path / "bin", "gcloud", "import sys\nsys.exit('gcloud called in a dry run')\n")
  env = _env(PATH=f"{tmp_path / 'bin'}{os.pathsep}{os.environ['PATH']}")
  result = _run(_tpu_args("--dry_run"), env, tmp_path)
  assert result.returncode == 0, result.stderr
  assert result.stdout.splitlines() == _tpu_commands()
  assert _run(_tpu_args(), {**env, "DRY_RUN": "1"}, tmp_path).stdout == result.stdout
  assert not (tmp_path / "results").exists()
  # Every worker (--worker=all) runs one train command: distributed, one config, one workdir.
  [train] = [line for line in result.stdout.splitlines() if "train.py" in line]
  remote = shlex.split(shlex.split(train)[-1])
  assert remote[remote.index("--workdir") + 1] == "gs://bucket/runs/cnn pool"
  assert remote[remote.index("--config") + 1] == "configs/cnn_pool.py"
  assert "--distributed" in remote and "--worker=all" in shlex.split(train)


def test_tpu_vm_runs_the_printed_commands_and_deletes_the_vm_when_training_fails(tmp_path):
  _stand_in(tmp_path / "bin", "gcloud", FAKE_GCLOUD)
  log = tmp_path / "gcloud.log"
  env = _env(PATH=f"{tmp_path / 'bin'}{os.pathsep}{os.environ['PATH']}", FAKE_LOG=str(log))
  result = _run(_tpu_args(), env, tmp_path)
  assert result.returncode == 0, result.stderr
  expected = [line for line in _tpu_commands() if not line.startswith("mkdir")]
  assert log.read_text().splitlines() == expected and (tmp_path / "results").is_dir()

  log.unlink()
  result = _run(_tpu_args(), {**env, "FAKE_GCLOUD_FAIL": "scripts/train.py"}, tmp_path)
  assert result.returncode == 1
  assert log.read_text().splitlines() == expected[:3] + expected[-1:]  # No fetch; deleted.


def test_tpu_vm_needs_a_repository_and_a_workdir(tmp_path):
  result = _run(["bash", str(TPU_VM), "--dry_run", "--repo", REPO_URL], _env(), tmp_path)
  assert result.returncode == 2 and result.stdout == ""
  assert result.stderr.splitlines()[0] == "error: --repo and --workdir are required"


def test_slurm_dry_run_prints_the_exact_commands(tmp_path):
  env = _env(DRY_RUN="1", CONFIG="configs/cnn.py", WORKDIR="/shared/runs/cnn")
  args = ["bash", str(SLURM), "--config.num_epochs=3", "--config.seeds=(0, 1)"]
  srun = (
    "srun --ntasks-per-node=1 --kill-on-bad-exit=1 python scripts/train.py --config "
    "configs/cnn.py --workdir /shared/runs/cnn --distributed --config.num_epochs=3 "
    "'--config.seeds=(0, 1)'"
  )
  result = _run(args, env, tmp_path)
  assert result.returncode == 0, result.stderr
  assert result.stdout.splitlines() == [f"cd {shlex.quote(str(REPO_ROOT))}", srun]
  # Inside a job: the repository is where sbatch ran; each process sees all of its node's GPUs.
  gpu_env = {**env, "SLURM_SUBMIT_DIR": str(REPO_ROOT), "SLURM_GPUS_ON_NODE": "4"}
  result = _run(args, gpu_env, tmp_path)
  assert result.stdout.splitlines() == [
    "export JAX_LOCAL_DEVICE_IDS=0,1,2,3",
    f"cd {shlex.quote(str(REPO_ROOT))}",
    srun,
  ]
  result = _run(args, {**env, "SLURM_SUBMIT_DIR": str(tmp_path)}, tmp_path)
  assert result.returncode == 2 and "submit from the repository root" in result.stderr
  result = _run(["bash", str(SLURM)], _env(DRY_RUN="1"), tmp_path)
  assert result.returncode != 0 and "set WORKDIR" in result.stderr


def _free_port_in(low: int, high: int) -> int:
  """A port in [low, high] nothing listens on."""
  for port in random.sample(range(low, high + 1), 50):
    with socket.socket() as sock:
      try:
        sock.bind(("0.0.0.0", port))
      except OSError:
        continue
      return port
  raise RuntimeError(f"no free port in {low}-{high}")


def test_slurm_script_trains_two_processes_found_by_jax_slurm_detection(idx_dir, tmp_path):
  _stand_in(tmp_path / "bin", "srun", FAKE_SRUN)
  # jax derives the coordinator port from the job id: SLURM_JOB_ID % 4096 + 61440.
  port = _free_port_in(61440, 65535)
  workdir = tmp_path / "run"
  env = _env(
    PATH=f"{tmp_path / 'bin'}{os.pathsep}{os.environ['PATH']}",
    FAKE_LOG=str(tmp_path / "srun.log"),
    SLURM_JOB_ID=str(4096 * 1000 + port - 61440),  # What sbatch sets in the batch script.
    SLURM_SUBMIT_DIR=str(REPO_ROOT),
    CONFIG="configs/mlp.py",
    WORKDIR=str(workdir),
    PYTHON=sys.executable,
    JAX_NUM_CPU_DEVICES="2",
  )
  overrides = [
    f"--config.data_dir={idx_dir}",
    "--config.num_epochs=1",
    "--config.batch_size=64",
    "--config.eval_batch_size=32",
  ]
  result = _run(["bash", str(SLURM), *overrides], env, tmp_path, timeout=300)
  assert result.returncode == 0, result.stderr[-3000:]
  assert (tmp_path / "srun.log").read_text().splitlines() == [
    shlex.join(
      ["srun", "--ntasks-per-node=1", "--kill-on-bad-exit=1", sys.executable, "scripts/train.py"]
      + ["--config", "configs/mlp.py", "--workdir", str(workdir), "--distributed", *overrides]
    )
  ]
  assert result.stdout.count("epoch   1/1") == 1  # Process 0 alone prints.
  run = json.loads((workdir / "run.json").read_text())
  assert run["process_count"] == 2 and run["device_count"] == 4
  assert run["mesh"] == {"seed": 1, "data": 4}
  assert [record["epoch"] for record in json.loads((workdir / "history.json").read_text())] == [1]
