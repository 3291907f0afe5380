"""The study's numbers: each model's figures over seeds, the pairwise tests, the models' parameter
facts, and every derived figure the report's sentences quote (ratios, times, loss turns), so
that ``render`` only formats. Plain data in, plain data out: no training modules imported.
"""

from __future__ import annotations

import itertools
import math
import statistics
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import numpy as np
from flax import nnx
from scipy import stats as scipy_stats

from flax_mnist import history, log, models

THRESHOLDS = (0.98, 0.99)  # Val accuracies whose first epoch is counted.
BOOTSTRAP_SAMPLES = 10_000
LEVEL = 0.95  # Of the bootstrap interval.
ALPHA = 0.05  # Welch's p below this (and an interval excluding 0): the difference is real.
EARLY_EPOCHS = 3  # The BatchNorm lag shows in these.
TRAIN_IMAGES = 60_000  # MNIST's training set: an epoch's steps are ceil(this / batch size).
BATCHNORM_MOMENTUM = 0.99  # models' BatchNorm (Keras's default).

Entry = Mapping[str, Any]  # One model's results: facts, config, histories, summary, ...


# ---------------------------------------------------------------------------------------------
# Each model's figures over seeds.


def epochs_to_reach(records: Sequence[Mapping[str, Any]], threshold: float) -> int | None:
  """The first epoch whose val accuracy is at least ``threshold``; None if none is."""
  return next((record["epoch"] for record in records if record["val_accuracy"] >= threshold), None)


def epochs_to_key(threshold: float) -> str:
  """The summary's key of the epochs to reach val accuracy ``threshold``: "epochs_to_98"."""
  percent = round(threshold * 100)
  return f"epochs_to_{percent}"


def _seed_epoch_seconds(record: Mapping[str, Any]) -> float:
  """One seed's epoch (train + eval); under vmap, the seeds' shared epoch over their number."""
  return record["seconds"] / record["parallel_seeds"]


def _epochs_to(runs: Sequence[Sequence[Mapping[str, Any]]], threshold: float) -> dict[str, Any]:
  reached = [epochs_to_reach(records, threshold) for records in runs]
  hits = [epoch for epoch in reached if epoch is not None]
  return {"per_seed": reached, "reached": len(hits), "mean": float(np.mean(hits)) if hits else None}


def summarize_model(histories: Mapping[Any, Sequence[Mapping[str, Any]]]) -> dict[str, Any]:
  """Figures over seeds of one model's histories ({seed: history}): mean/std/min/max of each."""
  runs = [records for records in histories.values() if records]
  best = [history.best_record(records) for records in runs]
  final = [records[-1] for records in runs]
  steady = [record for records in runs for record in history.steady(records)]
  num_epochs = min(len(records) for records in runs)
  summary = {
    "num_seeds": len(runs),
    "num_epochs": num_epochs,
    "best_val_accuracy": history.spread([record["val_accuracy"] for record in best]),
    "best_epoch": history.spread([record["epoch"] for record in best]),
    "final_val_accuracy": history.spread([record["val_accuracy"] for record in final]),
    "final_val_loss": history.spread([record["val_loss"] for record in final]),
    "final_train_accuracy": history.spread([record["train_accuracy"] for record in final]),
    "train_val_gap": history.spread(
      [record["train_accuracy"] - record["val_accuracy"] for record in final]
    ),
    "early_val_accuracy": [
      history.spread([records[epoch]["val_accuracy"] for records in runs])
      for epoch in range(min(EARLY_EPOCHS, num_epochs))
    ],
    "seconds_per_epoch": statistics.median(_seed_epoch_seconds(record) for record in steady),
    "images_per_second": statistics.median(record["images_per_second"] for record in steady),
    "epoch_seconds_total": sum(
      _seed_epoch_seconds(record) for records in runs for record in records
    ),
  }
  for threshold in THRESHOLDS:
    summary[epochs_to_key(threshold)] = _epochs_to(runs, threshold)
  return summary


