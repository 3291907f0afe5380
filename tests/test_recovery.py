"""Saved state stays consistent: history with its checkpoint, the workdir lock, damaged
checkpoints detected (and the intact one used), refused resumes that touch nothing."""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time

import pytest
from conftest import REPO_ROOT, small_config, without_timing

from flax_mnist import checkpoint, train, workdir
from flax_mnist.errors import CheckpointError, RunError, WorkdirError


@pytest.mark.integration  # Several epochs of several runs: too slow for the fast tier.
def test_a_failed_history_write_leaves_no_gap_on_resume(idx_dir, tmp_path, monkeypatch):
  straight = train.train_and_evaluate(
    small_config(idx_dir, num_epochs=3), tmp_path / "a", print_fn=None
  )
  write_json = workdir.write_json

  def disk_full_at_epoch_2(path, value):
    if str(path).endswith(workdir.HISTORY_FILE) and len(value) == 2:
      raise OSError(28, "No space left on device")
    write_json(path, value)

  monkeypatch.setattr(workdir, "write_json", disk_full_at_epoch_2)
  run = tmp_path / "b"
  with pytest.raises(
    RunError,
    match=r"history.json: could not be written \(No space left on "
    r"device\); epoch 2 is checkpointed",
  ):
    train.train_and_evaluate(small_config(idx_dir, num_epochs=3), run, print_fn=None)
  monkeypatch.setattr(workdir, "write_json", write_json)
  assert [r["epoch"] for r in json.loads((run / "history.json").read_text())] == [1]
  lines = []
  resumed = train.train_and_evaluate(
    small_config(idx_dir, num_epochs=3), run, print_fn=lines.append
  )
  assert any("rebuilt" in line and "history.json from the checkpoint" in line for line in lines)
  assert without_timing(resumed) == without_timing(straight)  # Epochs 1, 2, 3: no hole.
  assert without_timing(json.loads((run / "history.json").read_text())) == without_timing(straight)
  # A deleted history.json (as a damaged one's error advises) is rebuilt the same way.
  (run / "history.json").unlink()
  again = train.train_and_evaluate(small_config(idx_dir, num_epochs=4), run, print_fn=None)
  assert [r["epoch"] for r in again] == [1, 2, 3, 4]


@pytest.mark.integration
def test_a_second_run_on_a_workdir_is_refused_and_a_killed_run_leaves_no_stale_lock(tmp_path):
  holder = subprocess.Popen(
    [
      sys.executable,
      "-c",
      "import sys, time; from flax_mnist import workdir\n"
      f"with workdir.lock({str(tmp_path)!r}):\n  print('held', flush=True); time.sleep(60)",
    ],
    stdout=subprocess.PIPE,
    text=True,
  )
  assert holder.stdout.readline().strip() == "held"
  with pytest.raises(WorkdirError, match=rf"another run \(pid {holder.pid} on .*\) is training"):
    with workdir.lock(tmp_path):
      pass
  holder.send_signal(signal.SIGKILL)
  holder.wait()
  with workdir.lock(tmp_path):  # The kernel dropped the dead process's lock.
    pass


def _trained(idx_dir, path, epochs=2, **overrides):
  train.train_and_evaluate(
    small_config(idx_dir, num_epochs=epochs, **overrides), path, print_fn=None
  )
  return path


def _tamper_checksum(step_dir):
  """Damaged params, as a flipped bit would leave them: their checksum no longer matches (the
  meta stays sealed, so only the arrays' check can catch it)."""
  meta = step_dir / "meta" / "metadata"
  record = json.loads(meta.read_text())
  record["checksums"]["params"] ^= 1
  record[checkpoint.META_CHECKSUM] = checkpoint.meta_checksum(record)
  meta.write_text(json.dumps(record))


def test_one_changed_digit_of_a_recorded_metric_is_named_and_never_picks_the_best(
  idx_dir, tmp_path
):
  run = _trained(idx_dir, tmp_path / "run", epochs=2, learning_rate=1e-12)  # Best stays 1.
  meta = run / "checkpoints" / "best" / "1" / "meta" / "metadata"
  text = meta.read_text()
  value = json.loads(text)["val_accuracy"]
  forged = text.replace(f'"val_accuracy": {value}', f'"val_accuracy": {value + 0.5}', 1)
  assert forged != text
  meta.write_text(forged)
  damaged = r"best/1: damaged: its meta does not match the checksum saved with it"
  with pytest.raises(CheckpointError, match=damaged):
    checkpoint.load_model(run, fallback=False)
  with pytest.raises(CheckpointError, match=damaged):  # A resume reads the best value first.
    _trained(idx_dir, run, epochs=3, learning_rate=1e-12)
  without_config = {key: v for key, v in json.loads(text).items() if key != "config"}
  without_config[checkpoint.META_CHECKSUM] = checkpoint.meta_checksum(without_config)  # Resealed.
  for shape, problem in (
    ("[]", "its meta is a JSON list, expected an object"),
    ('{"epoch": 1}', "its meta's val_accuracy is None, expected a number"),
    (json.dumps(without_config), "its meta has no config (an object)"),
  ):
    meta.write_text(shape)
    with pytest.raises(CheckpointError, match=re.escape(f"best/1: damaged: {problem}")):
      checkpoint.load_model(run, fallback=False)


