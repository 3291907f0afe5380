"""Trains one model of the family:

  python scripts/train.py --config configs/cnn.py --workdir runs/cnn


Any config field can be overridden: --config.num_epochs=3 --config.seed=1. Running again with
the same workdir resumes from its latest checkpoint. Several seeds, compiled once:
--config.num_seeds=5 (or --config.seeds="(0,3,7)") trains each into WORKDIR/seed_<seed>/ and
writes the mean and spread over seeds to WORKDIR/seeds.json.

Several hosts: run the same command on every host with --distributed (jax.distributed finds
SLURM, Cloud TPU VMs, Open MPI and Kubernetes by itself; elsewhere add --coordinator_address,
--num_processes and --process_id). The workdir must be storage every host sees (GCS, NFS).
"""

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
flags.mark_flags_as_required(["config", "workdir"])


def _initialize_distributed() -> None:
  """jax.distributed.initialize() before any other JAX call; never in the library."""
  explicit = (_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value)
  if not _DISTRIBUTED.value:
    if any(value is not None for value in explicit):
      _cli.fail("--coordinator_address, --num_processes and --process_id need --distributed")
    return
  import jax

  try:
    jax.distributed.initialize(
      coordinator_address=_COORDINATOR.value,
      num_processes=_NUM_PROCESSES.value,
      process_id=_PROCESS_ID.value,
    )
  except (ValueError, RuntimeError) as error:
    reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    _cli.fail(
      f"--distributed: jax.distributed.initialize() failed ({reason}); outside SLURM, a "
      "Cloud TPU VM, Open MPI or Kubernetes pass --coordinator_address, --num_processes "
      "and --process_id",
      1,
    )


def main() -> None:
  _initialize_distributed()
  config = _CONFIG.value
  config_lib.check_fields(config, config_flags.get_config_filename(flags.FLAGS["config"]))
  if len(config_lib.seed_list(config)) > 1:
    train.train_seeds(config, _WORKDIR.value)
  else:
    train.train_and_evaluate(config, _WORKDIR.value)


if __name__ == "__main__":
  _cli.run(main)
