"""Tests for flax_mnist.study.stats: figures over seeds, pairwise tests, model facts, and the
derived figures the report quotes."""

from __future__ import annotations

import math

import numpy as np
import pytest
from flax import nnx
from scipy import stats as scipy_stats
from synthetic import make_history, synthetic_results

from flax_mnist.study import stats


def test_epochs_to_reach_is_the_first_epoch_at_or_above():
  history = make_history([0.95, 0.98, 0.975, 0.991])
  assert stats.epochs_to_reach(history, 0.98) == 2
  assert stats.epochs_to_reach(history, 0.99) == 4
  assert stats.epochs_to_reach(history, 0.995) is None


def test_summarize_model_over_seeds():
  histories = {
    0: make_history([0.97, 0.985, 0.99]),
    1: make_history([0.96, 0.99, 0.98]),
    2: make_history([0.97, 0.975, 0.979]),
  }
  summary = stats.summarize_model(histories)
  best = [0.99, 0.99, 0.979]
  assert summary["best_val_accuracy"]["mean"] == pytest.approx(np.mean(best))
  assert summary["best_val_accuracy"]["std"] == pytest.approx(np.std(best, ddof=1))
  assert (
    summary["best_val_accuracy"]["min"] == 0.979 and summary["best_val_accuracy"]["max"] == 0.99
  )
  assert summary["best_epoch"]["mean"] == pytest.approx((3 + 2 + 3) / 3)
  assert summary["final_val_accuracy"]["mean"] == pytest.approx(np.mean([0.99, 0.98, 0.979]))
  assert summary["train_val_gap"]["mean"] == pytest.approx(0.01)
  assert summary["epochs_to_98"] == {"per_seed": [2, 2, None], "reached": 2, "mean": 2.0}
  assert summary["epochs_to_99"]["per_seed"] == [3, 2, None]
  # The median epoch skips epoch 1 (2.02, 2.03 per seed).
  assert summary["seconds_per_epoch"] == pytest.approx(2.025)
  assert summary["early_val_accuracy"][0]["mean"] == pytest.approx(np.mean([0.97, 0.96, 0.97]))


def test_vmapped_epoch_time_is_shared_by_its_seeds():
  summary = stats.summarize_model({0: make_history([0.9, 0.9], seconds=10.0, parallel_seeds=5)})
  assert summary["seconds_per_epoch"] == pytest.approx(10.02 / 5)


def test_welch_test_matches_scipy_and_handles_no_spread():
  first, second = [0.991, 0.990, 0.992, 0.989, 0.991], [0.986, 0.988, 0.985, 0.987, 0.989]
  t_value, p_value = stats.welch_test(first, second)
  expected = scipy_stats.ttest_ind(first, second, equal_var=False)
  assert t_value == pytest.approx(expected.statistic) and p_value == pytest.approx(expected.pvalue)
  assert p_value < 0.01
  assert all(math.isnan(value) for value in stats.welch_test([0.99, 0.99], [0.98, 0.98]))


def test_bootstrap_interval_covers_the_difference_and_is_seeded():
  rng = np.random.default_rng(1)
  first, second = 0.99 + 0.001 * rng.standard_normal(5), 0.985 + 0.001 * rng.standard_normal(5)
  low, high = stats.bootstrap_interval(first, second)
  assert low < np.mean(first) - np.mean(second) < high
  assert 0 < low  # Five sigma apart: the interval excludes 0.
  assert (low, high) == stats.bootstrap_interval(first, second)
  wide_low, wide_high = stats.bootstrap_interval(first, second, level=0.99)
  assert wide_low <= low and high <= wide_high


def test_pairwise_tests_order_each_pair_and_judge_the_spread():
  best = {"a": [0.980, 0.981, 0.979], "b": [0.990, 0.991, 0.989], "c": [0.9795, 0.9815, 0.980]}
  rows = {(row["better"], row["worse"]): row for row in stats.pairwise_tests(best)}
  assert set(rows) == {("b", "a"), ("b", "c"), ("c", "a")}
  assert rows[("b", "a")]["difference"] == pytest.approx(0.01)
  assert rows[("b", "a")]["exceeds_seed_spread"]
  assert not rows[("c", "a")]["exceeds_seed_spread"]  # Means 0.0003 apart, spread 0.001.