# ---------------------------------------------------------------------------------------------
# Are the differences between models larger than the seed spread?


def bootstrap_interval(
  first: Sequence[float],
  second: Sequence[float],
  *,
  samples: int = BOOTSTRAP_SAMPLES,
  level: float = LEVEL,
  seed: int = 0,
) -> tuple[float, float]:
  """Percentile bootstrap interval of mean(first) - mean(second), resampling each group's seeds."""
  rng = np.random.default_rng(seed)
  first, second = np.asarray(first, np.float64), np.asarray(second, np.float64)
  draws = rng.choice(first, (samples, first.size)).mean(axis=1) - rng.choice(
    second, (samples, second.size)
  ).mean(axis=1)
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


def pairwise_tests(
  best_by_model: Mapping[str, Sequence[float]], *, alpha: float = ALPHA
) -> list[dict[str, Any]]:
  """Every pair of models, the more accurate first: difference of mean best val accuracy, Welch's
  test and a 95% bootstrap interval. ``exceeds_seed_spread``: p < alpha and the interval
  excludes 0.
  """
  rows = []
  for first, second in itertools.combinations(best_by_model, 2):
    if np.mean(best_by_model[second]) > np.mean(best_by_model[first]):
      first, second = second, first
    t_statistic, p_value = welch_test(best_by_model[first], best_by_model[second])
    low, high = bootstrap_interval(best_by_model[first], best_by_model[second])
    difference = np.mean(best_by_model[first]) - np.mean(best_by_model[second])
    exceeds = not math.isnan(p_value) and bool(p_value < alpha and low > 0)
    rows.append(
      {
        "better": first,
        "worse": second,
        "difference": float(difference),
        "t": t_statistic,
        "p": p_value,
        "interval": [low, high],
        "exceeds_seed_spread": exceeds,
      }
    )
  return rows


def pair(results: Mapping[str, Any], first: str, second: str) -> dict[str, Any] | None:
  """The pairwise row of models ``first`` and ``second`` (in either order); None if absent."""
  for row in results["pairwise"]:
    if {row["better"], row["worse"]} == {first, second}:
      return row
  return None


# ---------------------------------------------------------------------------------------------
# The models' parameters.


def layer_formula(layer: nnx.Module, params: int) -> str:
  """How a layer's trainable count arises: ``units × (fan-in + 1) = count`` for a layer with one
  kernel, 2-D (dense: in, out) or 4-D (conv, HWIO: h·w·in, out), and a bias; else the count.
  """
  shapes = [np.shape(leaf) for leaf in jax.tree_util.tree_leaves(nnx.state(layer, nnx.Param))]
  kernels = [shape for shape in shapes if len(shape) in (2, 4)]
  if len(kernels) == 1:
    *fan_in, units = kernels[0]
    if units * (math.prod(fan_in) + 1) == params:
      inputs = "·".join(map(str, fan_in))
      return f"{units} × ({inputs} + 1) = {params:,}"
  return f"{params:,}"


def _layer_facts(row: Mapping[str, Any]) -> dict[str, Any]:
  return {
    "name": row["name"],
    "type": type(row["layer"]).__name__,
    "input_shape": list(row["input_shape"][1:]),
    "output_shape": list(row["output_shape"][1:]),
    "trainable": row["trainable"],
    "non_trainable": row["non_trainable"],
    "formula": layer_formula(row["layer"], row["trainable"]),
  }


def model_facts(name: str, model_kwargs: Mapping[str, Any] | None = None) -> dict[str, Any]:
  """Parameter counts of model ``name`` (built with ``model_kwargs``): total, per layer (with the
  formula), the largest layer."""
  model = models.create_model(name, rngs=nnx.Rngs(0), **(model_kwargs or {}))
  trainable, non_trainable = models.count_params(model)
  layers = [_layer_facts(row) for row in models.layer_rows(model)]
  largest = max(layers, key=lambda layer: layer["trainable"])
  return {
    "trainable": trainable,
    "non_trainable": non_trainable,
    "layers": layers,
    "largest_layer": {**largest, "share": largest["trainable"] / trainable},
  }


