"""report.md: the words around the study's figures. Each section is a small function that turns
the results, and the figures ``stats.report_figures`` derives from them, into paragraphs (a
table is one paragraph); ``formats`` turns numbers into text. No number is computed here.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Any

from flax_mnist import log
from flax_mnist.study import plots, stats
from flax_mnist.study.formats import (
  epochs_to,
  interval,
  mean_std,
  p_value,
  params,
  percent_change,
  points,
  seconds,
  shape,
  table,
  time_to,
)

TITLE = "# The notebook's family over several seeds"
CAPTIONS = {
  "val_curves": "Validation accuracy and loss per epoch, mean with a ±1 std band over seeds (the "
  "accuracy axis is zoomed on the last epochs; the loss, on a log scale, shows every epoch).",
  "accuracy_vs_params": "Best val accuracy against parameter count; marker area grows with "
  "seconds per epoch.",
  "train_vs_val": "Train (dropout on) against val accuracy per model: where they part, the model "
  "overfits.",
  "batchnorm_lag": "The first epochs of cnn_pool and cnn_pool_bn: BatchNorm's val accuracy trails "
  "its train accuracy while the moving statistics catch up.",
}

Results = Mapping[str, Any]
Figures = Mapping[str, Any]  # stats.report_figures(results)


def _pair_sentence(row: Mapping[str, Any] | None) -> str:
  """Whether one model's lead over another exceeds the seed spread, in words."""
  if row is None:
    return ""
  lead = f"{row['better']} is ahead of {row['worse']} by {points(row['difference'])} points"
  if math.isnan(row["p"]):
    return f"{lead}, with no spread between seeds to test that against."
  verdict = "exceeds" if row["exceeds_seed_spread"] else "does not exceed"
  return (
    f"{lead} (Welch p = {p_value(row['p'])}, {stats.LEVEL:.0%} bootstrap interval {interval(row)} "
    f"points): the difference {verdict} the seed spread."
  )


# ---------------------------------------------------------------------------------------------
# The sections: (results, figures) -> paragraphs.


# config.optimizer as the report names it.
OPTIMIZER_NAMES = {"adam": "Adam", "keras_adam": "Adam as Keras computes it (keras_adam)"}


def _settings(results: Results, figures: Figures) -> list[str]:
  settings, environment = results["settings"], results["environment"]
  config = next(iter(results["models"].values()))["config"]
  versions = environment["versions"]
  return [
    f"Models {', '.join(results['models'])}; seeds {', '.join(map(str, settings['seeds']))}; "
    f"{settings['num_epochs']} epochs; batch {config['batch_size']}, "
    f"{OPTIMIZER_NAMES.get(config['optimizer'], config['optimizer'])} lr "
    f"{config['learning_rate']}, validation on the 10,000 test images after every epoch (as the "
    f"notebook). {log.describe_hardware(environment)}; platform {environment['platform']}; jax "
    f"{versions['jax']}, flax {versions['flax']}, optax {versions['optax']}. Seeds trained by "
    f"{', '.join(figures['seed_parallelisms'])} (each seed's run equals its single-seed run). "
    "Mean ± std (sample std) over seeds; every per-seed, per-epoch figure is in results.json."
  ]


_GAP_NOTE = (
  "Train accuracy is the running accuracy over the epoch with dropout active (as Keras reports "
  "it), so a negative gap does not mean the model fits the test set better than the training "
  "set."
)
_COST_NOTE = (
  "An epoch is training on 60,000 images plus evaluating 10,000; the median is over epochs 2 "
  "onwards of every seed; compilation happens once per model for all its seeds and is not in "
  "the epoch times. Wall time includes loading the data, compiling, checkpoints and logs."
)


def _accuracy(results: Results, figures: Figures) -> list[str]:
  del figures
  seeds = len(results["settings"]["seeds"])
  thresholds = " | ".join(f"epochs to {threshold:.0%}" for threshold in stats.THRESHOLDS)
  header = (
    "model | best val acc | min / max | best epoch | final val acc | final train acc "
    f"| train − val gap | {thresholds}"
  )
  rows = []
  for name, entry in results["models"].items():
    summary = entry["summary"]
    best, gap = summary["best_val_accuracy"], summary["train_val_gap"]
    rows.append(
      [
        name,
        mean_std(best),
        f"{best['min']:.4f} / {best['max']:.4f}",
        f"{summary['best_epoch']['mean']:.1f}",
        mean_std(summary["final_val_accuracy"]),
        mean_std(summary["final_train_accuracy"]),
        f"{points(gap['mean'])} ± {points(gap['std'], signed=False)} pts",
        *(
          epochs_to(summary[stats.epochs_to_key(threshold)], seeds)
          for threshold in stats.THRESHOLDS
        ),
      ]
    )
  return [table(header, rows), _GAP_NOTE]