def test_a_damaged_checkpoint_is_named_and_the_intact_one_is_loaded(idx_dir, tmp_path):
  run = _trained(idx_dir, tmp_path / "run", epochs=2, learning_rate=1e-12)  # Best stays 1.
  best_dir = run / "checkpoints" / "best" / "1"
  assert best_dir.is_dir() and (run / "checkpoints" / "latest" / "2").is_dir()
  _tamper_checksum(best_dir)
  with pytest.raises(CheckpointError, match=r"best/1: damaged: its params do not match"):
    checkpoint.load_model(run, fallback=False)
  model, info = checkpoint.load_model(run)
  assert info["epoch"] == 2 and "loaded the latest checkpoint (epoch 2) instead" in info["fallback"]
  # Bytes of an array file flipped: orbax cannot read it, or the checksum catches it.
  latest_dir = run / "checkpoints" / "latest" / "2"
  for data_file in (latest_dir / "state").rglob("*"):
    if data_file.is_file() and data_file.stat().st_size > 1000:
      raw = bytearray(data_file.read_bytes())
      raw[200:264] = bytes(b ^ 0xFF for b in raw[200:264])
      data_file.write_bytes(bytes(raw))
  with pytest.raises(CheckpointError, match=r"latest/2.*(damaged|cannot be restored)"):
    checkpoint.load_model(run, "latest", fallback=False)
  with pytest.raises(CheckpointError, match=r"cannot be restored either: retrain"):
    checkpoint.load_model(run, "latest")


def _resume(idx_dir):
  return small_config(idx_dir, num_epochs=3, learning_rate=1e-12)


def test_a_damaged_latest_checkpoint_refuses_to_resume_until_moved_then_resumes_from_best(
  idx_dir, tmp_path
):
  run = _trained(idx_dir, tmp_path / "run", epochs=2, learning_rate=1e-12)
  before = (run / "history.json").read_bytes()
  _tamper_checksum(run / "checkpoints" / "latest" / "2")
  with pytest.raises(
    CheckpointError,
    match=r"latest/2: damaged.*; move .*latest/2 away to resume "
    r"from .*best/1",
  ):
    train.train_and_evaluate(_resume(idx_dir), run, print_fn=None)
  assert (run / "history.json").read_bytes() == before  # A refused resume touches nothing.
  shutil.move(run / "checkpoints" / "latest" / "2", tmp_path / "damaged_latest_2")
  lines = []
  records = train.train_and_evaluate(_resume(idx_dir), run, print_fn=lines.append)
  assert any("resumed from" in line and "best/1 at epoch 1" in line for line in lines)
  assert [r["epoch"] for r in records] == [1, 2, 3]


def test_nothing_to_train_says_so_and_writes_nothing(idx_dir, tmp_path):
  run = _trained(idx_dir, tmp_path / "run", epochs=1)
  files = {path: path.read_bytes() for path in run.glob("*.json")}
  lines = []
  train.train_and_evaluate(small_config(idx_dir, num_epochs=1), run, print_fn=lines.append)
  assert any(
    line.startswith("nothing to train:") and "raise --config.num_epochs" in line for line in lines
  )
  assert {path: path.read_bytes() for path in run.glob("*.json")} == files


def test_a_finite_divergence_ends_with_a_warning(idx_dir, tmp_path):
  lines = []
  train.train_and_evaluate(
    small_config(idx_dir, num_epochs=1, learning_rate=50.0), tmp_path, print_fn=lines.append
  )
  assert any("is near chance (0.1)" in line for line in lines), lines[-3:]


@pytest.mark.integration
@pytest.mark.parametrize("signum, exit_code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_a_signal_saves_the_finished_epochs_and_says_how_to_resume(
  signum, exit_code, idx_dir, tmp_path
):
  process = subprocess.Popen(
    [
      sys.executable,
      str(REPO_ROOT / "scripts" / "train.py"),
      "--config",
      str(REPO_ROOT / "configs" / "cnn_pool.py"),
      "--workdir",
      str(tmp_path / "run"),
      f"--config.data_dir={idx_dir}",
      "--config.num_epochs=500",
      "--config.batch_size=64",
      "--config.eval_batch_size=50",
      "--config.progress_bar=False",
    ],
    stdout=subprocess.PIPE,
    stderr=subprocess.PIPE,
    text=True,
    cwd=REPO_ROOT,
  )
  for line in process.stdout:
    if line.startswith("epoch   2/500"):
      break
  process.send_signal(signum)
  started = time.monotonic()
  _, stderr = process.communicate(timeout=120)
  assert process.returncode == exit_code and time.monotonic() - started < 60
  assert "Traceback" not in stderr
  last = stderr.strip().splitlines()[-1]
  assert last.startswith("interrupted at epoch ") and "rerun the same command to resume" in last
  history = json.loads((tmp_path / "run" / "history.json").read_text())
  saved = int(last.split("epoch ")[2].split(" is saved")[0])
  assert saved >= 2 and [r["epoch"] for r in history] == list(range(1, saved + 1))


