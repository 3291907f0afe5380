"""Shared fixtures and helpers: small IDX datasets written to a tmp dir, the real MNIST directory,
a small training config, a history without its timings, and a script run as a user runs it."""

from __future__ import annotations

import gzip
import os
import struct
import subprocess
import sys
from pathlib import Path

import ml_collections
import numpy as np
import pytest

from flax_mnist import config as config_lib

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_REAL_DATA_DIR = REPO_ROOT.parent / "shared" / "datasets" / "mnist"
TIMING_KEYS = {"seconds", "train_seconds", "eval_seconds", "images_per_second", "parallel_seeds"}


def write_idx(path: Path, array: np.ndarray, *, compress: bool = False) -> Path:
  """Writes ``array`` (uint8) as an IDX file: magic 0x0000 08 ndim, big-endian dims, bytes."""
  array = np.asarray(array, dtype=np.uint8)
  payload = (
    bytes([0, 0, 0x08, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape) + array.tobytes()
  )
  path.write_bytes(gzip.compress(payload) if compress else payload)
  return path


def make_digits(num: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
  """Learnable fake digits: class c lights up a 4x4 block at a class-specific place, plus noise."""
  rng = np.random.default_rng(seed)
  labels = rng.integers(0, 10, size=num).astype(np.uint8)
  images = rng.integers(0, 60, size=(num, 28, 28), dtype=np.uint8)
  for index, label in enumerate(labels):
    row, col = 2 + 6 * (label // 4), 2 + 6 * (label % 4)
    images[index, row : row + 4, col : col + 4] = 255
  return images, labels


def write_mnist_dir(
  directory: Path, *, num_train: int = 300, num_test: int = 100, compress: bool = True
) -> Path:
  """Writes the four MNIST IDX files (small, learnable) into ``directory``."""
  directory.mkdir(parents=True, exist_ok=True)
  suffix = ".gz" if compress else ""
  for split, num, seed in (("train", num_train, 0), ("t10k", num_test, 1)):
    images, labels = make_digits(num, seed)
    write_idx(directory / f"{split}-images-idx3-ubyte{suffix}", images, compress=compress)
    write_idx(directory / f"{split}-labels-idx1-ubyte{suffix}", labels, compress=compress)
  return directory


def small_config(idx_dir, **overrides) -> ml_collections.ConfigDict:
  config = config_lib.default_config()
  config.model = "mlp"
  config.data_dir = str(idx_dir)
  config.batch_size = 64
  config.eval_batch_size = 32
  config.num_epochs = 2
  config.progress_bar = False
  config.update(overrides)
  return config


def without_timing(history):
  """A history's records without their timings (``TIMING_KEYS``): what two runs must share."""
  return [
    {key: value for key, value in record.items() if key not in TIMING_KEYS} for record in history
  ]


def run_script(*args, env=None):
  environment = {**os.environ, **(env or {})}
  return subprocess.run(
    [sys.executable, str(REPO_ROOT / "scripts" / args[0]), *args[1:]],
    capture_output=True,
    text=True,
    env=environment,
    cwd=REPO_ROOT,
    timeout=600,
  )


@pytest.fixture
def idx_dir(tmp_path: Path) -> Path:
  """A directory with small gzipped MNIST-format IDX files (300 train, 100 test)."""
  return write_mnist_dir(tmp_path / "idx")


@pytest.fixture(scope="session")
def real_data_dir() -> Path:
  """The real MNIST files: $FLAX_MNIST_DATA_DIR, else ../shared/datasets/mnist. Fails if absent."""
  directory = Path(os.environ.get("FLAX_MNIST_DATA_DIR") or DEFAULT_REAL_DATA_DIR).resolve()
  if (
    not (directory / "train-images-idx3-ubyte.gz").exists()
    and not (directory / "train-images-idx3-ubyte").exists()
  ):
    pytest.fail(f"real MNIST not found in {directory}; set FLAX_MNIST_DATA_DIR")
  return directory


@pytest.fixture
def no_data_env(monkeypatch):
  """Unsets FLAX_MNIST_DATA_DIR so that a test controls the data source itself."""
  monkeypatch.delenv("FLAX_MNIST_DATA_DIR", raising=False)
