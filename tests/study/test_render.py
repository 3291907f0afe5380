"""Tests for the report (flax_mnist.study.render through study.write_report), and its re-render
from results.json alone."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest
from conftest import REPO_ROOT
from synthetic import synthetic_results

from flax_mnist import study
from flax_mnist.errors import FlaxMnistError

COMMITTED = REPO_ROOT / "reports" / "seed_comparison"


def test_report_has_every_section_plot_and_figure(tmp_path):
  results = synthetic_results(["mlp", "cnn", "cnn_pool", "cnn_pool_bn"])
  path = study.write_report(results, tmp_path, command="python scripts/compare.py --seeds 3")
  report = path.read_text()
  for section in study.SECTIONS:
    assert f"## {section}" in report
  for file_name in study.PLOTS.values():
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
  results = synthetic_results(["mlp", "cnn_pool"], seeds=2)
  report = study.write_report(results, tmp_path, command="c").read_text()
  assert report.count("(Needs") == 2 and "(batchnorm_lag: needs cnn_pool_bn" in report
  assert not (tmp_path / "batchnorm_lag.png").exists()
  assert "With 2 seeds these tests have almost no power" in report


def test_one_seed_reports_no_spread_instead_of_a_test(tmp_path):
  results = synthetic_results(["mlp", "cnn"], seeds=1)
  report = study.write_report(results, tmp_path, command="c").read_text()
  assert "| cnn | mlp |" in report and "n/a (no spread)" in report
  assert "With one seed there is no spread to test against" in report
  assert "exceed the seed spread." not in report
  assert "with no spread between seeds to test that against" in report


# Renders the committed results.json in a fresh interpreter, then lists the training modules
# that the re-render imported (none: it cannot train).
_RERENDER = """
import sys
from flax_mnist import study
study.render_from_results(sys.argv[1], sys.argv[2])
trainers = ("flax_mnist.train", "flax_mnist.checkpoint", "flax_mnist.study.run")
print([name for name in trainers if name in sys.modules])
"""


@pytest.mark.integration
def test_committed_report_re_renders_byte_for_byte_without_training(tmp_path):
  source = tmp_path / "source"
  source.mkdir()
  shutil.copy(COMMITTED / study.RESULTS_FILE, source / study.RESULTS_FILE)
  out = tmp_path / "out"
  command = [sys.executable, "-c", _RERENDER, str(source / study.RESULTS_FILE), str(out)]
  result = subprocess.run(command, capture_output=True, text=True, cwd=tmp_path, timeout=300)
  assert result.returncode == 0, result.stderr[-3000:]
  assert result.stdout.strip().splitlines()[-1] == "[]"
  assert (out / study.REPORT_FILE).read_bytes() == (COMMITTED / study.REPORT_FILE).read_bytes()
  # results.json comes back unchanged, and every plot is drawn again.
  committed_results = (COMMITTED / study.RESULTS_FILE).read_bytes()
  assert (out / study.RESULTS_FILE).read_bytes() == committed_results
  for file_name in study.PLOTS.values():
    assert (out / file_name).stat().st_size > 10_000


def test_re_rendering_needs_a_results_json_with_its_command(tmp_path):
  with pytest.raises(FlaxMnistError, match="no such file"):
    study.render_from_results(tmp_path / "results.json")
  (tmp_path / "results.json").write_text(json.dumps({"models": {}}))
  with pytest.raises(FlaxMnistError, match="records no command"):
    study.render_from_results(tmp_path / "results.json")