def _script(name, *args):
  return subprocess.run(
    [sys.executable, str(REPO_ROOT / "scripts" / name), *map(str, args)],
    capture_output=True,
    text=True,
    cwd=REPO_ROOT,
  )


@pytest.mark.integration
def test_the_cli_refuses_a_locked_workdir_and_evaluates_around_a_damaged_checkpoint(
  idx_dir, tmp_path
):
  run = _trained(idx_dir, tmp_path / "run", epochs=2, learning_rate=1e-12)
  saved = {path: path.read_bytes() for path in run.rglob("*") if path.is_file()}
  with workdir.lock(run):
    result = _script(
      "train.py",
      "--config",
      REPO_ROOT / "configs" / "mlp.py",
      "--workdir",
      run,
      f"--config.data_dir={idx_dir}",
      "--config.num_epochs=3",
      "--config.batch_size=64",
      "--config.eval_batch_size=32",
      "--config.learning_rate=1e-12",
    )
  assert result.returncode == 2 and "Traceback" not in result.stderr
  assert "another run (pid" in result.stderr.strip().splitlines()[-1]
  assert {path: path.read_bytes() for path in run.rglob("*") if path.is_file()} == saved
  _tamper_checksum(run / "checkpoints" / "best" / "1")
  result = _script("evaluate.py", "--workdir", run, "--data_dir", idx_dir, "--json")
  assert result.returncode == 0, result.stderr[-2000:]
  assert "warning:" in result.stderr and "loaded the latest checkpoint (epoch 2)" in result.stderr
  assert json.loads(result.stdout.strip().splitlines()[-1])["epoch"] == 2


def test_a_reshaped_history_json_is_rebuilt_from_the_checkpoint_on_resume(idx_dir, tmp_path):
  run = _trained(idx_dir, tmp_path / "run", epochs=1)
  (run / "history.json").write_text('{"epoch": 1}')  # Valid JSON, not a history.
  lines = []
  records = train.train_and_evaluate(
    small_config(idx_dir, num_epochs=2), run, print_fn=lines.append
  )
  assert [record["epoch"] for record in records] == [1, 2]
  assert any(line.startswith(f"rebuilt {run / 'history.json'}") for line in lines)
  assert json.loads((run / "history.json").read_text()) == records


def _in_a_full_disk(script: str) -> list[str]:
  """``bash -c script`` in a private mount namespace, where ``$FULL`` is a 3 MB tmpfs (the test
  runs as root in CI; elsewhere a user namespace maps the caller to root for the mount)."""
  namespace = ["unshare", "--mount"] if os.geteuid() == 0 else ["unshare", "-r", "--mount"]
  return [
    *namespace,
    "bash",
    "-c",
    f'FULL=$(mktemp -d) && mount -t tmpfs -o size=3m tmpfs "$FULL" && {script}',
  ]


@pytest.mark.integration
def test_a_full_disk_is_one_line_and_the_saved_epoch_resumes(idx_dir, tmp_path):
  # mlp's checkpoint is 1.3 MiB (params and two Adam moments), best and latest each: the
  # 3 MB disk has no room for epoch 2's, which is refused before a byte is written.
  args = [
    sys.executable,
    str(REPO_ROOT / "scripts" / "train.py"),
    "--config",
    str(REPO_ROOT / "configs" / "mlp.py"),
    f"--config.data_dir={idx_dir}",
    "--config.batch_size=64",
    "--config.eval_batch_size=32",
    "--config.num_epochs=4",
    "--config.progress_bar=False",
  ]
  train_into_full = " ".join(map(shlex.quote, args)) + ' --workdir "$FULL/run"'
  saved = tmp_path / "saved"
  script = (
    f'{train_into_full}; status=$?; cp -a "$FULL/run" {shlex.quote(str(saved))}; exit $status'
  )
  result = subprocess.run(
    _in_a_full_disk(script), capture_output=True, text=True, cwd=REPO_ROOT, timeout=300
  )
  lines = result.stderr.strip().splitlines()
  assert result.returncode == 1, result.stderr[-3000:]
  assert "Traceback" not in result.stderr and len(lines) == 1, result.stderr[-3000:]
  assert re.fullmatch(
    r"error: /tmp/\S+/run/checkpoints/best: no room for the next checkpoint \(1.3 MiB needed, "
    r"0.\d MiB free\); epoch 1 is saved: free space and rerun the same command to resume",
    lines[0],
  ), lines
  # The saved epoch, copied where there is room, resumes to what an uninterrupted run gives.
  resumed = subprocess.run(
    [*args, "--workdir", str(saved)], capture_output=True, text=True, cwd=REPO_ROOT, timeout=300
  )
  assert resumed.returncode == 0, resumed.stderr[-3000:]
  straight = train.train_and_evaluate(
    small_config(idx_dir, num_epochs=4), tmp_path / "straight", print_fn=None
  )
  assert without_timing(json.loads((saved / "history.json").read_text())) == without_timing(
    straight
  )
