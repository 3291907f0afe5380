"""The scripts' shared preamble (``scripts/_cli``) and train.py's --distributed, as a user runs
them: every failure one line, the right exit status, no traceback, and bounded in time (issue 16:
long paths, config files that exit or take an argument, processes that are missing, duplicated,
misconfigured, killed or sent SIGTERM while they wait for each other)."""

from __future__ import annotations

import itertools
import os
import queue
import re
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import pytest
from conftest import REPO_ROOT, small_config, write_mnist_dir

from flax_mnist import train

pytestmark = pytest.mark.integration

SCRIPTS = REPO_ROOT / "scripts"
MLP = str(REPO_ROOT / "configs" / "mlp.py")
LONG_NAME = "n" * 300  # Over the 255 bytes of a file name on Linux file systems.
TIMEOUT = 20  # --distributed_timeout in these tests: a silent process counts as dead after 10 s.


def _env(**extra: str) -> dict[str, str]:
  env = {
    key: value
    for key, value in os.environ.items()
    if key != "XLA_FLAGS" and not key.startswith("FLAX_MNIST_")
  }
  env.update(extra)
  return env


def _run(script: str, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
  return subprocess.run(
    [sys.executable, str(SCRIPTS / script), *map(str, args)],
    capture_output=True,
    text=True,
    env=_env(),
    cwd=REPO_ROOT,
    timeout=timeout,
  )


def _last_line(stderr: str) -> str:
  lines = stderr.strip().splitlines()
  return lines[-1] if lines else ""


def _assert_one_line(result, status: int, pattern: str) -> None:
  """Exit ``status``, the last stderr line matching ``pattern`` (a regex), no traceback."""
  report = f"exit {result.returncode}, stderr:\n{result.stderr[-3000:]}"
  assert result.returncode == status, report
  assert re.fullmatch(pattern, _last_line(result.stderr)), report
  assert "Traceback" not in result.stderr, report


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> dict[str, Path]:
  """A trained tiny workdir (1 epoch of mlp) and its data."""
  root = tmp_path_factory.mktemp("cli")
  data = write_mnist_dir(root / "idx")
  train.train_and_evaluate(small_config(data, num_epochs=1), root / "run", print_fn=None)
  return {"root": root, "data": data, "run": root / "run"}


# Long paths: bad input (exit 2), one line naming the part that is too long.


def test_a_report_dir_with_a_name_over_255_bytes_is_refused_in_one_line(trained):
  report_dir = trained["root"] / LONG_NAME / "report"
  result = _run(
    "evaluate.py", "--workdir", trained["run"], "--report", "--report_dir", report_dir,
    "--data_dir", trained["data"],
  )  # fmt: skip
  _assert_one_line(
    result,
    2,
    re.escape(
      f"error: {report_dir}: cannot write there (File name too long: a name of 300 bytes, the "
      "file system takes at most 255); pass --report_dir with a writable directory"
    ),
  )


def test_an_out_dir_with_a_path_over_4096_bytes_is_refused_in_one_line(trained):
  out = trained["root"].joinpath(*["p" * 200] * 25)
  result = _run("results_table.py", "--workdirs", trained["run"], "--out", out)
  _assert_one_line(
    result,
    2,
    re.escape(f"error: {out}: cannot write there (File name too long: a path of ")
    + r"\d+ bytes, the file system takes at most 4096\); pass --out with a writable directory",
  )


def test_a_workdir_with_a_name_over_255_bytes_is_refused_in_one_line(tmp_path, idx_dir):
  workdir = tmp_path / LONG_NAME
  result = _run("train.py", "--config", MLP, "--workdir", workdir, f"--config.data_dir={idx_dir}")
  _assert_one_line(result, 2, re.escape(f"error: {workdir}: ") + r".*File name too long.*")


# Config files that exit, raise KeyboardInterrupt, or are given a get_config argument.

CONFIG_FILES = {
  "exits_on_import.py": "import sys\n\nsys.exit(0)\n",
  "exits_in_get_config.py": "def get_config():\n  raise SystemExit(3)\n",
  "interrupts_in_get_config.py": "def get_config():\n  raise KeyboardInterrupt\n",
  "takes_an_argument.py": "def get_config(arg):\n  raise ValueError(f'got {arg}')\n",
}
EXPECTED = "expected get_config() to return a ConfigDict"
CONFIG_CASES = [
  (
    "exits_on_import.py",
    "error: {path}: loading it raised SystemExit(0): a config file must not exit; " + EXPECTED,
  ),
  (
    "exits_in_get_config.py",
    "error: {path}: loading it raised SystemExit(3): a config file must not exit; " + EXPECTED,
  ),
  (
    "interrupts_in_get_config.py",
    "error: {path}: loading it raised KeyboardInterrupt; " + EXPECTED,
  ),
  ("takes_an_argument.py:7", "error: {path}: get_config('7') raised ValueError: got 7"),
  (
    f"{MLP}:arg",
    f"error: --config={MLP}:arg: ml_collections passes 'arg' to get_config(), which cannot take "
    "it (get_config() takes 0 positional arguments but 1 was given); expected "
    f"--config={MLP}, with fields set as --config.<field>=value",
  ),
]


@pytest.mark.parametrize(
  ("config", "line"), CONFIG_CASES, ids=[case[0].rsplit("/")[-1] for case in CONFIG_CASES]
)
def test_a_config_file_that_exits_or_refuses_its_argument_is_one_line_and_trains_nothing(
  tmp_path, config, line
):
  for name, text in CONFIG_FILES.items():
    (tmp_path / name).write_text(text)
  value = config if config.startswith("/") else str(tmp_path / config)
  workdir = tmp_path / "run"
  result = _run("train.py", f"--config={value}", "--workdir", workdir)
  _assert_one_line(result, 2, re.escape(line.format(path=value.partition(":")[0])))
  assert not workdir.exists()


def test_a_config_file_runs_once_per_command(tmp_path):
  runs = tmp_path / "runs.txt"
  config = tmp_path / "counted.py"
  config.write_text(
    "import pathlib\n\nfrom flax_mnist.config import default_config\n\n\n"
    "def get_config():\n"
    f"  with pathlib.Path({str(runs)!r}).open('a') as file:\n"
    "    file.write('run\\n')\n"
    "  return default_config()\n"
  )
  # An unknown model is refused after the flags are parsed, before anything is trained.
  result = _run("train.py", f"--config={config}", "--workdir", tmp_path / "w", "--config.model=vgg")
  _assert_one_line(result, 2, r"error: config.model 'vgg': .*")
  assert runs.read_text() == "run\n"  # Once (it ran twice before: once to check, once in absl).


def test_ctrl_c_while_a_config_file_loads_is_an_interruption_not_a_config_error(tmp_path):
  started = tmp_path / "started"
  config = tmp_path / "slow.py"
  config.write_text(
    f"import pathlib, time\n\npathlib.Path({str(started)!r}).touch()\ntime.sleep(60)\n"
  )
  process = subprocess.Popen(
    [sys.executable, str(SCRIPTS / "train.py"), f"--config={config}", "--workdir", tmp_path / "r"],
    stdout=subprocess.PIPE,
    stderr=subprocess.PIPE,
    text=True,
    env=_env(),
    cwd=REPO_ROOT,
  )
  try:
    _wait_for(started.exists, 60, process)
    process.send_signal(signal.SIGINT)
    _, stderr = process.communicate(timeout=30)
  finally:
    process.kill()
  assert process.returncode == 130, stderr
  assert _last_line(stderr) == "interrupted" and "Traceback" not in stderr, stderr


# --distributed: what can be checked before connecting is bad input (exit 2).


@pytest.mark.parametrize(
  ("flags", "line"),
  [
    (
      ("--coordinator_address=127.0.0.1", "--num_processes=2", "--process_id=0"),
      "error: --coordinator_address=127.0.0.1: expected host:port of process 0, such as "
      "10.0.0.1:1234",
    ),
    (
      ("--coordinator_address=127.0.0.1:1234", "--num_processes=2", "--process_id=2"),
      "error: --process_id=2: out of range, expected 0..1 for --num_processes=2",
    ),
    (
      ("--coordinator_address=127.0.0.1:1234", "--num_processes=0", "--process_id=0"),
      "error: --num_processes=0: expected at least 1",
    ),
  ],
  ids=["address-without-port", "process-id-out-of-range", "no-processes"],
)
def test_distributed_flags_out_of_range_are_refused_before_connecting(tmp_path, flags, line):
  start = time.monotonic()
  result = _run("train.py", "--config", MLP, "--workdir", tmp_path / "run", "--distributed", *flags)
  _assert_one_line(result, 2, re.escape(line))
  assert time.monotonic() - start < 30 and not (tmp_path / "run").exists()


# --distributed: processes on 127.0.0.1 that are duplicated, misconfigured, killed or signalled.


def _free_port() -> int:
  with socket.socket() as sock:
    sock.bind(("127.0.0.1", 0))
    return sock.getsockname()[1]


_STARTED = itertools.count()


class _Process:
  """One train.py process of a distributed run: stdout lines in a queue, stderr in a file."""

  def __init__(self, tmp_path, idx_dir, port, index, count, *more, timeout=TIMEOUT):
    self.stderr_path = tmp_path / f"stderr_{index}_{next(_STARTED)}"
    args = [
      sys.executable, str(SCRIPTS / "train.py"), "--config", MLP,
      "--workdir", str(tmp_path / "run"), f"--config.data_dir={idx_dir}",
      "--config.batch_size=64", "--config.eval_batch_size=32", "--config.progress_bar=False",
      "--distributed", f"--coordinator_address=127.0.0.1:{port}", f"--num_processes={count}",
      f"--process_id={index}", f"--distributed_timeout={timeout}", *more,
    ]  # fmt: skip
    with open(self.stderr_path, "w") as stderr:
      self.popen = subprocess.Popen(
        args,
        stdout=subprocess.PIPE,
        stderr=stderr,
        text=True,
        env=_env(JAX_NUM_CPU_DEVICES="2"),
        cwd=REPO_ROOT,
      )
    self.lines: queue.Queue[str] = queue.Queue()
    threading.Thread(target=self._read, daemon=True).start()

  def _read(self) -> None:
    for line in self.popen.stdout:
      self.lines.put(line)

  def wait_for_line(self, text: str, seconds: float) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
      try:
        if text in self.lines.get(timeout=1):
          return
      except queue.Empty:
        if self.popen.poll() is not None:
          break
    pytest.fail(f"no {text!r} on stdout; stderr:\n{self.stderr()[-3000:]}")

  def wait(self, seconds: float) -> float:
    """Waits for the exit (at most ``seconds``); the seconds it took."""
    start = time.monotonic()
    try:
      self.popen.wait(timeout=seconds)
    except subprocess.TimeoutExpired:
      pytest.fail(f"still running after {seconds} s; stderr:\n{self.stderr()[-3000:]}")
    return time.monotonic() - start

  def stderr(self) -> str:
    return self.stderr_path.read_text()

  def assert_one_line(self, status: int, pattern: str) -> None:
    report = f"exit {self.popen.returncode}, stderr:\n{self.stderr()[-3000:]}"
    assert self.popen.returncode == status, report
    assert re.fullmatch(pattern, _last_line(self.stderr())), report
    assert "Traceback" not in self.stderr(), report

  def kill(self) -> None:
    if self.popen.poll() is None:
      self.popen.kill()
      self.popen.wait()


def _wait_for(condition, seconds: float, process=None) -> None:
  deadline = time.monotonic() + seconds
  while not condition():
    if time.monotonic() > deadline or (process is not None and process.poll() is not None):
      pytest.fail("the process did not get there")
    time.sleep(0.1)


def _coordinator_lock(port: int) -> Path:
  return Path(tempfile.gettempdir()) / f"flax_mnist-coordinator-{port}.lock"


def _connecting(port: int) -> bool:
  """Whether process 0 on ``port`` has claimed it (next: jax.distributed.initialize)."""
  lock = _coordinator_lock(port)
  return lock.exists() and lock.read_text().startswith("pid")


def test_two_processes_given_process_id_0_both_end_in_one_line_within_the_timeout(
  tmp_path, idx_dir
):
  port = _free_port()
  first = _Process(tmp_path, idx_dir, port, 0, 2)
  second = None
  try:
    _wait_for(lambda: _connecting(port), 60, first.popen)
    start = time.monotonic()
    second = _Process(tmp_path, idx_dir, port, 0, 2)
    assert second.wait(30) < 30
    second.assert_one_line(
      1,
      r"error: --process_id=0: pid \d+ on this host is already process 0 on port "
      rf"{port}; give --process_id=0 to one process only",
    )
    first.wait(TIMEOUT + 20)
    assert time.monotonic() - start < TIMEOUT + 20  # It was 300 s, then an abort (exit 134).
    first.assert_one_line(
      1,
      re.escape(
        f"error: --distributed: not every process connected within {TIMEOUT} s "
        "(--distributed_timeout); expected 2 processes, --process_id 0..1 each given once, all "
        f"with --num_processes=2 and --coordinator_address=127.0.0.1:{port}"
      ),
    )
  finally:
    for process in (first, second):
      if process is not None:
        process.kill()


def test_processes_given_different_num_processes_both_end_in_one_line(tmp_path, idx_dir):
  port = _free_port()
  processes = [_Process(tmp_path, idx_dir, port, 0, 2), _Process(tmp_path, idx_dir, port, 1, 3)]
  try:
    for process in processes:
      process.wait(60)  # Both trained to the end before.
    processes[0].assert_one_line(
      1,
      re.escape(
        "error: --num_processes=2: process 1 was given --num_processes=3; give every process "
        "the same --num_processes"
      ),
    )
    processes[1].assert_one_line(
      1,
      re.escape(
        "error: --num_processes=3: process 0 was given --num_processes=2; give every process "
        "the same --num_processes"
      ),
    )
    assert not (tmp_path / "run" / "history.json").exists()
  finally:
    for process in processes:
      process.kill()


def test_a_process_killed_mid_training_ends_the_other_in_one_line_within_the_timeout(
  tmp_path, idx_dir
):
  port = _free_port()
  processes = [
    _Process(tmp_path, idx_dir, port, index, 2, "--config.num_epochs=1000") for index in (0, 1)
  ]
  try:
    processes[0].wait_for_line("epoch   1/", 120)
    processes[1].kill()
    seconds = processes[0].wait(TIMEOUT + 20)
    assert seconds < TIMEOUT  # Silent for TIMEOUT / 2; it was an abort (134) after ~78 s.
    processes[0].assert_one_line(
      1,
      re.escape(
        f"error: --distributed: process 1 of 2 stopped answering for {TIMEOUT / 2:g} s: it "
        "died, was killed or hangs, see its log; every process ends"
      ),
    )
  finally:
    for process in processes:
      process.kill()


def test_sigterm_ends_a_process_waiting_for_the_others_to_connect_at_once(tmp_path, idx_dir):
  port = _free_port()
  process = _Process(tmp_path, idx_dir, port, 0, 2, timeout=300)
  try:
    _wait_for(lambda: _connecting(port), 60, process.popen)
    time.sleep(1)  # Inside jax.distributed.initialize, where no Python signal handler runs.
    process.popen.send_signal(signal.SIGTERM)
    assert process.wait(10) < 5  # It ignored SIGTERM for the whole 300 s.
    process.assert_one_line(143, r"terminated.*")
  finally:
    process.kill()


def test_sigterm_ends_a_process_blocked_on_a_stopped_peer_within_the_grace(tmp_path, idx_dir):
  port = _free_port()
  processes = [
    _Process(tmp_path, idx_dir, port, index, 2, "--config.num_epochs=1000", timeout=120)
    for index in (0, 1)
  ]
  try:
    processes[0].wait_for_line("epoch   1/", 120)
    processes[1].popen.send_signal(signal.SIGSTOP)  # Alive, silent: process 0 blocks on it.
    time.sleep(2)
    processes[0].popen.send_signal(signal.SIGTERM)
    assert processes[0].wait(30) < 15  # The grace is 10 s.
    processes[0].assert_one_line(
      143,
      re.escape(
        "terminated while blocked in JAX, waiting for the other processes; rerun the same "
        "command to resume"
      ),
    )
  finally:
    for process in processes:
      process.kill()
