"""The notebook's questions answered from several seeds: train, measure, test, plot, write.

``run_comparison`` trains each model of the family from every seed (``train.train_seeds``,
compiled once per model), then ``build_results`` turns the per-seed histories into figures
(mean, std, min, max over seeds), ``pairwise_tests`` asks whether the differences between
models exceed the seed spread (Welch's t-test and a bootstrap interval of the difference in
mean best val accuracy), and ``write_report`` writes ``results.json``, ``report.md`` (whose
every figure and sentence comes from the results, none typed by hand) and the PNG plots.
"""

from __future__ import annotations

import itertools
import json
import math
import os
import statistics
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from flax import nnx
from scipy import stats as scipy_stats

from flax_mnist import log, models, train

RESULTS_FILE = "results.json"
REPORT_FILE = "report.md"
PLOTS = {
    "val_curves": "val_curves.png",
    "accuracy_vs_params": "accuracy_vs_params.png",
    "train_vs_val": "train_vs_val.png",
    "batchnorm_lag": "batchnorm_lag.png",
}
# The report's sections, in order (CI checks that each appears).
SECTIONS = (
    "Settings", "Accuracy over seeds", "Cost", "Plots", "Are the differences real?",
    "Accuracy, parameters and speed", "Which layer holds the parameters", "What max-pooling buys",
    "What BatchNorm and Dropout buy", "The notebook's re-training mistake", "Reproduce",
)
THRESHOLDS = (0.98, 0.99)
BOOTSTRAP_SAMPLES = 10_000
EARLY_EPOCHS = 3  # The BatchNorm lag shows in these.


def epochs_to_reach(history: Sequence[Mapping[str, Any]], threshold: float) -> int | None:
  """The first epoch whose val accuracy is at least ``threshold``; None if none is."""
  return next((record["epoch"] for record in history if record["val_accuracy"] >= threshold), None)


def _layer_formula(layer: nnx.Module, params: int) -> str:
  if isinstance(layer, models.Dense):
    in_features, out_features = layer.linear.kernel.shape
    return f"{out_features} × ({in_features} + 1) = {params:,}"
  if isinstance(layer, models.Conv):
    height, width, in_features, out_features = layer.kernel.shape
    return f"{out_features} × ({height}·{width}·{in_features} + 1) = {params:,}"
  return f"{params:,}"


def model_facts(name: str) -> dict[str, Any]:
  """Parameter counts of model ``name``: total, per layer (with the formula), and the largest layer."""
  model = models.create_model(name, rngs=nnx.Rngs(0))
  trainable, non_trainable = models.count_params(model)
  layers = [{"name": row["name"], "type": type(row["layer"]).__name__, "input_shape": list(row["input_shape"][1:]),
             "output_shape": list(row["output_shape"][1:]), "trainable": row["trainable"],
             "non_trainable": row["non_trainable"], "formula": _layer_formula(row["layer"], row["trainable"])}
            for row in models.layer_rows(model)]
  largest = max(layers, key=lambda layer: layer["trainable"])
  return {"trainable": trainable, "non_trainable": non_trainable, "layers": layers,
          "largest_layer": {**largest, "share": largest["trainable"] / trainable}}


def summarize_model(histories: Mapping[Any, Sequence[Mapping[str, Any]]]) -> dict[str, Any]:
  """Figures over seeds of one model's histories ({seed: history}): mean/std/min/max of each."""
  runs = [history for history in histories.values() if history]
  best = [max(history, key=lambda record: record["val_accuracy"]) for history in runs]
  final = [history[-1] for history in runs]
  steady = [record for history in runs for record in (history[1:] if len(history) > 1 else history)]
  summary = {
      "num_seeds": len(runs), "num_epochs": min(len(history) for history in runs),
      "best_val_accuracy": train.spread([record["val_accuracy"] for record in best]),
      "best_epoch": train.spread([record["epoch"] for record in best]),
      "final_val_accuracy": train.spread([record["val_accuracy"] for record in final]),
      "final_val_loss": train.spread([record["val_loss"] for record in final]),
      "final_train_accuracy": train.spread([record["train_accuracy"] for record in final]),
      "train_val_gap": train.spread([record["train_accuracy"] - record["val_accuracy"] for record in final]),
      "early_val_accuracy": [
          train.spread([history[epoch]["val_accuracy"] for history in runs])
          for epoch in range(min(EARLY_EPOCHS, min(len(history) for history in runs)))],
      # One seed's epoch (train + eval; under vmap, the seeds' shared epoch over their number).
      "seconds_per_epoch": statistics.median(record["seconds"] / record.get("parallel_seeds", 1)
                                             for record in steady),
      "images_per_second": statistics.median(record["images_per_second"] for record in steady),
      "epoch_seconds_total": sum(record["seconds"] / record.get("parallel_seeds", 1)
                                 for history in runs for record in history),
  }
  for threshold in THRESHOLDS:
    reached = [epochs_to_reach(history, threshold) for history in runs]
    hits = [epoch for epoch in reached if epoch is not None]
    summary[f"epochs_to_{round(threshold * 100)}"] = {
        "per_seed": reached, "reached": len(hits), "mean": float(np.mean(hits)) if hits else None}
  return summary


