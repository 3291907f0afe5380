"""A sweep's results and report: every trial's per-seed histories read back from its workdir,
its figures over seeds, the Pareto fronts of accuracy against parameters and against training
time, pairwise tests between trials one step apart on one field, the plots and report.md."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import ml_collections

from flax_mnist import history, log
from flax_mnist import workdir as workdir_lib
from flax_mnist.errors import WorkdirError
from flax_mnist.study import run as study_run
from flax_mnist.study import stats
from flax_mnist.study.formats import interval, mean_std, p_value, points, seconds, table
from flax_mnist.study.sweep import Trial, trial_dir

PLOTS = {"accuracy_vs_params": "accuracy_vs_params.png", "accuracy_vs_time": "accuracy_vs_time.png"}
# The two costs a trial is weighed by: its parameters, and one seed's training seconds.
COSTS = {"params": "parameters", "time": "training seconds per seed"}


def collect(
  trials: Sequence[Trial], settings: Mapping[str, Any], *, command: str
) -> dict[str, Any]:
  """The sweep's results from its trials' workdirs: per trial its overrides, facts, config,
  histories and summary; the Pareto fronts; the pairwise tests; settings and environment."""
  entries = {}
  for trial in trials:
    config = ml_collections.ConfigDict(trial.config)
    entry = study_run.read_model(config, trial_dir(trial))
    if any(len(records) < config.num_epochs for records in entry["histories"].values()):
      raise WorkdirError(
        f"{trial_dir(trial)}: trial {trial.name} has not trained {config.num_epochs} epochs for "
        "every seed; run the sweep (it resumes) before its report"
      )
    entry["summary"] = stats.summarize_model(entry["histories"])
    entry["overrides"] = trial.overrides
    entry["cost"] = {
      "params": stats.total_params(entry["facts"]),
      "time": entry["summary"]["epoch_seconds_total"] / entry["summary"]["num_seeds"],
    }
    entries[trial.name] = entry
  return {
    "kind": "sweep",
    "command": command,
    "settings": dict(settings),
    "environment": log.environment(),
    "trials": entries,
    "pareto": {cost: pareto_front(entries, cost) for cost in COSTS},
    "pairwise": neighbour_tests(entries),
  }


def best_accuracies(entry: Mapping[str, Any]) -> list[float]:
  """Each seed's best val accuracy."""
  return [history.best_record(records)["val_accuracy"] for records in entry["histories"].values()]


def pareto_front(entries: Mapping[str, Mapping[str, Any]], cost: str) -> list[str]:
  """The trials no other beats: none has a mean best val accuracy at least as high for a
  ``cost`` at most as high, one of the two strictly; cheapest first."""

  def point(name: str) -> tuple[float, float]:
    return entries[name]["cost"][cost], entries[name]["summary"]["best_val_accuracy"]["mean"]

  front = []
  for name in entries:
    spent, accuracy = point(name)
    dominated = any(
      other != name
      and point(other)[0] <= spent
      and point(other)[1] >= accuracy
      and point(other) != (spent, accuracy)
      for other in entries
    )
    if not dominated:
      front.append(name)
  return sorted(front, key=lambda name: point(name)[0])


def neighbour_tests(entries: Mapping[str, Mapping[str, Any]]) -> list[dict[str, Any]]:
  """Welch's test and a bootstrap interval between trials that differ in one field only, by
  one step of its values (width 0.5 against 1, not against 4): the comparisons that isolate a
  change."""
  rows = []
  names = list(entries)
  for index, first in enumerate(names):
    for second in names[index + 1 :]:
      a, b = entries[first]["overrides"], entries[second]["overrides"]
      differing = [field for field in a if a[field] != b.get(field)]
      if len(differing) != 1 or a.keys() != b.keys():
        continue
      field = differing[0]
      values = sorted({entry["overrides"][field] for entry in entries.values()}, key=_order)
      if abs(values.index(a[field]) - values.index(b[field])) != 1:
        continue
      bests = {first: best_accuracies(entries[first]), second: best_accuracies(entries[second])}
      [row] = stats.pairwise_tests(bests)
      rows.append({**row, "field": field})
  return rows


