"""Tests for scripts/results_table.py: one folder per run in --out, even for one model twice."""

from __future__ import annotations

import json
import shutil

import pytest
from conftest import run_script, small_config

from flax_mnist import train

pytestmark = pytest.mark.integration


def test_two_workdirs_of_one_model_keep_their_own_files(idx_dir, tmp_path):
  first, second = tmp_path / "first", tmp_path / "second"
  train.train_and_evaluate(small_config(idx_dir, num_epochs=1), first, print_fn=None)
  shutil.copytree(first, second)
  history = json.loads((second / "history.json").read_text())
  history[0]["val_accuracy"] = 0.5  # Tells the copies apart (the table reads history.json).
  (second / "history.json").write_text(json.dumps(history))
  out = tmp_path / "table"
  result = run_script("results_table.py", f"--workdirs={first},{second}", f"--out={out}")
  assert result.returncode == 0, result.stderr[-3000:]
  for name, workdir in (("mlp_1", first), ("mlp_2", second)):
    for file in ("history.json", "config.json", "run.json"):
      assert (out / name / file).read_bytes() == (workdir / file).read_bytes(), (name, file)
  rows = [line for line in (out / "table.md").read_text().splitlines() if line.startswith("| mlp")]
  assert [row.split(" | ")[0] for row in rows] == ["| mlp_1", "| mlp_2"]
  assert not (out / "mlp").exists()