def bootstrap_interval(first: Sequence[float], second: Sequence[float], *, samples: int = BOOTSTRAP_SAMPLES,
                       level: float = 0.95, seed: int = 0) -> tuple[float, float]:
  """Percentile bootstrap interval of mean(first) - mean(second), resampling each group's seeds."""
  rng = np.random.default_rng(seed)
  first, second = np.asarray(first, np.float64), np.asarray(second, np.float64)
  draws = (rng.choice(first, (samples, first.size)).mean(axis=1)
           - rng.choice(second, (samples, second.size)).mean(axis=1))
  tail = (1 - level) / 2 * 100
  low, high = np.percentile(draws, [tail, 100 - tail])
  return float(low), float(high)


def welch_test(first: Sequence[float], second: Sequence[float]) -> tuple[float, float]:
  """Welch's t statistic and two-sided p-value; (nan, nan) when both groups have no spread."""
  first, second = np.asarray(first, np.float64), np.asarray(second, np.float64)
  if first.size < 2 or second.size < 2 or (first.std() == 0 and second.std() == 0):
    return math.nan, math.nan
  result = scipy_stats.ttest_ind(first, second, equal_var=False)
  return float(result.statistic), float(result.pvalue)


def pairwise_tests(best_by_model: Mapping[str, Sequence[float]], *, alpha: float = 0.05) -> list[dict[str, Any]]:
  """Every pair of models, the more accurate first: difference of mean best val accuracy, Welch's
  test and a 95% bootstrap interval. ``exceeds_seed_spread``: p < alpha and the interval excludes 0.
  """
  rows = []
  for first, second in itertools.combinations(best_by_model, 2):
    if np.mean(best_by_model[second]) > np.mean(best_by_model[first]):
      first, second = second, first
    t_statistic, p_value = welch_test(best_by_model[first], best_by_model[second])
    low, high = bootstrap_interval(best_by_model[first], best_by_model[second])
    rows.append({"better": first, "worse": second,
                 "difference": float(np.mean(best_by_model[first]) - np.mean(best_by_model[second])),
                 "t": t_statistic, "p": p_value, "interval": [low, high],
                 "exceeds_seed_spread": bool(p_value < alpha and low > 0) if not math.isnan(p_value) else False})
  return rows


def _run_facts(seed_dirs: Sequence[Path]) -> dict[str, Any]:
  """Compile seconds and parallelism from the seeds' run.json files (written when they trained)."""
  for directory in seed_dirs:
    path = directory / train.RUN_FILE
    if path.is_file():
      run = json.loads(path.read_text())
      return {"compile_seconds": sum(run["compile_seconds"].values()),
              "seed_parallelism": run.get("seed_parallelism", "loop")}
  return {"compile_seconds": None, "seed_parallelism": None}


