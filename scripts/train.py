"""Trains one model of the family:

  python scripts/train.py --config configs/cnn.py --workdir runs/cnn


Any config field can be overridden: --config.num_epochs=3 --config.seed=1. Running again with
the same workdir resumes from its latest checkpoint. Several seeds, compiled once:
--config.num_seeds=5 (or --config.seeds="(0,3,7)") trains each into WORKDIR/seed_<seed>/ and
writes the mean and spread over seeds to WORKDIR/seeds.json.

Several hosts: run the same command on every host with --distributed (jax.distributed finds
SLURM, Cloud TPU VMs, Open MPI and Kubernetes by itself; elsewhere add --coordinator_address,
--num_processes and --process_id). The workdir must be storage every host sees (GCS, NFS).

A process that is missing, misconfigured or dies ends every process within about
--distributed_timeout seconds (60), each with one line naming the cause, exit 1: not every
process connected in time; two processes 0 on one host; processes given different
--num_processes; a process silent for half the timeout (JAX's own check, 30 s after the
timeout, would abort with a stack dump). SIGTERM ends a process blocked waiting for the others
within 10 s (143). Where JAX aborts a process itself (when process 0 dies, the others at once;
a second process 0 on another host), it prints its own fatal line and exits 134: nothing in
Python can catch it.
"""

import atexit
import faulthandler
import fcntl
import inspect
import itertools
import os
import re
import signal
import tempfile
import threading
import time
from pathlib import Path

import _cli
from absl import flags
from ml_collections import config_flags

from flax_mnist import config as config_lib
from flax_mnist import train

_CONFIG = config_flags.DEFINE_config_file(
  "config", None, "Path to a config file in configs/.", lock_config=True
)
_WORKDIR = flags.DEFINE_string("workdir", None, "Checkpoints, history and TensorBoard logs.")
_DISTRIBUTED = flags.DEFINE_bool(
  "distributed", False, "Call jax.distributed.initialize() first (one process per host)."
)
_COORDINATOR = flags.DEFINE_string("coordinator_address", None, "host:port of process 0.")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "How many processes in all.")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "This process's index.")
_TIMEOUT = flags.DEFINE_integer(
  "distributed_timeout",
  60,
  "--distributed: seconds to wait for every process to connect; a process silent for half as "
  "long counts as dead. Either ends every process, with one line.",
  lower_bound=2,
)
_cli.require("config", "workdir")

_KEYS = "flax_mnist"  # This script's keys in the coordination service's key-value store.
_SIGNAL_GRACE_S = 10  # After SIGTERM, the time a process has to save and exit (MNIST's: ~1 s).
_JAX_MARGIN_S = 30  # JAX's timeouts this much later than ours: ours say what happened.
_HELD: list = []  # Files locked for the life of the process.


def _initialize_distributed() -> None:
  """jax.distributed.initialize() before any other JAX call; never in the library. Every failure
  to form the group of processes ends each of them with one line (see the module docstring)."""
  explicit = (_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value)
  if not _DISTRIBUTED.value:
    if any(value is not None for value in explicit):
      _cli.fail("--coordinator_address, --num_processes and --process_id need --distributed")
    return
  _check_distributed_flags()
  if not _cli.debugging():
    # Where JAX ends the process itself, from a C++ thread, before Python can act (process 0
    # died; a connection refused outright), it prints its fatal line and aborts (exit 134):
    # without absl's faulthandler adding a dump of every Python thread.
    faulthandler.disable()
  if _PROCESS_ID.value == 0 and _COORDINATOR.value is not None:
    _claim_coordinator_port(_COORDINATOR.value.rsplit(":", 1)[1])
  _cli.end_promptly_on_signals(0)  # While connecting there is nothing to save.
  client, index, count = _connect(_TIMEOUT.value)
  _check_process_counts_agree(client, index, count, _TIMEOUT.value)
  signalled = threading.Event()  # This process is ending: signalled, or done (at exit).

  def done() -> None:
    """At exit, before JAX's own shutdown (atexit runs last-registered first): the watcher stops,
    and the others stop counting this process as silent."""
    signalled.set()
    try:
      client.key_value_set(f"{_KEYS}/done/{index}", "1", allow_overwrite=True)
    except Exception:  # noqa: BLE001 (the coordinator may be gone already)
      pass

  atexit.register(done)

  def announce(signum: int) -> None:
    signalled.set()
    what = "terminated (SIGTERM)" if signum == signal.SIGTERM else "interrupted (SIGINT)"
    _announce(client, index, f"process {index} was {what}")

  _cli.end_promptly_on_signals(_SIGNAL_GRACE_S, announce)
  threading.Thread(
    target=_watch_peers,
    args=(client, index, count, _TIMEOUT.value / 2, signalled),
    name="peers",
    daemon=True,
  ).start()