def total_params(facts: Mapping[str, Any]) -> int:
  """Trainable parameters plus BatchNorm statistics."""
  return facts["trainable"] + facts["non_trainable"]


def flatten_layer(facts: Mapping[str, Any]) -> dict[str, Any]:
  """The model's Flatten layer (its input shape, and its output: the dense head's inputs)."""
  return next(layer for layer in facts["layers"] if layer["type"] == "Flatten")


# ---------------------------------------------------------------------------------------------
# The results of a comparison.


def build_results(
  results: dict[str, Any], *, seeds: Sequence[int], num_epochs: int
) -> dict[str, Any]:
  """Adds the settings, environment, per-model summaries and pairwise tests to ``results``."""
  for entry in results["models"].values():
    entry["summary"] = summarize_model(entry["histories"])
  best_by_model = {
    name: [history.best_record(records)["val_accuracy"] for records in entry["histories"].values()]
    for name, entry in results["models"].items()
  }
  results["pairwise"] = pairwise_tests(best_by_model) if len(best_by_model) > 1 else []
  results["settings"] = {
    "models": list(results["models"]),
    "seeds": list(seeds),
    "num_epochs": num_epochs,
  }
  results.setdefault("environment", log.environment())
  return results


def curves(entry: Entry, key: str) -> np.ndarray:
  """(seeds, epochs) of figure ``key``, cut to the shortest history."""
  runs = [records for records in entry["histories"].values() if records]
  length = min(len(records) for records in runs)
  return np.array([[record[key] for record in records[:length]] for records in runs])


# ---------------------------------------------------------------------------------------------
# The figures the report's sentences quote, derived from the results.


def ranked(results: Mapping[str, Any]) -> list[str]:
  """The models, the highest mean best val accuracy first."""
  entries = results["models"]
  return sorted(entries, key=lambda name: -entries[name]["summary"]["best_val_accuracy"]["mean"])


def seed_parallelisms(results: Mapping[str, Any]) -> list[str]:
  """How the models' seeds were trained ("loop", "vmap"), each once, sorted."""
  return sorted({str(entry["seed_parallelism"]) for entry in results["models"].values()})


def time_to(summary: Mapping[str, Any], threshold: float) -> dict[str, Any]:
  """Seconds to a val accuracy (the mean epoch that reaches it, over the seeds that do, times
  the median seconds per epoch; None if no seed does), and how many seeds reach it."""
  reached = summary[epochs_to_key(threshold)]
  seconds = None if reached["mean"] is None else reached["mean"] * summary["seconds_per_epoch"]
  return {"seconds": seconds, "reached": reached["reached"]}


def efficiency(results: Mapping[str, Any]) -> list[dict[str, Any]]:
  """Per model, the most accurate first: params, best val accuracy (and per 100k params), speed."""
  rows = []
  for name in ranked(results):
    summary, facts = results["models"][name]["summary"], results["models"][name]["facts"]
    params = total_params(facts)
    best = summary["best_val_accuracy"]["mean"]
    rows.append(
      {
        "name": name,
        "params": params,
        "best": best,
        "best_per_100k_params": best / params * 1e5,
        "seconds_per_epoch": summary["seconds_per_epoch"],
        "time_to": [time_to(summary, threshold) for threshold in THRESHOLDS],
      }
    )
  return rows