def run_comparison(model_names: Sequence[str], seeds: Sequence[int], num_epochs: int, workdir: str | os.PathLike, *,
                   data_dir: str | None = None, overrides: Mapping[str, Any] | None = None,
                   print_fn: Callable[[str], None] | None = print) -> dict[str, Any]:
  """Trains every model from every seed into ``workdir/<model>/seed_<seed>`` (resuming what is
  there) and returns the results: settings, environment, and per model its facts, per-seed
  histories and summary, plus the pairwise tests.
  """
  say = print_fn or (lambda line: None)
  workdir = Path(workdir)
  results: dict[str, Any] = {"models": {}}
  configs = {}
  for name in model_names:
    config = train.default_config()
    config.update(model=name, num_epochs=num_epochs, seeds=tuple(seeds), progress_bar=False, **(overrides or {}))
    if data_dir:
      config.data_dir = data_dir
    train.validate_config(config)
    configs[name] = config
  for name, config in configs.items():
    say(f"== {name}: seeds {', '.join(map(str, seeds))}, {num_epochs} epochs")
    model_dir = workdir / name
    pending = any(len(train.read_history(model_dir / train.SEED_DIR.format(seed), num_epochs)) < num_epochs
                  for seed in seeds)
    started = time.perf_counter()
    histories = train.train_seeds(config, model_dir, print_fn=print_fn)
    wall_seconds = time.perf_counter() - started
    wall_path = model_dir / "wall_seconds.json"
    if pending:  # Kept beside the runs: re-running the report later does not lose it.
      train.write_json(wall_path, {"wall_seconds": wall_seconds, "seeds": list(seeds), "num_epochs": num_epochs})
    recorded = json.loads(wall_path.read_text()) if wall_path.is_file() else {}
    results["models"][name] = {
        "facts": model_facts(name),
        "config": train.config_to_dict(config),
        **_run_facts([model_dir / train.SEED_DIR.format(seed) for seed in seeds]),
        "wall_seconds": recorded.get("wall_seconds"),
        "histories": {str(seed): history for seed, history in histories.items()},
    }
  return build_results(results, seeds=list(seeds), num_epochs=num_epochs)


def build_results(results: dict[str, Any], *, seeds: Sequence[int], num_epochs: int) -> dict[str, Any]:
  """Adds the settings, environment, per-model summaries and pairwise tests to ``results``."""
  for entry in results["models"].values():
    entry["summary"] = summarize_model(entry["histories"])
  best_by_model = {name: [max(record["val_accuracy"] for record in history) for history in entry["histories"].values()]
                   for name, entry in results["models"].items()}
  results["pairwise"] = pairwise_tests(best_by_model) if len(best_by_model) > 1 else []
  results["settings"] = {"models": list(results["models"]), "seeds": list(seeds), "num_epochs": num_epochs}
  results.setdefault("environment", log.environment())
  return results


# ---------------------------------------------------------------------------------------------
# Writing: plots and the Markdown report.


def _mean_std(value: Mapping[str, float], digits: int = 4) -> str:
  return f"{value['mean']:.{digits}f} ± {value['std']:.{digits}f}"


def _curves(entry: Mapping[str, Any], key: str) -> np.ndarray:
  histories = [history for history in entry["histories"].values() if history]
  length = min(len(history) for history in histories)
  return np.array([[record[key] for record in history[:length]] for history in histories])


def _band(axes: Any, values: np.ndarray, label: str, epochs: np.ndarray | None = None, **style: Any) -> None:
  epochs = np.arange(1, values.shape[1] + 1) if epochs is None else epochs
  mean, std = values.mean(axis=0), values.std(axis=0, ddof=1) if values.shape[0] > 1 else np.zeros(values.shape[1])
  (line,) = axes.plot(epochs, mean, marker="o", markersize=3, label=label, **style)
  axes.fill_between(epochs, mean - std, mean + std, color=line.get_color(), alpha=0.2)


