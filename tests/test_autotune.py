"""Tests for flax_mnist.autotune through a run that asks for it (``impl="measure"``): every
candidate timed, the fastest used and recorded, and a resumed run reusing the recorded choice."""

from __future__ import annotations

import json

from conftest import small_config

from flax_mnist import config as config_lib
from flax_mnist import train


def test_a_measured_impl_is_recorded_and_reused_on_resume(idx_dir, tmp_path):
  lines = []
  config = small_config(idx_dir, model="cnn_pool", impl="measure", num_epochs=1)
  train.train_and_evaluate(config, tmp_path, print_fn=lines.append)
  run = json.loads((tmp_path / "run.json").read_text())
  timings = run["impl_seconds_per_step"]
  assert set(timings) == set(config_lib.impl_candidates()) and all(t > 0 for t in timings.values())
  chosen = min(timings, key=timings.get)
  assert json.loads((tmp_path / "config.json").read_text())["impl"] == chosen
  assert run["resolved"]["impl"] == chosen
  assert any(line.startswith("impl measured:") for line in lines)
  lines.clear()
  config.num_epochs = 2
  train.train_and_evaluate(config, tmp_path, print_fn=lines.append)
  assert any(f"impl {chosen} (recorded in" in line for line in lines)
  assert not any(line.startswith("impl measured:") for line in lines)
  assert "impl_seconds_per_step" not in json.loads((tmp_path / "run.json").read_text())
