"""The study's PNG plots, drawn with matplotlib's Agg backend (files only) from the results."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from flax_mnist.study import stats

PLOTS = {
  "val_curves": "val_curves.png",
  "accuracy_vs_params": "accuracy_vs_params.png",
  "train_vs_val": "train_vs_val.png",
  "batchnorm_lag": "batchnorm_lag.png",
}
# A plot drawn only when the comparison has this model.
NEEDS = {"batchnorm_lag": "cnn_pool_bn"}
BATCHNORM_LAG_EPOCHS = 6

Entries = Mapping[str, Mapping[str, Any]]
# Draws one figure: (pyplot, entries, number of seeds) -> (figure, its axes, epochs on the x axis).
Draw = Callable[[Any, Entries, int], tuple[Any, Sequence[Any], bool]]


def _band(
  axes: Any, values: np.ndarray, label: str, epochs: np.ndarray | None = None, **style: Any
) -> None:
  """The mean over seeds (rows of ``values``) per epoch, with a ±1 sample-std band."""
  epochs = np.arange(1, values.shape[1] + 1) if epochs is None else epochs
  mean = values.mean(axis=0)
  std = values.std(axis=0, ddof=1) if values.shape[0] > 1 else np.zeros(values.shape[1])
  (line,) = axes.plot(epochs, mean, marker="o", markersize=3, label=label, **style)
  axes.fill_between(epochs, mean - std, mean + std, color=line.get_color(), alpha=0.2)


def _val_curves(plt: Any, entries: Entries, seeds: int) -> tuple[Any, Sequence[Any], bool]:
  figure, (accuracy_axes, loss_axes) = plt.subplots(1, 2, figsize=(12, 4.5))
  for name, entry in entries.items():
    _band(accuracy_axes, stats.curves(entry, "val_accuracy"), name)
    _band(loss_axes, stats.curves(entry, "val_loss"), name)
  # Zoom on where the models end up; the first epochs below the axis show in the loss plot.
  summaries = [entry["summary"] for entry in entries.values()]
  floor = min(summary["final_val_accuracy"]["mean"] for summary in summaries) - 0.01
  ceiling = max(summary["best_val_accuracy"]["max"] for summary in summaries) + 0.003
  low, high = accuracy_axes.get_ylim()
  accuracy_axes.set_ylim(max(floor, low), min(ceiling, high))
  axis_from = accuracy_axes.get_ylim()[0]
  accuracy_axes.set(
    title=f"Validation accuracy (mean ± std over {seeds} seeds)",
    xlabel="epoch",
    ylabel=f"val accuracy (axis from {axis_from:.3f})",
  )
  loss_axes.set_yscale("log")
  loss_axes.set(
    title=f"Validation loss (mean ± std over {seeds} seeds)",
    xlabel="epoch",
    ylabel="val loss (log)",
  )
  accuracy_axes.legend()
  loss_axes.legend()
  return figure, (accuracy_axes, loss_axes), True


def _accuracy_vs_params(plt: Any, entries: Entries, seeds: int) -> tuple[Any, Sequence[Any], bool]:
  figure, axes = plt.subplots(figsize=(7.5, 5))
  slowest = max(entry["summary"]["seconds_per_epoch"] for entry in entries.values())
  for name, entry in entries.items():
    seconds = entry["summary"]["seconds_per_epoch"]
    params = stats.total_params(entry["facts"])
    best = entry["summary"]["best_val_accuracy"]
    axes.errorbar(params, best["mean"], yerr=best["std"], fmt="none", ecolor="gray", capsize=4)
    axes.scatter(params, best["mean"], s=60 + 600 * seconds / slowest, alpha=0.7)
    axes.annotate(
      f"{name}\n{seconds:.2f} s/epoch",
      (params, best["mean"]),
      textcoords="offset points",
      xytext=(10, -12),
      fontsize=9,
    )
  axes.set_xscale("log")
  axes.margins(x=0.3, y=0.15)
  axes.set(
    title="Best val accuracy vs parameters (marker area: seconds per epoch)",
    xlabel="parameters (log scale)",
    ylabel=f"best val accuracy (mean ± std, {seeds} seeds)",
  )
  return figure, (axes,), False


def _train_vs_val(plt: Any, entries: Entries, seeds: int) -> tuple[Any, Sequence[Any], bool]:
  figure, grid = plt.subplots(
    1, len(entries), figsize=(4 * len(entries), 3.8), squeeze=False, sharey=True
  )
  for axes, (name, entry) in zip(grid[0], entries.items(), strict=True):
    _band(axes, stats.curves(entry, "train_accuracy"), "train (with dropout)")
    _band(axes, stats.curves(entry, "val_accuracy"), "val")
    axes.set(title=name, xlabel="epoch")
  grid[0][0].set_ylabel("accuracy")
  grid[0][0].set_ylim(0.9, 1.0)
  grid[0][0].legend(loc="lower right")
  figure.suptitle(f"Train vs val accuracy (mean ± std over {seeds} seeds)")
  return figure, grid[0], True


def _batchnorm_lag(plt: Any, entries: Entries, seeds: int) -> tuple[Any, Sequence[Any], bool]:
  del seeds
  figure, axes = plt.subplots(figsize=(7.5, 4.5))
  for name, color in (("cnn_pool", "tab:green"), ("cnn_pool_bn", "tab:red")):
    if name in entries:
      val = stats.curves(entries[name], "val_accuracy")[:, :BATCHNORM_LAG_EPOCHS]
      train = stats.curves(entries[name], "train_accuracy")[:, :BATCHNORM_LAG_EPOCHS]
      _band(axes, val, f"{name} val (eval mode)", color=color)
      _band(axes, train, f"{name} train (batch statistics, dropout)", color=color, linestyle="--")
  axes.set(
    title="First epochs: BatchNorm's moving statistics lag (val uses them, train the batch's)",
    xlabel="epoch",
    ylabel="accuracy",
  )
  axes.title.set_fontsize(10)
  axes.legend()
  return figure, (axes,), True


_DRAW: dict[str, Draw] = {
  "val_curves": _val_curves,
  "accuracy_vs_params": _accuracy_vs_params,
  "train_vs_val": _train_vs_val,
  "batchnorm_lag": _batchnorm_lag,
}


def _save(plt: Any, figure: Any, axes_list: Sequence[Any], path: Path, epochs_on_x: bool) -> None:
  from matplotlib.ticker import MaxNLocator

  for axes in axes_list:
    axes.grid(alpha=0.3)
    if epochs_on_x:
      axes.xaxis.set_major_locator(MaxNLocator(integer=True))
  figure.tight_layout()
  figure.savefig(path, dpi=110)
  plt.close(figure)


def write_plots(results: Mapping[str, Any], out_dir: str | Path) -> dict[str, str]:
  """Writes the PNGs into ``out_dir``; returns {plot: file name} of those written (a plot whose
  model, ``NEEDS``, is not in the comparison is left out)."""
  import matplotlib

  matplotlib.use("Agg")  # Files only.
  import matplotlib.pyplot as plt

  entries = results["models"]
  seeds = len(results["settings"]["seeds"])
  written = {}
  for key, draw in _DRAW.items():
    if key in NEEDS and NEEDS[key] not in entries:
      continue
    figure, axes_list, epochs_on_x = draw(plt, entries, seeds)
    _save(plt, figure, axes_list, Path(out_dir) / PLOTS[key], epochs_on_x)
    written[key] = PLOTS[key]
  return written
