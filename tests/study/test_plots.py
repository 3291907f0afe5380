"""Tests for flax_mnist.study.plots: the PNGs, from one seed and one epoch up."""

from __future__ import annotations

from synthetic import synthetic_results

from flax_mnist.study import plots


def test_one_seed_one_epoch_draws_every_plot_its_models_allow(tmp_path):
  results = synthetic_results(["cnn_pool", "cnn_pool_bn"], seeds=1, epochs=1)
  written = plots.write_plots(results, tmp_path)
  assert written == plots.PLOTS
  for file_name in written.values():
    assert (tmp_path / file_name).stat().st_size > 10_000


def test_a_plot_is_left_out_without_the_model_it_needs(tmp_path):
  written = plots.write_plots(synthetic_results(["mlp", "cnn_pool"], seeds=2, epochs=2), tmp_path)
  assert "batchnorm_lag" not in written and plots.NEEDS["batchnorm_lag"] == "cnn_pool_bn"
  assert sorted(path.name for path in tmp_path.iterdir()) == sorted(written.values())