def _order(value: Any) -> Any:
  return (0, value) if isinstance(value, (int, float)) else (1, repr(value))


# ---------------------------------------------------------------------------------------------
# Plots.


def write_plots(results: Mapping[str, Any], out_dir: str | os.PathLike) -> dict[str, str]:
  """accuracy_vs_params.png and accuracy_vs_time.png, the Pareto front drawn through its
  trials; returns {plot: file name}."""
  import matplotlib

  matplotlib.use("Agg")  # Files only.
  import matplotlib.pyplot as plt

  entries = results["trials"]
  seeds = len(results["settings"]["seeds"])
  for key, cost in (("accuracy_vs_params", "params"), ("accuracy_vs_time", "time")):
    figure, axes = plt.subplots(figsize=(7.5, 5))
    for entry in entries.values():
      best = entry["summary"]["best_val_accuracy"]
      x = entry["cost"][cost]
      axes.errorbar(x, best["mean"], yerr=best["std"], fmt="o", color="tab:blue", capsize=4)
      axes.annotate(
        _label(entry), (x, best["mean"]), textcoords="offset points", xytext=(6, -12), fontsize=8
      )
    front = results["pareto"][cost]
    xs = [entries[name]["cost"][cost] for name in front]
    ys = [entries[name]["summary"]["best_val_accuracy"]["mean"] for name in front]
    axes.step(xs, ys, where="post", color="tab:red", alpha=0.6, label="Pareto front")
    axes.scatter(xs, ys, s=160, facecolors="none", edgecolors="tab:red")
    axes.set_xscale("log")
    axes.grid(alpha=0.3)
    axes.legend(loc="lower right")
    axes.set(
      title=f"Best val accuracy vs {COSTS[cost]}",
      xlabel=f"{COSTS[cost]} (log scale)",
      ylabel=f"best val accuracy (mean ± std, {seeds} seeds)",
    )
    figure.tight_layout()
    figure.savefig(Path(out_dir) / PLOTS[key], dpi=110)
    plt.close(figure)
  return dict(PLOTS)


def _label(entry: Mapping[str, Any]) -> str:
  """A trial's values, without the field names the report's header gives."""
  return ", ".join(str(value) for value in entry["overrides"].values()) or "base"


# ---------------------------------------------------------------------------------------------
# report.md.


def render(results: Mapping[str, Any]) -> str:
  """report.md of a sweep's ``results`` (with ``plots`` and ``command``, as written)."""
  settings, entries = results["settings"], results["trials"]
  fields = settings["fields"] or ["(the config file's sweep())"]
  seeds = len(settings["seeds"])
  by_params = sorted(entries, key=lambda name: entries[name]["cost"]["params"])
  rows = []
  for name in by_params:
    entry = entries[name]
    summary = entry["summary"]
    marks = [
      mark
      for cost, mark in (("params", "size"), ("time", "time"))
      if name in results["pareto"][cost]
    ]
    rows.append(
      [
        f"`{name}`",
        f"{entry['cost']['params']:,}",
        mean_std(summary["best_val_accuracy"]),
        mean_std(summary["final_val_accuracy"]),
        f"{summary['seconds_per_epoch']:.2f}",
        seconds(entry["cost"]["time"]),
        ", ".join(marks) or "",
      ]
    )
  header = (
    "trial | parameters | best val accuracy | final val accuracy | s/epoch | "
    "training per seed | Pareto front"
  )
  sections = [
    f"# Sweep of {', '.join(fields)} ({settings['model']})",
    "## Settings",
    _settings(results),
    "## Trials",
    table(header, rows),
    (
      f"Mean ± std over {seeds} seeds of each seed's best and final val accuracy; s/epoch is the "
      "median steady epoch (train + eval); training per seed sums a seed's epochs. Pareto front: "
      "no other trial is as accurate for fewer parameters (size) or less training time (time)."
    ),
    "## Accuracy against size and training time",
    *[f"![{key}]({file})" for key, file in results.get("plots", {}).items()],
    _answer(results),
    "## Are the differences real?",
    _differences(results),
    "## Reproduce",
    f"```\n{results['command']}\n```",
    "Each trial's per-seed workdirs (checkpoints, TensorBoard, trial.json) stay in the sweep's "
    "workdir; rerunning the command trains nothing that is done.",
  ]
  return "\n\n".join(sections) + "\n"