def _check_distributed_flags() -> None:
  """What can be checked before connecting: the flags' forms and ranges (bad input, exit 2)."""
  address, count, index = _COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value
  if address is not None:
    match = re.fullmatch(r"(\[[0-9A-Fa-f:.]+\]|[^\s:/\[\]]+):(\d{1,5})", address)
    if not match or not 0 < int(match.group(2)) < 65536:
      _cli.fail(
        f"--coordinator_address={address}: expected host:port of process 0, such as 10.0.0.1:1234"
      )
  if count is not None and count < 1:
    _cli.fail(f"--num_processes={count}: expected at least 1")
  if index is not None and not 0 <= index < (count if count is not None else index + 1):
    expected = f"0..{count - 1} for --num_processes={count}" if count else "0 or more"
    _cli.fail(f"--process_id={index}: out of range, expected {expected}")


def _claim_coordinator_port(port: str) -> None:
  """Process 0 serves the coordination service on ``port``. gRPC lets a second process 0 on this
  host serve the same port, and the two then wait for each other's peers until the timeout
  (issue 16): an flock per port refuses the second at once."""
  path = Path(tempfile.gettempdir()) / f"flax_mnist-coordinator-{port}.lock"
  try:
    handle = open(path, "a+")  # noqa: SIM115 (held open, locked, for the life of the process)
  except OSError:  # Another user's lock file: nothing to check against.
    return
  try:
    fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
  except BlockingIOError:
    handle.seek(0)
    holder = handle.read().strip() or "another process"
    _cli.fail(
      f"--process_id=0: {holder} on this host is already process 0 on port {port}; give "
      "--process_id=0 to one process only",
      1,
    )
  handle.seek(0)
  handle.truncate()
  handle.write(f"pid {os.getpid()}")
  handle.flush()
  _HELD.append(handle)


def _connect(timeout: int):
  """``jax.distributed.initialize`` with JAX's timeouts set from ``timeout`` (their names differ
  across jax versions: those this one takes). JAX reports a connection that fails by aborting
  the process (exit 134, a stack dump), so a timer ends it first with one line. Returns the
  coordination client, this process's index and the number of processes."""
  import jax
  from jax._src import distributed  # The client: as orbax reaches it.

  if "jax_enable_preemption_service" in jax.config.values:  # Its SIGTERM handler: not ours.
    jax.config.update("jax_enable_preemption_service", False)
  wanted = {
    "initialization_timeout": timeout + _JAX_MARGIN_S,
    "heartbeat_timeout_seconds": timeout + _JAX_MARGIN_S,  # A fallback for _watch_peers.
    "shutdown_timeout_seconds": timeout,
  }
  accepted = inspect.signature(jax.distributed.initialize).parameters
  count = _NUM_PROCESSES.value
  expected = (
    f"{count} processes, --process_id 0..{count - 1} each given once, all with "
    f"--num_processes={count} and --coordinator_address={_COORDINATOR.value}"
    if count
    else "every process of the job started, with the same coordinator"
  )
  timer = threading.Timer(
    timeout,
    _cli.fail_now,
    (
      f"--distributed: not every process connected within {timeout} s (--distributed_timeout); "
      f"expected {expected}",
      1,
    ),
  )
  timer.daemon = True
  timer.start()
  try:
    jax.distributed.initialize(
      coordinator_address=_COORDINATOR.value,
      num_processes=count,
      process_id=_PROCESS_ID.value,
      **{name: value for name, value in wanted.items() if name in accepted},
    )
  except (ValueError, RuntimeError) as error:
    reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    _cli.fail(
      f"--distributed: jax.distributed.initialize() failed ({reason}); outside SLURM, a "
      "Cloud TPU VM, Open MPI or Kubernetes pass --coordinator_address, --num_processes "
      "and --process_id",
      1,
    )
  finally:
    timer.cancel()
  state = distributed.global_state
  return state.client, state.process_id, state.num_processes


def _check_process_counts_agree(client, index: int, count: int, timeout: int) -> None:
  """JAX takes process 0's number of processes and lets in a process told another one (2 vs 3
  trained, issue 16): each process publishes its own, process 0 reads every other's, the others
  read process 0's. Also stamps this process alive before any peer looks for it."""
  client.key_value_set(f"{_KEYS}/alive/{index}", "0", allow_overwrite=True)
  client.key_value_set(f"{_KEYS}/num_processes/{index}", str(count))
  for peer in range(1, count) if index == 0 else [0]:
    theirs = int(client.blocking_key_value_get(f"{_KEYS}/num_processes/{peer}", timeout * 1000))
    if theirs != count:
      _cli.fail(
        f"--num_processes={count}: process {peer} was given --num_processes={theirs}; give "
        "every process the same --num_processes",
        1,
      )


