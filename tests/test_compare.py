"""Tests for flax_mnist.compare: statistics over seeds, pairwise tests, model facts, the report."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from scipy import stats as scipy_stats

from flax_mnist import compare


def make_history(val_accuracies, *, train_offset=0.01, seconds=2.0, parallel_seeds=1):
  return [{"epoch": epoch, "train_loss": 1.0 / epoch, "train_accuracy": min(1.0, accuracy + train_offset),
           "val_loss": 1.0 - accuracy, "val_accuracy": accuracy, "seconds": seconds + epoch / 100,
           "train_seconds": seconds, "eval_seconds": 0.1, "parallel_seeds": parallel_seeds,
           "images_per_second": 60_000 / seconds}
          for epoch, accuracy in enumerate(val_accuracies, start=1)]


def test_epochs_to_reach_is_the_first_epoch_at_or_above():
  history = make_history([0.95, 0.98, 0.975, 0.991])
  assert compare.epochs_to_reach(history, 0.98) == 2
  assert compare.epochs_to_reach(history, 0.99) == 4
  assert compare.epochs_to_reach(history, 0.995) is None


def test_summarize_model_over_seeds():
  histories = {0: make_history([0.97, 0.985, 0.99]), 1: make_history([0.96, 0.99, 0.98]),
               2: make_history([0.97, 0.975, 0.979])}
  summary = compare.summarize_model(histories)
  best = [0.99, 0.99, 0.979]
  assert summary["best_val_accuracy"]["mean"] == pytest.approx(np.mean(best))
  assert summary["best_val_accuracy"]["std"] == pytest.approx(np.std(best, ddof=1))
  assert summary["best_val_accuracy"]["min"] == 0.979 and summary["best_val_accuracy"]["max"] == 0.99
  assert summary["best_epoch"]["mean"] == pytest.approx((3 + 2 + 3) / 3)
  assert summary["final_val_accuracy"]["mean"] == pytest.approx(np.mean([0.99, 0.98, 0.979]))
  assert summary["train_val_gap"]["mean"] == pytest.approx(0.01)
  assert summary["epochs_to_98"] == {"per_seed": [2, 2, None], "reached": 2, "mean": 2.0}
  assert summary["epochs_to_99"]["per_seed"] == [3, 2, None]
  # The median epoch skips epoch 1 (2.02, 2.03 per seed).
  assert summary["seconds_per_epoch"] == pytest.approx(2.025)
  assert summary["early_val_accuracy"][0]["mean"] == pytest.approx(np.mean([0.97, 0.96, 0.97]))


def test_vmapped_epoch_time_is_shared_by_its_seeds():
  summary = compare.summarize_model({0: make_history([0.9, 0.9], seconds=10.0, parallel_seeds=5)})
  assert summary["seconds_per_epoch"] == pytest.approx(10.02 / 5)


def test_welch_test_matches_scipy_and_handles_no_spread():
  first, second = [0.991, 0.990, 0.992, 0.989, 0.991], [0.986, 0.988, 0.985, 0.987, 0.989]
  t_value, p_value = compare.welch_test(first, second)
  expected = scipy_stats.ttest_ind(first, second, equal_var=False)
  assert t_value == pytest.approx(expected.statistic) and p_value == pytest.approx(expected.pvalue)
  assert p_value < 0.01
  assert all(math.isnan(value) for value in compare.welch_test([0.99, 0.99], [0.98, 0.98]))


def test_bootstrap_interval_covers_the_difference_and_is_seeded():
  rng = np.random.default_rng(1)
  first, second = 0.99 + 0.001 * rng.standard_normal(5), 0.985 + 0.001 * rng.standard_normal(5)
  low, high = compare.bootstrap_interval(first, second)
  assert low < np.mean(first) - np.mean(second) < high
  assert 0 < low  # Five sigma apart: the interval excludes 0.
  assert (low, high) == compare.bootstrap_interval(first, second)
  wide_low, wide_high = compare.bootstrap_interval(first, second, level=0.99)
  assert wide_low <= low and high <= wide_high


def test_pairwise_tests_order_each_pair_and_judge_the_spread():
  best = {"a": [0.980, 0.981, 0.979], "b": [0.990, 0.991, 0.989], "c": [0.9795, 0.9815, 0.980]}
  rows = {(row["better"], row["worse"]): row for row in compare.pairwise_tests(best)}
  assert set(rows) == {("b", "a"), ("b", "c"), ("c", "a")}
  assert rows[("b", "a")]["difference"] == pytest.approx(0.01)
  assert rows[("b", "a")]["exceeds_seed_spread"]
  assert not rows[("c", "a")]["exceeds_seed_spread"]  # Means 0.0003 apart, spread 0.001.


def test_model_facts_find_the_dense_layer_of_the_cnn():
  facts = compare.model_facts("cnn")
  assert facts["trainable"] == 1_185_482 and facts["non_trainable"] == 0
  largest = facts["largest_layer"]
  assert largest["name"] == "dense" and largest["input_shape"] == [9216]
  assert largest["formula"] == "128 × (9216 + 1) = 1,179,776"
  assert largest["share"] == pytest.approx(1_179_776 / 1_185_482)
  conv = compare.model_facts("cnn_pool")["layers"][2]
  assert conv["formula"] == "16 × (3·3·8 + 1) = 1,168"
  assert compare.model_facts("cnn_pool_bn")["non_trainable"] == 368


def _synthetic_results(names, seeds=3, epochs=4):
  rng = np.random.default_rng(0)
  results = {"models": {}}
  for index, name in enumerate(names):
    histories = {}
    for seed in range(seeds):
      accuracies = 0.9 + 0.01 * index + 0.015 * np.arange(epochs) + 0.002 * rng.standard_normal(epochs)
      histories[str(seed)] = make_history(accuracies.tolist(), seconds=1.0 + index)
    results["models"][name] = {"facts": compare.model_facts(name), "config": {"batch_size": 512, "learning_rate": 1e-3},
                               "compile_seconds": 3.0, "seed_parallelism": "loop", "wall_seconds": 100.0,
                               "histories": histories}
  return compare.build_results(results, seeds=list(range(seeds)), num_epochs=epochs)


def test_report_has_every_section_plot_and_figure(tmp_path):
  results = _synthetic_results(["mlp", "cnn", "cnn_pool", "cnn_pool_bn"])
  path = compare.write_report(results, tmp_path, command="python scripts/compare.py --seeds 3")
  report = path.read_text()
  for section in compare.SECTIONS:
    assert f"## {section}" in report
  for file_name in compare.PLOTS.values():
    assert (tmp_path / file_name).stat().st_size > 10_000
    assert f"]({file_name})" in report
  assert "128 × (9216 + 1) = 1,179,776" in report
  best = results["models"]["cnn_pool_bn"]["summary"]["best_val_accuracy"]
  assert f"| cnn_pool_bn | {best['mean']:.4f} ± {best['std']:.4f} |" in report
  assert "The most accurate model on average is **cnn_pool_bn**" in report
  assert "(Needs" not in report
  saved = json.loads((tmp_path / "results.json").read_text())
  assert saved["models"]["mlp"]["histories"]["2"] == results["models"]["mlp"]["histories"]["2"]
  assert saved["command"] == "python scripts/compare.py --seeds 3" and len(saved["pairwise"]) == 6


def test_report_without_the_compared_pairs_says_what_it_needs(tmp_path):
  report = compare.write_report(_synthetic_results(["mlp", "cnn_pool"], seeds=2), tmp_path, command="c").read_text()
  assert report.count("(Needs") == 2 and "(batchnorm_lag: needs cnn_pool_bn" in report
  assert not (tmp_path / "batchnorm_lag.png").exists()
  assert "With 2 seeds these tests have almost no power" in report


def test_one_seed_reports_no_spread_instead_of_a_test(tmp_path):
  report = compare.write_report(_synthetic_results(["mlp", "cnn"], seeds=1), tmp_path, command="c").read_text()
  assert "| cnn | mlp |" in report and "n/a (no spread)" in report
  assert "With one seed there is no spread to test against" in report
  assert "exceed the seed spread." not in report and "with no spread between seeds to test that against" in report