def _settings(results: Mapping[str, Any]) -> str:
  settings = results["settings"]
  environment = results["environment"]
  return (
    f"Base config `{settings['config']}` (model {settings['model']}), {len(results['trials'])} "
    f"trials, seeds {', '.join(map(str, settings['seeds']))}, {settings['num_epochs']} epochs "
    f"each; {settings['launcher']} launcher, {settings['parallel']} trial(s) at once. "
    f"{log.describe_hardware(environment)}, jax {environment['versions']['jax']}."
  )


def _answer(results: Mapping[str, Any]) -> str:
  """What the curve says: the most accurate trial, the smallest within its seed spread, and the
  fronts."""
  entries = results["trials"]
  accuracy = {name: entry["summary"]["best_val_accuracy"] for name, entry in entries.items()}
  top = max(entries, key=lambda name: accuracy[name]["mean"])
  floor = accuracy[top]["mean"] - accuracy[top]["std"]
  within = [name for name in entries if accuracy[name]["mean"] >= floor]
  smallest = min(within, key=lambda name: entries[name]["cost"]["params"])
  ratio = entries[top]["cost"]["params"] / entries[smallest]["cost"]["params"]
  sentences = [
    f"The most accurate trial is `{top}`: {mean_std(accuracy[top])} with "
    f"{entries[top]['cost']['params']:,} parameters.",
  ]
  if smallest != top:
    sentences.append(
      f"The smallest trial within one of its standard deviations is `{smallest}` "
      f"({mean_std(accuracy[smallest])}, {entries[smallest]['cost']['params']:,} parameters: "
      f"{ratio:.1f}x fewer)."
    )
  for cost, words in (("params", "size"), ("time", "training time")):
    front = results["pareto"][cost]
    sentences.append(f"On the {words} front, cheapest first: {', '.join(f'`{n}`' for n in front)}.")
  return " ".join(sentences)


def _differences(results: Mapping[str, Any]) -> str:
  rows = results["pairwise"]
  if not rows:
    return "No two trials differ by one step of one field: no pairwise test."
  cells = [
    [
      row["field"],
      f"`{row['better']}`",
      f"`{row['worse']}`",
      points(row["difference"]),
      p_value(row["p"]),
      interval(row),
      "yes" if row["exceeds_seed_spread"] else "no",
    ]
    for row in rows
  ]
  header = "field | better | worse | difference (points) | Welch p | 95% bootstrap | beyond seeds?"
  note = (
    f"Trials one step apart on one field; a difference is beyond the seed spread when Welch's p < "
    f"{stats.ALPHA} and the bootstrap interval excludes 0."
  )
  return table(header, cells) + "\n\n" + note


def write(results: Mapping[str, Any], out_dir: str | os.PathLike) -> Path:
  """Writes the plots, results.json and report.md into ``out_dir``; returns the report."""
  out_dir = Path(out_dir)
  out_dir.mkdir(parents=True, exist_ok=True)
  results = {**results, "plots": write_plots(results, out_dir)}
  workdir_lib.write_json(out_dir / "results.json", results)
  path = out_dir / "report.md"
  workdir_lib.write_text(path, render(results))
  return path