def _watch_peers(client, index: int, count: int, silent_s: float, signalled) -> None:
  """Once a second: stamps this process alive and reads what the others announced; on process
  0, also finds the processes whose stamp stopped for ``silent_s``. A silent process, another's
  announced end or a coordinator that stopped answering ends this process with one line, before
  JAX's heartbeat timeout would abort it. (A process that was itself sent a signal is left to
  its own ending.)"""
  changed: dict[str, tuple[str, float]] = {}
  for beat in itertools.count(1):
    try:
      client.key_value_set(f"{_KEYS}/alive/{index}", str(beat), allow_overwrite=True)
      announced = client.key_value_dir_get(f"{_KEYS}/failed/")
      finished = {key.rsplit("/", 1)[-1] for key, _ in client.key_value_dir_get(f"{_KEYS}/done/")}
      stamps = client.key_value_dir_get(f"{_KEYS}/alive/")
      silent = [peer for peer in _silent(stamps, changed, silent_s) if peer not in finished]
    except Exception as error:  # noqa: BLE001 (any failure to reach the coordinator)
      if signalled.is_set():
        return
      _cli.fail_now(
        f"--distributed: the coordinator (process 0, {_COORDINATOR.value or 'auto-detected'}) "
        f"stopped answering ({str(error).strip().splitlines()[0] if str(error).strip() else ''}):"
        " it ended or hangs, see its log; every process ends",
        1,
      )
    if signalled.is_set():
      return
    if announced:
      _cli.fail_now(f"--distributed: {announced[0][1]}; every process ends", 1)
    if index == 0 and silent:
      message = (
        f"process {', '.join(silent)} of {count} stopped answering for {silent_s:g} s: it died, "
        "was killed or hangs, see its log"
      )
      _announce(client, index, message)
      time.sleep(2)  # The others read it before the coordinator goes.
      _cli.fail_now(f"--distributed: {message}; every process ends", 1)
    time.sleep(1)


def _silent(stamps: list[tuple[str, str]], changed: dict, silent_s: float) -> list[str]:
  """The process indices whose alive stamp has not changed for ``silent_s`` seconds; ``changed``
  holds {key: (stamp, when it last changed)} from one call to the next."""
  now = time.monotonic()
  for key, stamp in stamps:
    if changed.get(key, (None,))[0] != stamp:
      changed[key] = (stamp, now)
  return sorted(
    (key.rsplit("/", 1)[-1] for key, (_, since) in changed.items() if now - since > silent_s),
    key=int,
  )


def _announce(client, index: int, message: str) -> None:
  """Tells the other processes why this one ends (they end too, saying so)."""
  client.key_value_set(f"{_KEYS}/failed/{index}", message, allow_overwrite=True)


def main() -> None:
  _initialize_distributed()
  config = _CONFIG.value
  try:
    if len(config_lib.seed_list(config)) > 1:
      train.train_seeds(config, _WORKDIR.value)
    else:
      train.train_and_evaluate(config, _WORKDIR.value)
  except Exception as error:
    if _DISTRIBUTED.value and not _cli.debugging() and _lost_a_peer(error):
      _end_after_a_lost_peer(error)
    raise


# How a collective fails when a process it spans is gone (CPU: gloo; GPU: NCCL).
_LOST_PEER = re.compile(r"gloo|nccl|connect|socket|peer", re.IGNORECASE)


def _lost_a_peer(error: Exception) -> bool:
  import jax

  return isinstance(error, jax.errors.JaxRuntimeError) and bool(_LOST_PEER.search(str(error)))


def _end_after_a_lost_peer(error: Exception) -> None:
  """A computation across the processes failed because one of them is gone: _watch_peers names
  it within half the timeout; past that, one plain line. Never returns, never through exit
  handlers: JAX's would wait for the gone process (and starve _watch_peers)."""
  time.sleep(_TIMEOUT.value / 2 + 5)
  reason = str(error).strip().splitlines()[0]
  _cli.fail_now(
    f"--distributed: a computation across the processes failed ({reason}): another process "
    "ended or cannot be reached, see its log; every process ends",
    1,
  )


if __name__ == "__main__":
  _cli.run(main)