def test_model_facts_find_the_dense_layer_of_the_cnn():
  facts = stats.model_facts("cnn")
  assert facts["trainable"] == 1_185_482 and facts["non_trainable"] == 0
  largest = facts["largest_layer"]
  assert largest["name"] == "dense" and largest["input_shape"] == [9216]
  assert largest["formula"] == "128 × (9216 + 1) = 1,179,776"
  assert largest["share"] == pytest.approx(1_179_776 / 1_185_482)
  conv = stats.model_facts("cnn_pool")["layers"][2]
  assert conv["formula"] == "16 × (3·3·8 + 1) = 1,168"
  assert stats.model_facts("cnn_pool_bn")["non_trainable"] == 368


class _Wrapped(nnx.Module):
  """A layer class of no model: its kernel sits one level down."""

  def __init__(self, layer: nnx.Module):
    self.inner = layer


def test_layer_formula_reads_the_kernel_of_any_layer_class():
  rngs = nnx.Rngs(0)
  dense = _Wrapped(nnx.Linear(400, 128, rngs=rngs))
  assert stats.layer_formula(dense, 51_328) == "128 × (400 + 1) = 51,328"
  conv = nnx.Conv(2, 4, (3, 3), rngs=rngs)
  assert stats.layer_formula(conv, 76) == "4 × (3·3·2 + 1) = 76"
  # No bias, or no kernel: the count alone.
  assert stats.layer_formula(nnx.Linear(10, 3, use_bias=False, rngs=rngs), 30) == "30"
  assert stats.layer_formula(nnx.BatchNorm(8, rngs=rngs), 16) == "16"


def test_report_figures_derive_what_the_sentences_quote():
  results = synthetic_results(["mlp", "cnn", "cnn_pool", "cnn_pool_bn"])
  entries = results["models"]
  figures = stats.report_figures(results)
  assert figures["ranked"] == ["cnn_pool_bn", "cnn_pool", "cnn", "mlp"]
  assert figures["seed_parallelisms"] == ["loop"]
  extremes = figures["size_and_speed"]
  roles = [extremes[role] for role in ("top", "biggest", "smallest")]
  assert roles == ["cnn_pool_bn", "cnn", "cnn_pool"]
  assert (extremes["fastest"], extremes["slowest"]) == ("mlp", "cnn_pool_bn")
  assert extremes["biggest_over_top_params"] == pytest.approx(1_185_482 / 57_402)
  seconds = {name: entry["summary"]["seconds_per_epoch"] for name, entry in entries.items()}
  assert extremes["slowest_over_fastest_seconds"] == pytest.approx(
    seconds["cnn_pool_bn"] / seconds["mlp"]
  )
  top = figures["efficiency"][0]
  assert top["name"] == "cnn_pool_bn" and top["params"] == 57_402 + 368
  assert top["best_per_100k_params"] == pytest.approx(top["best"] / top["params"] * 1e5)
  assert top["time_to"][0] == {"seconds": None, "reached": 0}  # No seed reaches 98%.
  summary = {"seconds_per_epoch": 2.5, "epochs_to_98": {"reached": 2, "mean": 3.0}}
  assert stats.time_to(summary, 0.98) == {"seconds": 7.5, "reached": 2}
  assert figures["cnn_bottleneck"]["feature_map"] == [24, 24, 16]
  assert figures["cnn_bottleneck"]["features"] == 9216
  assert figures["pooling"]["features"] == 400
  assert figures["pooling"]["speedup"] == pytest.approx(seconds["cnn"] / seconds["cnn_pool"])
  assert figures["pooling"]["pair"]["better"] == "cnn_pool"
  batchnorm = figures["batchnorm"]
  assert batchnorm["extra_trainable"] == 368 and batchnorm["first_epoch_steps"] == 118
  assert batchnorm["first_epoch_carry"] == pytest.approx(0.99**118)


def test_loss_turn_finds_where_the_mean_val_loss_bottoms_out():
  entry = {"histories": {"0": make_history([0.9, 0.95, 0.96, 0.94]), "1": make_history([0.9] * 4)}}
  # Mean val loss: 0.1, 0.075, 0.07, 0.08.
  turn = stats.loss_turn(entry)
  assert turn["epoch"] == 3
  assert turn["lowest"] == pytest.approx(0.07) and turn["final"] == pytest.approx(0.08)
  assert turn["rise"] == pytest.approx(0.08 / 0.07 - 1)


def test_figures_of_absent_models_are_none():
  figures = stats.report_figures(synthetic_results(["mlp", "cnn_pool"], seeds=2))
  assert figures["cnn_bottleneck"] is figures["pooling"] is figures["batchnorm"] is None