def _cost(results: Results, figures: Figures) -> list[str]:
  del figures
  header = (
    "model | params (trainable + BN statistics) | largest layer (share) | s / epoch (median) "
    "| train images/s | compile | epochs' time, all seeds | wall time, all seeds"
  )
  rows = []
  for name, entry in results["models"].items():
    summary, largest = entry["summary"], entry["facts"]["largest_layer"]
    rows.append(
      [
        name,
        params(entry["facts"]),
        f"{largest['name']} {largest['trainable']:,} ({largest['share']:.1%})",
        f"{summary['seconds_per_epoch']:.2f}",
        f"{summary['images_per_second']:,.0f}",
        seconds(entry["compile_seconds"]),
        seconds(summary["epoch_seconds_total"]),
        seconds(entry["wall_seconds"]),
      ]
    )
  return [table(header, rows), _COST_NOTE]


def _plots(results: Results, figures: Figures) -> list[str]:
  del figures
  paragraphs = []
  for key, caption in CAPTIONS.items():
    if key in results["plots"]:
      paragraphs += [f"![{key}]({results['plots'][key]})", caption]
    else:
      paragraphs.append(f"({key}: needs {plots.NEEDS[key]} in the comparison.)")
  return paragraphs


def _differences(results: Results, figures: Figures) -> list[str]:
  entries, top = results["models"], figures["ranked"][0]
  seeds = len(results["settings"]["seeds"])
  header = (
    f"better | worse | difference (pts) | Welch t | p | {stats.LEVEL:.0%} interval (pts) "
    "| exceeds the seed spread"
  )
  rows = [
    [
      row["better"],
      row["worse"],
      points(row["difference"]),
      "n/a" if math.isnan(row["t"]) else f"{row['t']:.2f}",
      p_value(row["p"]),
      interval(row),
      "yes" if row["exceeds_seed_spread"] else "no",
    ]
    for row in results["pairwise"]
  ]
  verdict = (
    f"The most accurate model on average is **{top}** "
    f"({mean_std(entries[top]['summary']['best_val_accuracy'])})."
  )
  if len(figures["ranked"]) > 1:
    verdict += " " + _pair_sentence(stats.pair(results, top, figures["ranked"][1]))
  paragraphs = [
    f"Best val accuracy per seed, every pair of models ({seeds} seeds each): Welch's t-test and "
    f"a percentile bootstrap interval ({stats.BOOTSTRAP_SAMPLES:,} resamples) of the difference "
    f'in means. "Exceeds" means p < {stats.ALPHA:g} and the interval excludes 0.',
    table(header, rows),
    verdict,
  ]
  if seeds == 1:
    paragraphs.append(
      "With one seed there is no spread to test against: train with --seeds 5 to compare models."
    )
  elif seeds < 3:
    paragraphs.append(
      f"With {seeds} seeds these tests have almost no power; the full report uses 5."
    )
  return paragraphs


def _size_sentence(results: Results, figures: Figures) -> str:
  entries, extremes = results["models"], figures["size_and_speed"]
  top, biggest, smallest = extremes["top"], extremes["biggest"], extremes["smallest"]
  if biggest == top:
    sentence = (
      f"The largest model, {biggest} ({entries[biggest]['facts']['trainable']:,} params), is also "
      "the most accurate here."
    )
  else:
    sentence = (
      f"Accuracy does not follow the parameter count: the largest model, {biggest} "
      f"({entries[biggest]['facts']['trainable']:,} params, "
      f"{mean_std(entries[biggest]['summary']['best_val_accuracy'])}), is not the most "
      f"accurate; {top} is, with {entries[top]['facts']['trainable']:,} params "
      f"({extremes['biggest_over_top_params']:.1f}x fewer)."
    )
  if smallest not in (top, biggest):
    sentence += f" The smallest, {smallest}, has {entries[smallest]['facts']['trainable']:,}."
  return sentence