def write_plots(results: Mapping[str, Any], out_dir: Path) -> dict[str, str]:
  """Writes the PNGs; returns {plot: file name} for those written (the BatchNorm one needs cnn_pool_bn)."""
  import matplotlib
  matplotlib.use("Agg")  # Files only.
  import matplotlib.pyplot as plt
  from matplotlib.ticker import MaxNLocator

  entries = results["models"]
  seeds = len(results["settings"]["seeds"])
  written = {}

  def finish(figure: Any, axes_list: Sequence[Any], key: str, *, epochs_on_x: bool = True) -> None:
    for axes in axes_list:
      axes.grid(alpha=0.3)
      if epochs_on_x:
        axes.xaxis.set_major_locator(MaxNLocator(integer=True))
    figure.tight_layout()
    figure.savefig(out_dir / PLOTS[key], dpi=110)
    plt.close(figure)
    written[key] = PLOTS[key]

  figure, (accuracy_axes, loss_axes) = plt.subplots(1, 2, figsize=(12, 4.5))
  for name, entry in entries.items():
    _band(accuracy_axes, _curves(entry, "val_accuracy"), name)
    _band(loss_axes, _curves(entry, "val_loss"), name)
  # Zoom on where the models end up; the first epochs below the axis show in the loss plot.
  floor = min(entry["summary"]["final_val_accuracy"]["mean"] for entry in entries.values()) - 0.01
  ceiling = max(entry["summary"]["best_val_accuracy"]["max"] for entry in entries.values()) + 0.003
  accuracy_axes.set_ylim(max(floor, accuracy_axes.get_ylim()[0]), min(ceiling, accuracy_axes.get_ylim()[1]))
  accuracy_axes.set(title=f"Validation accuracy (mean ± std over {seeds} seeds)", xlabel="epoch",
                    ylabel=f"val accuracy (axis from {accuracy_axes.get_ylim()[0]:.3f})")
  loss_axes.set_yscale("log")
  loss_axes.set(title=f"Validation loss (mean ± std over {seeds} seeds)", xlabel="epoch", ylabel="val loss (log)")
  accuracy_axes.legend()
  loss_axes.legend()
  finish(figure, (accuracy_axes, loss_axes), "val_curves")

  figure, axes = plt.subplots(figsize=(7.5, 5))
  seconds = [entry["summary"]["seconds_per_epoch"] for entry in entries.values()]
  largest = max(seconds)
  for name, entry in entries.items():
    summary = entry["summary"]
    params = entry["facts"]["trainable"] + entry["facts"]["non_trainable"]
    best = summary["best_val_accuracy"]
    axes.errorbar(params, best["mean"], yerr=best["std"], fmt="none", ecolor="gray", capsize=4)
    axes.scatter(params, best["mean"], s=60 + 600 * summary["seconds_per_epoch"] / largest, alpha=0.7)
    axes.annotate(f"{name}\n{summary['seconds_per_epoch']:.2f} s/epoch", (params, best["mean"]),
                  textcoords="offset points", xytext=(10, -12), fontsize=9)
  axes.set_xscale("log")
  axes.margins(x=0.3, y=0.15)
  axes.set(title="Best val accuracy vs parameters (marker area: seconds per epoch)",
           xlabel="parameters (log scale)", ylabel=f"best val accuracy (mean ± std, {seeds} seeds)")
  finish(figure, (axes,), "accuracy_vs_params", epochs_on_x=False)

  figure, grid = plt.subplots(1, len(entries), figsize=(4 * len(entries), 3.8), squeeze=False, sharey=True)
  for axes, (name, entry) in zip(grid[0], entries.items()):
    _band(axes, _curves(entry, "train_accuracy"), "train (with dropout)")
    _band(axes, _curves(entry, "val_accuracy"), "val")
    axes.set(title=name, xlabel="epoch")
  grid[0][0].set_ylabel("accuracy")
  grid[0][0].set_ylim(0.9, 1.0)
  grid[0][0].legend(loc="lower right")
  figure.suptitle(f"Train vs val accuracy (mean ± std over {seeds} seeds)")
  finish(figure, grid[0], "train_vs_val")

  if "cnn_pool_bn" in entries:
    figure, axes = plt.subplots(figsize=(7.5, 4.5))
    for name, color in (("cnn_pool", "tab:green"), ("cnn_pool_bn", "tab:red")):
      if name in entries:
        val = _curves(entries[name], "val_accuracy")[:, :6]
        train_accuracy = _curves(entries[name], "train_accuracy")[:, :6]
        _band(axes, val, f"{name} val (eval mode)", color=color)
        _band(axes, train_accuracy, f"{name} train (batch statistics, dropout)", color=color, linestyle="--")
    axes.set(title="First epochs: BatchNorm's moving statistics lag (val uses them, train the batch's)",
             xlabel="epoch", ylabel="accuracy")
    axes.title.set_fontsize(10)
    axes.legend()
    finish(figure, (axes,), "batchnorm_lag")
  return written


def _epochs_to(value: Mapping[str, Any], seeds: int) -> str:
  if value["reached"] == 0:
    return "never"
  text = f"{value['mean']:.1f}"
  return text if value["reached"] == seeds else f"{text} ({value['reached']}/{seeds} seeds)"


def _params(facts: Mapping[str, Any]) -> str:
  return f"{facts['trainable']:,}" + (f" + {facts['non_trainable']:,}" if facts["non_trainable"] else "")


def _seconds(value: float | None) -> str:
  if value is None:
    return "n/a"
  return f"{value / 60:.1f} min" if value >= 120 else f"{value:.1f} s"


