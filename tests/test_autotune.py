"""Tests for flax_mnist.autotune: layouts timed side by side on a model's real training epoch
(what benchmarks/time_layouts.py reports)."""

from __future__ import annotations

import math

import numpy as np
import pytest
from conftest import make_digits

from flax_mnist import autotune


def test_every_candidate_layout_is_timed_on_the_given_images():
  images, labels = make_digits(64, seed=0)
  timings = autotune.time_impls(
    "cnn_pool",
    ["s2d", "im2col"],
    batch_size=16,
    steps=2,
    repeats=2,
    images=images[..., None],
    labels=labels.astype(np.int32),
  )
  assert list(timings) == ["s2d", "im2col"]
  assert all(math.isfinite(seconds) and seconds > 0 for seconds in timings.values())
  with pytest.raises(ValueError, match="no candidate"):
    autotune.time_impls("mlp", [])
