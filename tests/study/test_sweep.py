"""Tests for flax_mnist.study.sweep and sweep_report, and scripts/sweep.py: axes parsed as the
fields' types, trials checked before training, trials run at once in separate processes, the
SLURM array through submitit, resumption, the Pareto fronts and the report."""

from __future__ import annotations

import json

import pytest
from conftest import REPO_ROOT, run_script

from flax_mnist.config import load_config_file
from flax_mnist.errors import ConfigError
from flax_mnist.study import sweep, sweep_report


def _base(**overrides):
  config = load_config_file(REPO_ROOT / "configs" / "cnn_pool.py")
  config.update(overrides)
  return config


def test_axes_are_parsed_as_the_fields_types():
  base = _base()
  assert sweep.parse_axis("learning_rate=1e-3, 3e-3", base) == ("learning_rate", [1e-3, 3e-3])
  assert sweep.parse_axis("batch_size=128,512", base) == ("batch_size", [128, 512])
  assert sweep.parse_axis("shuffle=true,False", base) == ("shuffle", [True, False])
  assert sweep.parse_axis("augment.shift=0,2", base) == ("augment.shift", [0, 2])
  assert sweep.parse_axis("optimizer=adam,sgd", base) == ("optimizer", ["adam", "sgd"])
  # A factory's argument: any Python literal.
  assert sweep.parse_axis("model_kwargs.width=0.25,1", base) == ("model_kwargs.width", [0.25, 1])
  assert sweep.product([("a", [1, 2]), ("b", ["x", "y"])]) == [
    {"a": 1, "b": "x"},
    {"a": 1, "b": "y"},
    {"a": 2, "b": "x"},
    {"a": 2, "b": "y"},
  ]
  assert sweep.trial_name({"model_kwargs.width": 0.5, "optimizer": "a/b"}) == (
    "model_kwargs.width=0.5_optimizer=a-b"
  )


@pytest.mark.parametrize(
  "spec, message",
  [
    ("learning_rat=1e-3", "config has no field learning_rat (did you mean learning_rate?)"),
    ("learning_rate=fast", "learning_rate=fast: expected a number (the config has 0.001)"),
    ("batch_size=64.5", "batch_size=64.5: expected an integer (the config has 512)"),
    ("augment.shiftt=1", "config has no field augment.shiftt (did you mean augment.shift?)"),
    ("batch_size=64,64", "64 given more than once"),
    ("learning_rate", "expected FIELD=V1,V2,..."),
  ],
)
def test_a_bad_axis_is_one_line_naming_it(spec, message):
  with pytest.raises(ConfigError) as info:
    sweep.parse_axis(spec, _base())
  assert message in str(info.value) and "\n" not in str(info.value)


def test_every_trial_is_checked_before_any_trains(tmp_path):
  base = _base()
  with pytest.raises(ConfigError, match=r"sweep trial learning_rate=-1.0: config.learning_rate"):
    sweep.make_trials(base, [{"learning_rate": 1e-3}, {"learning_rate": -1.0}], [0], 1, tmp_path)
  with pytest.raises(ConfigError, match=r"widht=2: model 'cnn_pool' .*'widht' is not an argument"):
    sweep.make_trials(base, [{"model_kwargs.widht": 2}], [0], 1, tmp_path)
  trials = sweep.make_trials(base, [{"model_kwargs.width": 2}], [0, 1], 3, tmp_path)
  [trial] = trials
  assert trial.config["model_kwargs"] == {"width": 2} and trial.config["seeds"] == [0, 1]
  assert trial.config["num_epochs"] == 3 and base.model_kwargs.to_dict() == {}  # A copy.
  assert not (tmp_path / trial.name).exists()  # Planned, not trained.


def _entry(params, seconds, bests, overrides):
  histories = {str(seed): [{"epoch": 1, "val_accuracy": best}] for seed, best in enumerate(bests)}
  mean = sum(bests) / len(bests)
  return {
    "overrides": overrides,
    "histories": histories,
    "cost": {"params": params, "time": seconds},
    "summary": {"best_val_accuracy": {"mean": mean, "std": 0.0}},
  }


def test_the_pareto_front_keeps_the_trials_nothing_beats_and_tests_only_neighbours():
  entries = {
    "w=0.5": _entry(10, 5.0, [0.90, 0.91], {"w": 0.5}),
    "w=1": _entry(20, 4.0, [0.95, 0.96], {"w": 1}),  # Fewer seconds than w=0.5: it drops out.
    "w=2": _entry(40, 8.0, [0.95, 0.96], {"w": 2}),  # As accurate as w=1, bigger: dominated.
    "w=4": _entry(80, 16.0, [0.97, 0.98], {"w": 4}),
  }
  assert sweep_report.pareto_front(entries, "params") == ["w=0.5", "w=1", "w=4"]
  assert sweep_report.pareto_front(entries, "time") == ["w=1", "w=4"]
  rows = sweep_report.neighbour_tests(entries)
  assert [(row["better"], row["worse"]) for row in rows] == [
    ("w=1", "w=0.5"),
    ("w=1", "w=2"),  # Equal means: in the sweep's order.
    ("w=4", "w=2"),
  ]
  assert all(row["field"] == "w" for row in rows)