def _p(value: float) -> str:
  if math.isnan(value):
    return "n/a (no spread)"
  return f"{value:.2g}" if value >= 1e-4 else "< 1e-4"


def _pair(results: Mapping[str, Any], better: str, worse: str) -> dict[str, Any] | None:
  for row in results["pairwise"]:
    if {row["better"], row["worse"]} == {better, worse}:
      return row
  return None


def _pair_sentence(row: Mapping[str, Any] | None) -> str:
  if row is None:
    return ""
  if math.isnan(row["p"]):
    return (f"{row['better']} is ahead of {row['worse']} by {row['difference'] * 100:+.2f} points, with no spread "
            "between seeds to test that against.")
  verdict = "exceeds" if row["exceeds_seed_spread"] else "does not exceed"
  return (f"{row['better']} is ahead of {row['worse']} by {row['difference'] * 100:+.2f} points "
          f"(Welch p = {_p(row['p'])}, 95% bootstrap interval [{row['interval'][0] * 100:+.2f}, "
          f"{row['interval'][1] * 100:+.2f}] points): the difference {verdict} the seed spread.")


def _loss_turn(name: str, entry: Mapping[str, Any]) -> str:
  """Where the mean val loss bottoms out and how far above that it ends: the overfitting signal."""
  loss = _curves(entry, "val_loss").mean(axis=0)
  lowest = int(loss.argmin())
  return (f"{name}'s mean val loss is lowest at epoch {lowest + 1} ({loss[lowest]:.4f}) and ends at "
          f"{loss[-1]:.4f} ({(loss[-1] / loss[lowest] - 1) * 100:+.0f}%).")


