"""Tests for flax_mnist.augment: random shifts on device, and a run that uses them (resumed
exactly, refused under other settings)."""

from __future__ import annotations

import jax
import numpy as np
import pytest
from conftest import make_digits, small_config, without_timing

from flax_mnist import augment, train, workdir
from flax_mnist.errors import ConfigError


def _shifted(image, dy, dx):
  """``image`` (H, W, C) moved by (dy, dx), zeros where nothing was: the reference."""
  out = np.zeros_like(image)
  height, width = image.shape[:2]
  rows_to, rows_from = slice(max(dy, 0), height + min(dy, 0)), slice(max(-dy, 0), height - dy)
  cols_to, cols_from = slice(max(dx, 0), width + min(dx, 0)), slice(max(-dx, 0), width - dx)
  out[rows_to, cols_to] = image[rows_from, cols_from]
  return out


def test_each_image_is_moved_by_its_own_offset_within_the_bound():
  images = make_digits(16, seed=0)[0][..., None]
  shifted = np.asarray(augment.random_shifts(images, jax.random.key(3), 2))
  offsets = set()
  for image, moved in zip(images, shifted):
    matches = [
      (dy, dx)
      for dy in range(-2, 3)
      for dx in range(-2, 3)
      if np.array_equal(moved, _shifted(image, dy, dx))
    ]
    assert matches, "not a translation of its image by at most 2 pixels"
    offsets.add(matches[0])
  assert len(offsets) > 3  # Per image, not one offset for the batch.
  again = np.asarray(augment.random_shifts(images, jax.random.key(3), 2))
  np.testing.assert_array_equal(again, shifted)  # A function of the key.
  assert not np.array_equal(np.asarray(augment.random_shifts(images, jax.random.key(4), 2)), again)
  assert augment.random_shifts(images, jax.random.key(3), 0) is images


@pytest.mark.parametrize("shift", [-1, 9, True])  # (A float: the ConfigDict refuses it.)
def test_a_shift_out_of_range_is_refused(idx_dir, tmp_path, shift):
  config = small_config(idx_dir)
  config.augment.shift = shift
  with pytest.raises(ConfigError, match=r"config.augment.shift .*: expected an integer in 0..8"):
    train.train_and_evaluate(config, tmp_path, print_fn=None)


@pytest.mark.integration  # Trains and resumes whole runs.
def test_a_run_with_shifts_resumes_exactly_and_refuses_other_shifts(idx_dir, tmp_path):
  config = small_config(idx_dir, num_epochs=2)
  config.augment.shift = 2
  straight = train.train_and_evaluate(config, tmp_path / "straight", print_fn=None)
  config.num_epochs = 1
  train.train_and_evaluate(config, tmp_path / "resumed", print_fn=None)
  config.num_epochs = 2
  resumed = train.train_and_evaluate(config, tmp_path / "resumed", print_fn=None)
  assert without_timing(resumed) == without_timing(straight)
  plain = train.train_and_evaluate(small_config(idx_dir), tmp_path / "plain", print_fn=None)
  assert plain[0]["train_loss"] != straight[0]["train_loss"]  # The shifts were applied.
  config.augment.shift, config.num_epochs = 1, 3
  with pytest.raises(ConfigError, match=r"holds a run with augment \{'shift': 2\}"):
    train.train_and_evaluate(config, tmp_path / "resumed", print_fn=None)


def test_a_record_from_before_augmentation_resumes_without_it():
  before = {"model": "mlp"}  # Written before config.augment existed: no augmentation.
  workdir.check_resumable("w", before, {"model": "mlp", "augment": {"shift": 0}}, ["augment"])
  with pytest.raises(ConfigError, match=r"holds a run with augment \{'shift': 0\}"):
    workdir.check_resumable("w", before, {"model": "mlp", "augment": {"shift": 2}}, ["augment"])