def size_and_speed(results: Mapping[str, Any]) -> dict[str, Any]:
  """The most accurate, largest, smallest, fastest and slowest models, and how far apart."""
  entries = results["models"]
  trainable = {name: entry["facts"]["trainable"] for name, entry in entries.items()}
  seconds = {name: entry["summary"]["seconds_per_epoch"] for name, entry in entries.items()}
  top = ranked(results)[0]
  by_params = sorted(entries, key=lambda name: trainable[name])
  fastest = min(entries, key=lambda name: seconds[name])
  slowest = max(entries, key=lambda name: seconds[name])
  return {
    "top": top,
    "smallest": by_params[0],
    "biggest": by_params[-1],
    "fastest": fastest,
    "slowest": slowest,
    "biggest_over_top_params": trainable[by_params[-1]] / trainable[top],
    "slowest_over_fastest_seconds": seconds[slowest] / seconds[fastest],
  }


def cnn_bottleneck(results: Mapping[str, Any]) -> dict[str, Any] | None:
  """The cnn's largest layer and the flattened feature map feeding it; None without the cnn."""
  if "cnn" not in results["models"]:
    return None
  facts = results["models"]["cnn"]["facts"]
  flatten = flatten_layer(facts)
  return {
    "largest_layer": facts["largest_layer"],
    "feature_map": flatten["input_shape"],
    "features": flatten["output_shape"][0],
  }


def loss_turn(entry: Entry) -> dict[str, Any]:
  """Where the mean val loss over seeds bottoms out, and how far above that it ends (a
  fraction): the overfitting signal."""
  loss = curves(entry, "val_loss").mean(axis=0)
  lowest = int(loss.argmin())
  return {
    "epoch": lowest + 1,
    "lowest": float(loss[lowest]),
    "final": float(loss[-1]),
    "rise": float(loss[-1] / loss[lowest] - 1),
  }


def pooling(results: Mapping[str, Any]) -> dict[str, Any] | None:
  """What max-pooling changes from cnn to cnn_pool; None without both."""
  entries = results["models"]
  if not {"cnn", "cnn_pool"} <= entries.keys():
    return None
  cnn, pool = entries["cnn"], entries["cnn_pool"]
  return {
    "features": flatten_layer(pool["facts"])["output_shape"][0],
    "params_share": pool["facts"]["trainable"] / cnn["facts"]["trainable"],
    "speedup": cnn["summary"]["seconds_per_epoch"] / pool["summary"]["seconds_per_epoch"],
    "pair": pair(results, "cnn", "cnn_pool"),
    "loss_turns": {name: loss_turn(entries[name]) for name in ("cnn", "cnn_pool")},
  }


def batchnorm(results: Mapping[str, Any]) -> dict[str, Any] | None:
  """What BatchNorm and the extra Dropout change from cnn_pool to cnn_pool_bn; None without both."""
  entries = results["models"]
  if not {"cnn_pool", "cnn_pool_bn"} <= entries.keys():
    return None
  pool, bn = entries["cnn_pool"], entries["cnn_pool_bn"]
  first_epoch_steps = math.ceil(TRAIN_IMAGES / bn["config"]["batch_size"])
  return {
    "extra_trainable": bn["facts"]["trainable"] - pool["facts"]["trainable"],
    "seconds_ratio": bn["summary"]["seconds_per_epoch"] / pool["summary"]["seconds_per_epoch"],
    "pair": pair(results, "cnn_pool", "cnn_pool_bn"),
    "early_epochs": len(bn["summary"]["early_val_accuracy"]),
    "momentum": BATCHNORM_MOMENTUM,
    "step_weight": 1 - BATCHNORM_MOMENTUM,
    "first_epoch_steps": first_epoch_steps,
    # What is left of the initial moving statistics (mean 0, variance 1) after epoch 1.
    "first_epoch_carry": BATCHNORM_MOMENTUM**first_epoch_steps,
  }


def report_figures(results: Mapping[str, Any]) -> dict[str, Any]:
  """Every derived figure the report quotes (the rest it reads from the results as they are)."""
  return {
    "ranked": ranked(results),
    "seed_parallelisms": seed_parallelisms(results),
    "efficiency": efficiency(results),
    "size_and_speed": size_and_speed(results),
    "cnn_bottleneck": cnn_bottleneck(results),
    "pooling": pooling(results),
    "batchnorm": batchnorm(results),
  }