def render_report(results: Mapping[str, Any], plots: Mapping[str, str], command: str) -> str:
  """The Markdown report; every number comes from ``results``."""
  entries = results["models"]
  settings = results["settings"]
  seeds = len(settings["seeds"])
  environment = results["environment"]
  first_config = next(iter(entries.values()))["config"]
  lines = [
      "# The notebook's family over several seeds",
      "",
      "## Settings",
      "",
      f"Models {', '.join(entries)}; seeds {', '.join(map(str, settings['seeds']))}; {settings['num_epochs']} epochs; "
      f"batch {first_config['batch_size']}, Adam lr {first_config['learning_rate']}, validation on the 10,000 test "
      f"images after every epoch (as the notebook). {log.describe_hardware(environment)}; platform "
      f"{environment['platform']}; jax {environment['versions']['jax']}, flax {environment['versions']['flax']}, "
      f"optax {environment['versions']['optax']}. Seeds trained by "
      f"{', '.join(sorted({str(entry['seed_parallelism']) for entry in entries.values()}))} "
      "(each seed's run equals its single-seed run). Mean ± std (sample std) over seeds; every per-seed, "
      "per-epoch figure is in results.json.",
      "",
      "## Accuracy over seeds",
      "",
      "| model | best val acc | min / max | best epoch | final val acc | final train acc | train − val gap "
      "| epochs to 98% | epochs to 99% |",
      "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
  ]
  for name, entry in entries.items():
    summary = entry["summary"]
    best = summary["best_val_accuracy"]
    lines.append(
        f"| {name} | {_mean_std(best)} | {best['min']:.4f} / {best['max']:.4f} | {summary['best_epoch']['mean']:.1f} "
        f"| {_mean_std(summary['final_val_accuracy'])} | {_mean_std(summary['final_train_accuracy'])} "
        f"| {summary['train_val_gap']['mean'] * 100:+.2f} ± {summary['train_val_gap']['std'] * 100:.2f} pts "
        f"| {_epochs_to(summary['epochs_to_98'], seeds)} | {_epochs_to(summary['epochs_to_99'], seeds)} |")
  lines += [
      "",
      "Train accuracy is the running accuracy over the epoch with dropout active (as Keras reports it), so "
      "a negative gap does not mean the model fits the test set better than the training set.",
      "",
      "## Cost",
      "",
      "| model | params (trainable + BN statistics) | largest layer (share) | s / epoch (median) | train images/s "
      "| compile | epochs' time, all seeds | wall time, all seeds |",
      "| --- | --- | --- | --- | --- | --- | --- | --- |",
  ]
  for name, entry in entries.items():
    summary, facts = entry["summary"], entry["facts"]
    largest = facts["largest_layer"]
    lines.append(
        f"| {name} | {_params(facts)} | {largest['name']} {largest['trainable']:,} ({largest['share']:.1%}) "
        f"| {summary['seconds_per_epoch']:.2f} | {summary['images_per_second']:,.0f} "
        f"| {_seconds(entry['compile_seconds'])} | {_seconds(summary['epoch_seconds_total'])} "
        f"| {_seconds(entry['wall_seconds'])} |")
  lines += [
      "",
      "An epoch is training on 60,000 images plus evaluating 10,000; the median is over epochs 2 onwards of "
      "every seed; compilation happens once per model for all its seeds and is not in the epoch times. Wall "
      "time includes loading the data, compiling, checkpoints and logs.",
      "",
      "## Plots",
      "",
  ]
  captions = {
      "val_curves": "Validation accuracy and loss per epoch, mean with a ±1 std band over seeds (the accuracy "
                    "axis is zoomed on the last epochs; the loss, on a log scale, shows every epoch).",
      "accuracy_vs_params": "Best val accuracy against parameter count; marker area grows with seconds per epoch.",
      "train_vs_val": "Train (dropout on) against val accuracy per model: where they part, the model overfits.",
      "batchnorm_lag": "The first epochs of cnn_pool and cnn_pool_bn: BatchNorm's val accuracy trails its train "
                       "accuracy while the moving statistics catch up.",
  }
  for key, caption in captions.items():
    if key in plots:
      lines += [f"![{key}]({plots[key]})", "", caption, ""]
    else:
      lines += [f"({key}: needs cnn_pool_bn in the comparison.)", ""]

  ranked = sorted(entries, key=lambda name: -entries[name]["summary"]["best_val_accuracy"]["mean"])
  lines += ["## Are the differences real?", "",
            f"Best val accuracy per seed, every pair of models ({seeds} seeds each): Welch's t-test and a "
            f"percentile bootstrap interval ({BOOTSTRAP_SAMPLES:,} resamples) of the difference in means. "
            "\"Exceeds\" means p < 0.05 and the interval excludes 0.", "",
            "| better | worse | difference (pts) | Welch t | p | 95% interval (pts) | exceeds the seed spread |",
            "| --- | --- | --- | --- | --- | --- | --- |"]
  for row in results["pairwise"]:
    t_value = "n/a" if math.isnan(row["t"]) else f"{row['t']:.2f}"
    lines.append(f"| {row['better']} | {row['worse']} | {row['difference'] * 100:+.2f} | {t_value} | {_p(row['p'])} "
                 f"| [{row['interval'][0] * 100:+.2f}, {row['interval'][1] * 100:+.2f}] "
                 f"| {'yes' if row['exceeds_seed_spread'] else 'no'} |")
  top = ranked[0]
  lines += ["", f"The most accurate model on average is **{top}** "
            f"({_mean_std(entries[top]['summary']['best_val_accuracy'])})."]
  if len(ranked) > 1:
    lines[-1] += " " + _pair_sentence(_pair(results, top, ranked[1]))
  if seeds == 1:
    lines += ["", "With one seed there is no spread to test against: train with --seeds 5 to compare models."]
  elif seeds < 3:
    lines += ["", f"With {seeds} seeds these tests have almost no power; the full report uses 5."]

  lines += ["", "## Accuracy, parameters and speed", "",
            "| model | params | best val acc | best val acc per 100k params | s / epoch | time to 98% val | "
            "time to 99% val |",
            "| --- | --- | --- | --- | --- | --- | --- |"]
  for name in ranked:
    summary, facts = entries[name]["summary"], entries[name]["facts"]
    params = facts["trainable"] + facts["non_trainable"]
    best = summary["best_val_accuracy"]["mean"]
    times = []
    for threshold in THRESHOLDS:
      reached = summary[f"epochs_to_{round(threshold * 100)}"]
      times.append("never" if reached["mean"] is None else
                   f"{reached['mean'] * summary['seconds_per_epoch']:.0f} s" +
                   ("" if reached["reached"] == seeds else f" ({reached['reached']}/{seeds} seeds)"))
    lines.append(f"| {name} | {params:,} | {best:.4f} | {best / params * 1e5:.3f} "
                 f"| {summary['seconds_per_epoch']:.2f} | {times[0]} | {times[1]} |")
  lines += ["", "Time to a val accuracy: the mean epoch that first reaches it (over the seeds that do) times the "
            "median seconds per epoch, compilation excluded."]
  by_params = sorted(entries, key=lambda name: entries[name]["facts"]["trainable"])
  smallest, biggest = by_params[0], by_params[-1]
  fastest = min(entries, key=lambda name: entries[name]["summary"]["seconds_per_epoch"])
  slowest = max(entries, key=lambda name: entries[name]["summary"]["seconds_per_epoch"])
  if biggest == top:
    size_sentence = (f"The largest model, {biggest} ({entries[biggest]['facts']['trainable']:,} params), is also the "
                     "most accurate here.")
  else:
    size_sentence = (f"Accuracy does not follow the parameter count: the largest model, {biggest} "
                     f"({entries[biggest]['facts']['trainable']:,} params, "
                     f"{_mean_std(entries[biggest]['summary']['best_val_accuracy'])}), is not the most accurate; "
                     f"{top} is, with {entries[top]['facts']['trainable']:,} params "
                     f"({entries[biggest]['facts']['trainable'] / entries[top]['facts']['trainable']:.1f}x fewer).")
  if smallest not in (top, biggest):
    size_sentence += f" The smallest, {smallest}, has {entries[smallest]['facts']['trainable']:,}."
  lines += ["", size_sentence + " "
            f"Per epoch, {fastest} is the fastest ({entries[fastest]['summary']['seconds_per_epoch']:.2f} s) and "
            f"{slowest} the slowest ({entries[slowest]['summary']['seconds_per_epoch']:.2f} s, "
            f"{entries[slowest]['summary']['seconds_per_epoch'] / entries[fastest]['summary']['seconds_per_epoch']:.0f}x): "
            "time follows the arithmetic (convolutions over whole feature maps), not the parameter count."]

  lines += ["", "## Which layer holds the parameters", "",
            "| model | largest layer | its input | formula: units × (inputs + 1 bias) | share of the model |",
            "| --- | --- | --- | --- | --- |"]
  for name, entry in entries.items():
    largest = entry["facts"]["largest_layer"]
    lines.append(f"| {name} | {largest['name']} ({largest['type']}) | {' × '.join(map(str, largest['input_shape']))} "
                 f"| {largest['formula']} | {largest['share']:.1%} |")
  if "cnn" in entries:
    largest = entries["cnn"]["facts"]["largest_layer"]
    flatten = next(layer for layer in entries["cnn"]["facts"]["layers"] if layer["type"] == "Flatten")
    lines += ["", f"In the cnn, {largest['name']} holds {largest['share']:.1%} of the parameters: it connects every "
              f"one of the {' × '.join(map(str, flatten['input_shape']))} = {flatten['output_shape'][0]:,} values of "
              "the last feature map to each of its units, and the convolutions before it keep the 28 × 28 "
              "resolution almost whole (valid 3 × 3 convolutions only trim the borders). A convolution's count "
              "does not depend on the image size, only on its kernel and channels."]

  lines += ["", "## What max-pooling buys", ""]
  if {"cnn", "cnn_pool"} <= entries.keys():
    cnn, pool = entries["cnn"], entries["cnn_pool"]
    pool_flatten = next(layer for layer in pool["facts"]["layers"] if layer["type"] == "Flatten")
    lines += [f"Two 2 × 2 max-pools shrink the flattened features to {pool_flatten['output_shape'][0]:,}, so the "
              f"params fall from {cnn['facts']['trainable']:,} to {pool['facts']['trainable']:,} "
              f"({pool['facts']['trainable'] / cnn['facts']['trainable']:.1%}) and an epoch from "
              f"{cnn['summary']['seconds_per_epoch']:.2f} s to {pool['summary']['seconds_per_epoch']:.2f} s "
              f"({cnn['summary']['seconds_per_epoch'] / pool['summary']['seconds_per_epoch']:.1f}x faster: the "
              "second convolution runs on a quarter of the positions). Best val accuracy: cnn "
              f"{_mean_std(cnn['summary']['best_val_accuracy'])}, cnn_pool {_mean_std(pool['summary']['best_val_accuracy'])}. "
              + _pair_sentence(_pair(results, "cnn", "cnn_pool")) + " Train − val gap at the last epoch: cnn "
              f"{cnn['summary']['train_val_gap']['mean'] * 100:+.2f} pts, cnn_pool "
              f"{pool['summary']['train_val_gap']['mean'] * 100:+.2f} pts. " + " ".join(
                  _loss_turn(name, entries[name]) for name in ("cnn", "cnn_pool"))]
  else:
    lines.append("(Needs cnn and cnn_pool in the comparison.)")

  lines += ["", "## What BatchNorm and Dropout buy", ""]
  if {"cnn_pool", "cnn_pool_bn"} <= entries.keys():
    pool, bn = entries["cnn_pool"], entries["cnn_pool_bn"]
    early = lambda entry: ", ".join(f"{value['mean']:.4f}" for value in entry["summary"]["early_val_accuracy"])
    lines += [f"cnn_pool_bn adds BatchNorm after each pool and dense layer and more Dropout (0.2 after each pool, 0.5 "
              f"instead of 0.2 in the head): {bn['facts']['trainable'] - pool['facts']['trainable']:,} more trainable "
              f"params (BatchNorm's scale and bias) and {bn['facts']['non_trainable']:,} moving statistics; an epoch "
              f"takes {bn['summary']['seconds_per_epoch']:.2f} s against {pool['summary']['seconds_per_epoch']:.2f} s "
              f"({bn['summary']['seconds_per_epoch'] / pool['summary']['seconds_per_epoch']:.2f}x). Best val accuracy: "
              f"cnn_pool {_mean_std(pool['summary']['best_val_accuracy'])}, cnn_pool_bn "
              f"{_mean_std(bn['summary']['best_val_accuracy'])}. " + _pair_sentence(_pair(results, "cnn_pool", "cnn_pool_bn")),
              "",
              f"Regularisation: the last epoch's train − val gap is {pool['summary']['train_val_gap']['mean'] * 100:+.2f} "
              f"pts for cnn_pool and {bn['summary']['train_val_gap']['mean'] * 100:+.2f} pts for cnn_pool_bn (train "
              "accuracy measured with dropout on, so heavier dropout alone pushes it down).",
              "",
              f"The first {len(bn['summary']['early_val_accuracy'])} epochs' mean val accuracy: cnn_pool {early(pool)}; "
              f"cnn_pool_bn {early(bn)}. Validation uses BatchNorm's moving statistics, which start at mean 0, "
              "variance 1 and move 1% of the way to each batch's statistics per step (momentum 0.99): after the "
              f"118 steps of epoch 1 they still carry 0.99^118 = {0.99 ** 118:.0%} of their initial values, so "
              "early val accuracy trails what the network does in training mode.",
              "",
              "What the family cannot say: BatchNorm and the extra Dropout arrive together in one model, and every "
              "model already has Dropout 0.2 in its dense head, so their separate effects are not measured here "
              "(a cnn_pool with only BatchNorm, or only the extra Dropout, would be the experiment)."]
  else:
    lines.append("(Needs cnn_pool and cnn_pool_bn in the comparison.)")

  lines += ["", "## The notebook's re-training mistake", "",
            "The notebook builds the BatchNorm + Dropout model (`model_with_dropout_bn`) and prints its summary, "
            "but the training cell that follows (In [21]) calls `train_model(model_cnn_mnist, ...)`: it trains the "
            "first CNN again, from the weights its first 20 epochs left (In [9]), and prints that model's train "
            "and val accuracy under the new heading. The pooled model (`model_cnn_mnist_v2`) has no training cell "
            "in the notebook as we have it. So the notebook's answers about pooling, BatchNorm and Dropout rest on "
            "no measurement of those models; here each model is trained from scratch from every seed, and the "
            "sections above compare them."]
  lines += ["", "## Reproduce", "", "```", command, "```", "",
            "Per-seed workdirs (checkpoints, TensorBoard logs) are left in the training workdir, not here."]
  return "\n".join(lines) + "\n"


def write_report(results: dict[str, Any], out_dir: str | os.PathLike, *, command: str) -> Path:
  """Writes results.json, the PNGs and report.md into ``out_dir``; returns the report's path."""
  out_dir = Path(out_dir)
  out_dir.mkdir(parents=True, exist_ok=True)
  plots = write_plots(results, out_dir)
  results = {**results, "command": command, "plots": plots}
  train.write_json(out_dir / RESULTS_FILE, results)
  path = out_dir / REPORT_FILE
  temporary = path.with_suffix(".md.tmp")
  temporary.write_text(render_report(results, plots, command))
  os.replace(temporary, path)
  return path