def test_the_slurm_array_is_one_task_per_trial_requeued_on_preemption(tmp_path):
  parameters = sweep.slurm_parameters(2, timeout_min=30, partition="gpu", gpus_per_node=1)
  script = sweep.sbatch_script(tmp_path / "submitit", parameters, count=5)
  for line in (
    "#SBATCH --array=0-4%2",
    "#SBATCH --partition=gpu",
    "#SBATCH --time=30",
    "#SBATCH --gpus-per-node=1",
    "#SBATCH --signal=USR2@120",
  ):
    assert line in script, script
  assert "submitit.core._submit" in script
  requeued = sweep.TrialJob().checkpoint("a trial")
  assert isinstance(requeued.function, sweep.TrialJob) and requeued.args == ("a trial",)


@pytest.mark.integration
def test_submitits_local_executor_runs_the_array_and_the_report_reads_it(idx_dir, tmp_path):
  import submitit

  base = _base(data_dir=str(idx_dir), batch_size=64, eval_batch_size=50)
  overrides = [{"model_kwargs.width": 0.5}, {"model_kwargs.width": 1}]
  trials = sweep.make_trials(base, overrides, [0], 1, tmp_path / "runs")
  executor = submitit.LocalExecutor(folder=tmp_path / "runs" / "submitit")
  executor.update_parameters(timeout_min=10)
  assert sweep.run_submitit(trials, executor) == [trial.name for trial in trials]
  settings = {"config": "c", "model": "cnn_pool", "fields": ["model_kwargs.width"], "seeds": [0]}
  settings |= {"num_epochs": 1, "launcher": "slurm", "parallel": 2}
  results = sweep_report.collect(trials, settings, command="test")
  assert [entry["facts"]["trainable"] for entry in results["trials"].values()] == [14_410, 57_034]
  path = sweep_report.write(results, tmp_path / "out")
  assert "| `model_kwargs.width=0.5` | 14,410 |" in path.read_text()


@pytest.mark.integration
def test_two_trials_run_at_once_in_two_processes_and_a_rerun_trains_nothing(idx_dir, tmp_path):
  out, runs = tmp_path / "out", tmp_path / "runs"
  args = [
    "sweep.py",
    "--config",
    str(REPO_ROOT / "configs" / "mlp.py"),
    f"--config.data_dir={idx_dir}",
    "--config.batch_size=64",
    "--sweep",
    "learning_rate=1e-3,3e-3",
    "--seeds=2",
    "--epochs=2",
    f"--out={out}",
    f"--workdir={runs}",
    "--parallel=2",
  ]
  result = run_script(*args)
  assert result.returncode == 0, result.stderr[-3000:]
  records = [
    json.loads((runs / name / "trial.json").read_text())
    for name in sorted(["learning_rate=0.001", "learning_rate=0.003"])
  ]
  assert len({record["pid"] for record in records}) == 2  # Two processes ...
  first, second = records
  assert first["started"] < second["finished"] and second["started"] < first["finished"]  # at once.
  results = json.loads((out / "results.json").read_text())
  assert sorted(results["trials"]) == ["learning_rate=0.001", "learning_rate=0.003"]
  assert all(len(entry["histories"]) == 2 for entry in results["trials"].values())
  assert (out / "accuracy_vs_params.png").is_file() and "Pareto" in (out / "report.md").read_text()
  histories = {path: path.read_bytes() for path in sorted(runs.glob("*/seed_*/history.json"))}
  again = run_script(*args)
  assert again.returncode == 0, again.stderr[-3000:]
  assert again.stdout.count("nothing to train") == 4 and "epoch   1/" not in again.stdout
  assert {path: path.read_bytes() for path in histories} == histories


@pytest.mark.integration
def test_the_command_line_refuses_bad_sweeps_in_one_line_and_reads_a_sweep_function(tmp_path):
  config = str(REPO_ROOT / "configs" / "cnn_pool.py")
  common = ["sweep.py", "--config", config, f"--out={tmp_path / 'out'}", "--dry_run"]
  for spec, message in (
    ("learning_rat=1e-3", "error: --sweep learning_rat: config has no field learning_rat (did"),
    ("num_epochs=three", "error: --sweep num_epochs=three: expected an integer"),
  ):
    result = run_script(*common, "--sweep", spec)
    assert result.returncode == 2 and result.stderr.startswith(message), result.stderr
    assert result.stderr.count("\n") == 1
  file = tmp_path / "my_sweep.py"
  file.write_text(
    "from flax_mnist.config import default_config\n"
    "def get_config():\n  config = default_config()\n  config.model = 'cnn_pool'\n  return config\n"
    "def sweep():\n"
    "  yield {'model_kwargs.width': 0.5, 'learning_rate': 3e-3}\n"
    "  yield {'model_kwargs.width': 2}\n"
  )
  listed = run_script(
    "sweep.py",
    "--config",
    str(file),
    f"--out={tmp_path / 'o'}",
    "--dry_run",
    "--launcher=slurm",
    "--parallel=2",
  )
  assert listed.returncode == 0, listed.stderr
  assert "model_kwargs.width=0.5_learning_rate=0.003: " in listed.stdout
  assert "model_kwargs.width=2: " in listed.stdout and "#SBATCH --array=0-1%2" in listed.stdout
  assert not (tmp_path / "o").exists()  # A dry run writes nothing.