def _efficiency(results: Results, figures: Figures) -> list[str]:
  entries, extremes = results["models"], figures["size_and_speed"]
  seeds = len(results["settings"]["seeds"])
  thresholds = " | ".join(f"time to {threshold:.0%} val" for threshold in stats.THRESHOLDS)
  header = (
    f"model | params | best val acc | best val acc per 100k params | s / epoch | {thresholds}"
  )
  rows = [
    [
      row["name"],
      f"{row['params']:,}",
      f"{row['best']:.4f}",
      f"{row['best_per_100k_params']:.3f}",
      f"{row['seconds_per_epoch']:.2f}",
      *(time_to(reach, seeds) for reach in row["time_to"]),
    ]
    for row in figures["efficiency"]
  ]
  fastest, slowest = extremes["fastest"], extremes["slowest"]
  speed = (
    f"Per epoch, {fastest} is the fastest ({entries[fastest]['summary']['seconds_per_epoch']:.2f} "
    f"s) and {slowest} the slowest ({entries[slowest]['summary']['seconds_per_epoch']:.2f} s, "
    f"{extremes['slowest_over_fastest_seconds']:.0f}x): time follows the arithmetic "
    "(convolutions over whole feature maps), not the parameter count."
  )
  return [
    table(header, rows),
    "Time to a val accuracy: the mean epoch that first reaches it (over the seeds that do) times "
    "the median seconds per epoch, compilation excluded.",
    _size_sentence(results, figures) + " " + speed,
  ]


def _largest_layers(results: Results, figures: Figures) -> list[str]:
  header = (
    "model | largest layer | its input | formula: units × (inputs + 1 bias) | share of the model"
  )
  rows = []
  for name, entry in results["models"].items():
    largest = entry["facts"]["largest_layer"]
    rows.append(
      [
        name,
        f"{largest['name']} ({largest['type']})",
        shape(largest["input_shape"]),
        largest["formula"],
        f"{largest['share']:.1%}",
      ]
    )
  paragraphs = [table(header, rows)]
  bottleneck = figures["cnn_bottleneck"]
  if bottleneck:
    largest = bottleneck["largest_layer"]
    paragraphs.append(
      f"In the cnn, {largest['name']} holds {largest['share']:.1%} of the parameters: it "
      f"connects every one of the {shape(bottleneck['feature_map'])} = "
      f"{bottleneck['features']:,} values of the last feature map to each of its units, and the "
      "convolutions before it keep the 28 × 28 resolution almost whole (valid 3 × 3 convolutions "
      "only trim the borders). A convolution's count does not depend on the image size, only on "
      "its kernel and channels."
    )
  return paragraphs


def _loss_turn(name: str, turn: Mapping[str, Any]) -> str:
  return (
    f"{name}'s mean val loss is lowest at epoch {turn['epoch']} ({turn['lowest']:.4f}) and ends "
    f"at {turn['final']:.4f} ({percent_change(turn['rise'])})."
  )


def _pooling(results: Results, figures: Figures) -> list[str]:
  pooling = figures["pooling"]
  if pooling is None:
    return ["(Needs cnn and cnn_pool in the comparison.)"]
  cnn, pool = results["models"]["cnn"], results["models"]["cnn_pool"]
  sentences = [
    f"Two 2 × 2 max-pools shrink the flattened features to {pooling['features']:,}, so the "
    f"params fall from {cnn['facts']['trainable']:,} to {pool['facts']['trainable']:,} "
    f"({pooling['params_share']:.1%}) and an epoch from "
    f"{cnn['summary']['seconds_per_epoch']:.2f} s to {pool['summary']['seconds_per_epoch']:.2f} s "
    f"({pooling['speedup']:.1f}x faster: the second convolution runs on a quarter of the "
    "positions).",
    f"Best val accuracy: cnn {mean_std(cnn['summary']['best_val_accuracy'])}, cnn_pool "
    f"{mean_std(pool['summary']['best_val_accuracy'])}.",
    _pair_sentence(pooling["pair"]),
    "Train − val gap at the last epoch: cnn "
    f"{points(cnn['summary']['train_val_gap']['mean'])} pts, cnn_pool "
    f"{points(pool['summary']['train_val_gap']['mean'])} pts.",
    *(_loss_turn(name, turn) for name, turn in pooling["loss_turns"].items()),
  ]
  return [" ".join(sentences)]


def _early(entry: Mapping[str, Any]) -> str:
  return ", ".join(f"{value['mean']:.4f}" for value in entry["summary"]["early_val_accuracy"])


