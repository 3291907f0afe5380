"""A sweep: config fields over values, each trial trained over seeds, one report.

  python scripts/sweep.py --config configs/cnn_pool.py \
      --sweep "model_kwargs.width=0.25,0.5,1,2,4" --sweep "learning_rate=1e-3,3e-3" \
      --seeds 5 --epochs 20 --out reports/width_sweep

trains the product of the --sweep values (each field of the config, dots for nested ones, each
value parsed as the field's type; or the override dicts the config file's ``sweep()`` yields),
each trial from seeds 0..N-1 into --workdir/<trial>/seed_<seed> (default runs/<out's name>,
resumable: a rerun trains nothing that is done), then writes into --out results.json, report.md
(a table per trial, accuracy against parameters and against training time with the Pareto
front, pairwise tests) and the plots. Every trial is checked before the first trains.

  --launcher local --parallel N   N trials at once, each in its own process (default 1: here)
  --launcher slurm --parallel N   one SLURM job-array task per trial, N at a time (submitit),
                                  requeued on preemption; --dry_run prints the array job instead
  --render_only                   report.md and the plots again from --out's results.json
"""

import shlex
import sys
from pathlib import Path

import _cli
from absl import flags
from ml_collections import config_flags

from flax_mnist import workdir
from flax_mnist.config import load_sweep
from flax_mnist.study import sweep, sweep_report

_CONFIG = config_flags.DEFINE_config_file("config", None, "The base config of every trial.")
_SWEEP = flags.DEFINE_multi_string(
  "sweep",
  [],
  'FIELD=V1,V2,...: one axis of the product (repeat for more), e.g. "learning_rate=1e-3,3e-3".',
)
_SEEDS = flags.DEFINE_integer("seeds", 5, "Seeds 0..N-1 per trial.", lower_bound=1)
_EPOCHS = flags.DEFINE_integer(
  "epochs", None, "Epochs per seed (default: the config's).", lower_bound=1
)
_OUT = flags.DEFINE_string("out", None, "Directory for results.json, report.md and the plots.")
_WORKDIR = flags.DEFINE_string("workdir", None, "The trials' workdirs (default runs/<out's name>).")
_LAUNCHER = flags.DEFINE_enum("launcher", "local", ["local", "slurm"], "Where the trials run.")
_PARALLEL = flags.DEFINE_integer("parallel", 1, "Trials at once.", lower_bound=1)
_PARTITION = flags.DEFINE_string("slurm_partition", None, "SLURM partition.")
_TIMEOUT = flags.DEFINE_integer("slurm_timeout_min", 240, "SLURM time limit per trial, minutes.")
_CPUS = flags.DEFINE_integer("slurm_cpus_per_task", None, "SLURM CPUs per trial.")
_GPUS = flags.DEFINE_integer("slurm_gpus_per_node", None, "SLURM GPUs per trial.")
_DRY_RUN = flags.DEFINE_bool(
  "dry_run", False, "List the trials (and, for slurm, the array job); train nothing."
)
_RENDER_ONLY = flags.DEFINE_bool(
  "render_only", False, "Rewrite report.md and the plots from --out's results.json."
)
_cli.require("config", "out")


def _trials() -> tuple[list, list[str]]:
  """The sweep's trials and the fields it varies, checked before anything trains."""
  config = _CONFIG.value
  from_file = load_sweep(flags.FLAGS["config"].config_filename)
  if from_file is not None and _SWEEP.value:
    _cli.fail("--sweep: the config file defines sweep(); give one or the other")
  if from_file is None and not _SWEEP.value:
    _cli.fail("--sweep: none given, and the config file defines no sweep(); expected FIELD=V1,V2")
  axes = [sweep.parse_axis(spec, config) for spec in _SWEEP.value]
  fields = [field for field, _ in axes]
  if len(set(fields)) != len(fields):
    _cli.fail(f"--sweep: a field given twice among {', '.join(fields)}")
  overrides = from_file if from_file is not None else sweep.product(axes)
  epochs = _EPOCHS.value or config.num_epochs
  workdir = _WORKDIR.value or str(Path("runs") / Path(_OUT.value).name)
  trials = sweep.make_trials(config, overrides, range(_SEEDS.value), epochs, workdir)
  return trials, fields


def main() -> None:
  out = Path(_OUT.value)
  if _RENDER_ONLY.value:
    results = workdir.read_json(out / "results.json")
    path = sweep_report.write(results, out)
    print(f"wrote {path} and its plots again from {out / 'results.json'}")
    return
  command = "python scripts/sweep.py " + " ".join(shlex.quote(arg) for arg in sys.argv[1:])
  trials, fields = _trials()
  slurm = sweep.slurm_parameters(
    _PARALLEL.value,
    timeout_min=_TIMEOUT.value,
    partition=_PARTITION.value,
    cpus_per_task=_CPUS.value,
    gpus_per_node=_GPUS.value,
  )
  folder = Path(trials[0].workdir) / "submitit"
  if _DRY_RUN.value:
    for trial in trials:
      print(f"{trial.name}: {trial.overrides}")
    if _LAUNCHER.value == "slurm":
      print(sweep.sbatch_script(folder, slurm, len(trials)))
    return
  _cli.check_writable_dir(out, "--out")  # Before hours of training, not after.
  if _LAUNCHER.value == "slurm":
    sweep.run_submitit(trials, sweep.slurm_executor(folder, slurm))
  else:
    sweep.run_local(trials, _PARALLEL.value)
  settings = {
    "config": flags.FLAGS["config"].config_filename,
    "model": trials[0].config["model"],
    "fields": fields,
    "seeds": list(range(_SEEDS.value)),
    "num_epochs": trials[0].config["num_epochs"],
    "launcher": _LAUNCHER.value,
    "parallel": _PARALLEL.value,
  }
  path = sweep_report.write(sweep_report.collect(trials, settings, command=command), out)
  print(f"wrote {path}: {len(trials)} trials")


if __name__ == "__main__":
  _cli.run(main)
