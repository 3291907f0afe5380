"""Tests for flax_mnist.speedrun and scripts/speedrun.py: the recipe's net is train_mnist_fast's
in the family's layers (same function in every layout), a fixed schedule is reproducible, and
the report holds every seed's figures."""

from __future__ import annotations

import json

import jax
import numpy as np
import pytest
from conftest import REPO_ROOT, make_digits, run_script
from flax import nnx

from flax_mnist import models, speedrun
from flax_mnist.config import load_ablations, load_config_file


def test_the_recipes_net_is_train_mnist_fasts_and_every_layout_computes_it():
  net = speedrun.speedrun_net(rngs=nnx.Rngs(0))
  # conv 24 (5x5): 24 x (25 + 1); conv 32 (3x3): 32 x (24 * 9 + 1); Dense 800 -> 256; 256 -> 10.
  assert models.count_params(net) == (624 + 6_944 + 205_056 + 2_570, 0)
  images = jax.numpy.asarray(make_digits(4, seed=1)[0][..., None] / 255.0, jax.numpy.float32)
  outputs = {
    impl: speedrun.speedrun_net(rngs=nnx.Rngs(0), impl=impl, batch_norm=True)(images)
    for impl in ("lax", "s2d")
  }
  # Float32 sums in another order (the s2d block): measured within 2e-6.
  np.testing.assert_allclose(outputs["s2d"], outputs["lax"], rtol=1e-5, atol=1e-5)


@pytest.mark.integration
def test_a_speed_run_is_reproducible_and_reports_every_seed(idx_dir, tmp_path):
  out = tmp_path / "out"
  args = ["speedrun.py", "--config", str(REPO_ROOT / "configs" / "speedrun.py")]
  args += [f"--config.data_dir={idx_dir}", "--config.batch_size=64", "--config.num_epochs=2"]
  result = run_script(*args, "--seeds=2", "--baseline=false", f"--out={out}")
  assert result.returncode == 0, result.stderr[-3000:]
  results = json.loads((out / "results.json").read_text())
  recipe = results["recipe"]
  assert [entry["seed"] for entry in recipe["seeds"]] == [0, 1]
  for entry in recipe["seeds"]:
    assert {"seed", "test_accuracy", "seconds", "compile_seconds"} <= entry.keys()
    assert entry["seconds"] > 0 and entry["compile_seconds"] > 0
  assert set(results["ablations"]) == set(load_ablations(REPO_ROOT / "configs" / "speedrun.py"))
  report = (out / "report.md").read_text()
  assert "| recipe | 2 |" in report and "## Per seed" in report
  # The same seeds again: the same accuracies (a fixed schedule, no selection).
  config = load_config_file(REPO_ROOT / "configs" / "speedrun.py")
  config.update(data_dir=str(idx_dir), batch_size=64, num_epochs=2)
  again = speedrun.run(config, [0, 1], print_fn=None)
  assert [e["test_accuracy"] for e in again["seeds"]] == [
    e["test_accuracy"] for e in recipe["seeds"]
  ]


def test_the_second_recipe_is_the_first_trained_longer_on_shifted_images():
  from flax_mnist.config import config_to_dict, resolve
  from flax_mnist.study import sweep

  first = load_config_file(REPO_ROOT / "configs" / "speedrun.py")
  second = load_config_file(REPO_ROOT / "configs" / "speedrun_995.py")
  changed = {
    key for key, value in config_to_dict(second).items() if config_to_dict(first)[key] != value
  }
  assert changed == {"num_epochs", "augment"}
  assert second.num_epochs > first.num_epochs and second.augment.shift > 0
  resolve(second)
  for name, overrides in load_ablations(REPO_ROOT / "configs" / "speedrun_995.py").items():
    variant = resolve(sweep.with_overrides(second, overrides))
    assert variant != resolve(second), name