def _batchnorm(results: Results, figures: Figures) -> list[str]:
  bn_figures = figures["batchnorm"]
  if bn_figures is None:
    return ["(Needs cnn_pool and cnn_pool_bn in the comparison.)"]
  pool, bn = results["models"]["cnn_pool"], results["models"]["cnn_pool_bn"]
  momentum, steps = bn_figures["momentum"], bn_figures["first_epoch_steps"]
  changes = [
    "cnn_pool_bn adds BatchNorm after each pool and dense layer and more Dropout (0.2 after each "
    f"pool, 0.5 instead of 0.2 in the head): {bn_figures['extra_trainable']:,} more trainable "
    f"params (BatchNorm's scale and bias) and {bn['facts']['non_trainable']:,} moving "
    f"statistics; an epoch takes {bn['summary']['seconds_per_epoch']:.2f} s against "
    f"{pool['summary']['seconds_per_epoch']:.2f} s ({bn_figures['seconds_ratio']:.2f}x).",
    f"Best val accuracy: cnn_pool {mean_std(pool['summary']['best_val_accuracy'])}, "
    f"cnn_pool_bn {mean_std(bn['summary']['best_val_accuracy'])}.",
    _pair_sentence(bn_figures["pair"]),
  ]
  return [
    " ".join(changes),
    "Regularisation: the last epoch's train − val gap is "
    f"{points(pool['summary']['train_val_gap']['mean'])} pts for cnn_pool and "
    f"{points(bn['summary']['train_val_gap']['mean'])} pts for cnn_pool_bn (train accuracy "
    "measured with dropout on, so heavier dropout alone pushes it down).",
    f"The first {bn_figures['early_epochs']} epochs' mean val accuracy: cnn_pool {_early(pool)}; "
    f"cnn_pool_bn {_early(bn)}. Validation uses BatchNorm's moving statistics, which start at "
    f"mean 0, variance 1 and move {bn_figures['step_weight']:.0%} of the way to each batch's "
    f"statistics per step (momentum {momentum:g}): after the {steps} steps of epoch 1 they "
    f"still carry {momentum:g}^{steps} = {bn_figures['first_epoch_carry']:.0%} of their initial "
    "values, so early val accuracy trails what the network does in training mode.",
    "What the family cannot say: BatchNorm and the extra Dropout arrive together in one model, "
    "and every model already has Dropout 0.2 in its dense head, so their separate effects are "
    "not measured here (a cnn_pool with only BatchNorm, or only the extra Dropout, would be the "
    "experiment).",
  ]


def _retraining_mistake(results: Results, figures: Figures) -> list[str]:
  del results, figures
  return [
    "The notebook builds the BatchNorm + Dropout model (`model_with_dropout_bn`) and prints its "
    "summary, but the training cell that follows (In [21]) calls `train_model(model_cnn_mnist, "
    "...)`: it trains the first CNN again, from the weights its first 20 epochs left (In [9]), "
    "and prints that model's train and val accuracy under the new heading. The pooled model "
    "(`model_cnn_mnist_v2`) has no training cell in the notebook as we have it. So the "
    "notebook's answers about pooling, BatchNorm and Dropout rest on no measurement of those "
    "models; here each model is trained from scratch from every seed, and the sections above "
    "compare them."
  ]


def _reproduce(results: Results, figures: Figures) -> list[str]:
  del figures
  return [
    f"```\n{results['command']}\n```",
    "Per-seed workdirs (checkpoints, TensorBoard logs) are left in the training workdir, not here.",
  ]


_SECTIONS: tuple[tuple[str, Callable[[Results, Figures], list[str]]], ...] = (
  ("Settings", _settings),
  ("Accuracy over seeds", _accuracy),
  ("Cost", _cost),
  ("Plots", _plots),
  ("Are the differences real?", _differences),
  ("Accuracy, parameters and speed", _efficiency),
  ("Which layer holds the parameters", _largest_layers),
  ("What max-pooling buys", _pooling),
  ("What BatchNorm and Dropout buy", _batchnorm),
  ("The notebook's re-training mistake", _retraining_mistake),
  ("Reproduce", _reproduce),
)
# The report's sections, in order (CI checks that each appears).
SECTIONS = tuple(title for title, _ in _SECTIONS)


def render_report(results: Results) -> str:
  """The Markdown report of ``results`` (with its ``plots`` and ``command``, as write_report
  stores them); every number comes from the results, through ``stats.report_figures``."""
  figures = stats.report_figures(results)
  sections = [
    "\n\n".join([f"## {title}", *render(results, figures)]) for title, render in _SECTIONS
  ]
  return "\n\n".join([TITLE, *sections]) + "\n"
