"""Tests for flax_mnist.data and the TFDS builder: IDX round trips, validation, sources."""

from __future__ import annotations

import gzip
import sys

import jax.numpy as jnp
import numpy as np
import pytest
from conftest import make_digits, write_idx, write_mnist_dir

from flax_mnist import data
from flax_mnist.errors import DatasetError


@pytest.mark.parametrize("compress", [False, True])
def test_idx_round_trip(tmp_path, compress):
  images, labels = make_digits(7, seed=3)
  images_path = write_idx(tmp_path / "images", images, compress=compress)
  labels_path = write_idx(tmp_path / "labels", labels, compress=compress)
  read = data.read_images(images_path)
  assert read.shape == (7, 28, 28, 1) and read.dtype == np.uint8
  np.testing.assert_array_equal(read[..., 0], images)
  read_labels = data.read_labels(labels_path)
  assert read_labels.dtype == np.int32
  np.testing.assert_array_equal(read_labels, labels)


def test_load_idx_dir_keeps_order_and_finds_plain_or_gz(tmp_path):
  write_mnist_dir(tmp_path / "plain", num_train=12, num_test=5, compress=False)
  write_mnist_dir(tmp_path / "gz", num_train=12, num_test=5, compress=True)
  plain, gz = data.load_idx_dir(tmp_path / "plain"), data.load_idx_dir(tmp_path / "gz")
  expected_images, expected_labels = make_digits(12, seed=0)
  for mnist in (plain, gz):
    assert len(mnist.train) == 12 and len(mnist.test) == 5
    np.testing.assert_array_equal(mnist.train.images[..., 0], expected_images)
    np.testing.assert_array_equal(mnist.train.labels, expected_labels)


def _header(ndim, dims):
  return bytes([0, 0, 8, ndim]) + np.asarray(dims, ">u4").tobytes()


@pytest.mark.parametrize(
  "content, reader, expected",
  [
    (b"\x00\x00", data.read_labels, "too short for an IDX header"),
    (bytes([0, 0, 8, 3]) + b"\x00" * 8, data.read_images, "bad magic number|truncated header"),
    (
      _header(1, [3]) + b"\x00\x01\x02",
      data.read_images,
      "bad magic number 0x00000801, expected 0x00000803",
    ),
    (
      bytes([0, 0, 0x0D, 1]) + _header(1, [1])[4:] + b"\x00",
      data.read_labels,
      "bad magic number 0x00000d01",
    ),
    (
      _header(3, [2, 28, 28]) + b"\x00" * (2 * 784 - 1),
      data.read_images,
      "file length 1583 bytes, expected 1584",
    ),
    (
      _header(3, [2, 28, 28]) + b"\x00" * (2 * 784 + 5),
      data.read_images,
      "file length 1589 bytes, expected 1584",
    ),
    (
      _header(3, [1, 32, 32]) + b"\x00" * 1024,
      data.read_images,
      "images are 32x32, expected 28x28",
    ),
    (
      _header(1, [4]) + bytes([1, 2, 10, 3]),
      data.read_labels,
      "label 10 at index 2, expected 0..9",
    ),
  ],
)
def test_validation_errors_name_the_file(tmp_path, content, reader, expected):
  path = tmp_path / "broken-idx-ubyte"
  path.write_bytes(content)
  with pytest.raises(DatasetError, match=expected) as info:
    reader(path)
  message = str(info.value)
  assert message.startswith(str(path)) and "\n" not in message


def test_truncated_header_is_reported(tmp_path):
  path = tmp_path / "labels"
  path.write_bytes(bytes([0, 0, 8, 1]) + b"\x00\x00")
  with pytest.raises(DatasetError, match="truncated header, 6 bytes, expected at least 8"):
    data.read_labels(path)


def test_corrupt_gzip_is_reported(tmp_path):
  path = tmp_path / "train-labels-idx1-ubyte.gz"
  path.write_bytes(gzip.compress(_header(1, [100]) + bytes(100))[:30])
  with pytest.raises(DatasetError, match=f"{path}: corrupt gzip data"):
    data.read_labels(path)


def test_count_mismatch_names_the_labels_file(tmp_path):
  directory = write_mnist_dir(tmp_path / "d", num_train=10, num_test=4, compress=False)
  write_idx(directory / "t10k-labels-idx1-ubyte", np.zeros(3, np.uint8))
  with pytest.raises(
    DatasetError, match=r"t10k-labels-idx1-ubyte: 3 labels, expected 4 to match the images"
  ):
    data.load_idx_dir(directory)


def test_missing_file_and_missing_directory(tmp_path):
  directory = write_mnist_dir(tmp_path / "d", num_train=10, num_test=4)
  (directory / "train-labels-idx1-ubyte.gz").unlink()
  with pytest.raises(
    DatasetError, match="train-labels-idx1-ubyte: missing, expected train-labels-idx1-ubyte or"
  ):
    data.load_idx_dir(directory)
  with pytest.raises(DatasetError, match="not a directory"):
    data.load_idx_dir(tmp_path / "nowhere")


def test_source_order_config_then_env_then_tfds(tmp_path, monkeypatch):
  config_dir = write_mnist_dir(tmp_path / "config", num_train=11, num_test=3)
  env_dir = write_mnist_dir(tmp_path / "env", num_train=13, num_test=3)
  monkeypatch.setenv(data.DATA_DIR_ENV, str(env_dir))
  assert len(data.load_mnist(config_dir).train) == 11
  assert len(data.load_mnist(None).train) == 13
  monkeypatch.delenv(data.DATA_DIR_ENV)
  calls = []
  from flax_mnist import tfds_builder

  monkeypatch.setattr(
    tfds_builder, "load", lambda data_dir=None, dataset="mnist": calls.append(data_dir) or "tfds"
  )
  assert data.load_mnist(None, tfds_data_dir=tmp_path / "tfds") == "tfds"
  assert calls == [tmp_path / "tfds"]


def test_tfds_prepares_from_idx_and_reads_back_without_tensorflow(tmp_path):
  from flax_mnist import tfds_builder

  manual_dir = write_mnist_dir(tmp_path / "manual", num_train=40, num_test=9)
  mnist = tfds_builder.load(data_dir=tmp_path / "tfds", manual_dir=manual_dir)
  expected = data.load_idx_dir(manual_dir)
  assert mnist.source.startswith("TFDS mnist_idx")
  for split in ("train", "test"):
    got, want = getattr(mnist, split), getattr(expected, split)
    assert got.images.dtype == np.uint8 and got.images.shape == want.images.shape
    np.testing.assert_array_equal(got.images, want.images)  # Same order as the files.
    np.testing.assert_array_equal(got.labels, want.labels)
  assert (tmp_path / "tfds" / "mnist_idx" / "1.0.0").is_dir()
  assert list((tmp_path / "tfds" / "mnist_idx" / "1.0.0").glob("*.array_record*"))
  assert "tensorflow" not in sys.modules


def test_tfds_prepare_validates_the_idx_files_and_leaves_nothing_partial(tmp_path):
  from flax_mnist import tfds_builder

  manual_dir = write_mnist_dir(tmp_path / "manual", num_train=10, num_test=4, compress=False)
  write_idx(manual_dir / "t10k-labels-idx1-ubyte", np.full(4, 12, np.uint8))
  with pytest.raises(DatasetError, match="label 12 at index 0"):
    tfds_builder.load(data_dir=tmp_path / "tfds", manual_dir=manual_dir)
  assert not (tmp_path / "tfds").exists()  # No incomplete.* directory left behind.
  (tmp_path / "shared" / "downloads").mkdir(parents=True)
  (tmp_path / "shared" / "other_dataset").mkdir()
  with pytest.raises(DatasetError, match="label 12 at index 0"):
    tfds_builder.load(data_dir=tmp_path / "shared", manual_dir=manual_dir)
  assert sorted(path.name for path in (tmp_path / "shared").rglob("*")) == [
    "downloads",
    "other_dataset",
  ]


def test_normalize_images_scales_uint8_to_unit_interval():
  images = jnp.asarray(np.array([[0, 51, 255]], np.uint8))
  scaled = data.normalize_images(images)
  assert scaled.dtype == jnp.float32
  np.testing.assert_allclose(np.asarray(scaled), [[0.0, 0.2, 1.0]], rtol=1e-7)


def test_tfds_download_failure_is_one_clear_line(tmp_path, monkeypatch):
  from tensorflow_datasets.core.download import downloader

  from flax_mnist import tfds_builder

  # Nothing listens there: the probe is refused at once.
  monkeypatch.setitem(tfds_builder.DOWNLOAD_URLS, "mnist", "http://127.0.0.1:9/mnist/")
  with pytest.raises(DatasetError, match="127.0.0.1:9 cannot be reached") as info:
    tfds_builder.load(data_dir=tmp_path / "tfds")
  message = str(info.value)
  assert "--config.data_dir=DIR" in message and "FLAX_MNIST_DATA_DIR=DIR" in message
  assert "\n" not in message and not (tmp_path / "tfds").exists()
  # The probe passes, the download fails: the same hint, and no partial download left.
  monkeypatch.setattr(tfds_builder, "probe_download", lambda dataset: None)
  monkeypatch.setattr(downloader, "MAX_RETRIES", 0)  # TFDS would back off for minutes first.
  with pytest.raises(
    DatasetError, match="could not download or prepare .*--config.data_dir=DIR"
  ) as info:
    tfds_builder.load(data_dir=tmp_path / "tfds")
  assert "\n" not in str(info.value) and not (tmp_path / "tfds").exists()


def test_a_split_of_zero_images_is_refused_naming_the_file(tmp_path):
  directory = write_mnist_dir(tmp_path / "d", num_train=10, num_test=4, compress=False)
  write_idx(directory / "t10k-images-idx3-ubyte", np.zeros((0, 28, 28), np.uint8))
  write_idx(directory / "t10k-labels-idx1-ubyte", np.zeros(0, np.uint8))
  with pytest.raises(DatasetError, match=r"t10k-images-idx3-ubyte: 0 images, expected at least"):
    data.load_idx_dir(directory)


def _arrays(num_train=40, num_test=20, shape=(12, 10, 3), num_classes=4, seed=0):
  rng = np.random.default_rng(seed)
  return (
    rng.integers(0, 256, (num_train, *shape), dtype=np.uint8),
    rng.integers(0, num_classes, num_train),
    rng.integers(0, 256, (num_test, *shape), dtype=np.uint8),
    rng.integers(0, num_classes, num_test),
  )


def test_a_dataset_from_arrays_keeps_its_shape_classes_and_identity():
  arrays = _arrays()
  dataset = data.from_arrays(*arrays, name="tiles")
  assert dataset.image_shape == (12, 10, 3) and dataset.num_classes == 4
  assert dataset.train.labels.dtype == np.int32 and dataset.source == "arrays (tiles)"
  assert dataset.identity().startswith("tiles: 40 train + 20 test images of 12x10x3, 4 classes")
  assert data.from_arrays(*arrays, name="tiles", num_classes=7).num_classes == 7
  changed = (arrays[0].copy(), *arrays[1:])
  changed[0][0, 0, 0, 0] ^= 1  # One bit of one pixel: another dataset.
  assert data.from_arrays(*changed, name="tiles").identity() != dataset.identity()
  floats = data.from_arrays(arrays[0] / 255.0, arrays[1], arrays[2] / 255.0, arrays[3], name="f")
  assert floats.train.images.dtype == np.float32
  np.testing.assert_allclose(
    np.asarray(data.normalize_images(jnp.asarray(floats.train.images))),
    np.asarray(data.normalize_images(jnp.asarray(arrays[0]))),
    rtol=1e-6,
  )  # Floats in [0, 1] are used as they are, uint8 scaled by 1/255: the same images.


@pytest.mark.parametrize(
  "change, message",
  [
    ({0: np.zeros((40, 12, 10), np.uint8)}, r"train_images: shape \(40, 12, 10\), expected \(N,"),
    ({2: np.zeros((20, 12, 10, 3), np.int16)}, r"test_images: int16, expected uint8 or floats"),
    ({0: np.full((40, 12, 10, 3), 2.0)}, r"train_images: values in \[2, 2\], expected floats in"),
    ({2: np.zeros((20, 8, 10, 3), np.uint8)}, r"test_images: images of \(8, 10, 3\), expected"),
    ({1: np.zeros((40, 1), int)}, r"train_labels: shape \(40, 1\), expected \(N,\) integer"),
    ({3: np.full(20, -1)}, r"test_labels: int64 labels, expected non-negative integers"),
    ({3: np.zeros(19, int)}, r"test_labels: 19 labels, expected 20 to match the images"),
    ({"num_classes": 3}, r"(train|test)_labels: label 3 at index \d+, expected 0..2"),
    ({"name": ""}, r"name '': expected a non-empty string"),
  ],
  ids=["3d", "int16", "range", "shapes", "labels-2d", "negative", "count", "classes", "name"],
)
def test_bad_arrays_are_one_line_naming_the_array(change, message):
  arrays = list(_arrays())
  keywords = {"name": "tiles"}
  for key, value in change.items():
    if isinstance(key, int):
      arrays[key] = value
    else:
      keywords[key] = value
  with pytest.raises(DatasetError, match=message):
    data.from_arrays(*arrays, **keywords)


@pytest.mark.parametrize("dataset", ["fashion_mnist", "kmnist"])
def test_the_drop_in_datasets_load_from_their_idx_directory_never_from_mnists(
  dataset, tmp_path, monkeypatch
):
  directory = write_mnist_dir(tmp_path / dataset, num_train=12, num_test=5)
  mnist_dir = write_mnist_dir(tmp_path / "mnist", num_train=7, num_test=3)
  monkeypatch.setenv(data.DATA_DIR_ENV, str(mnist_dir))
  loaded = data.load(dataset, directory)
  assert loaded.name == dataset and len(loaded.train) == 12
  assert loaded.identity().startswith(f"{dataset}: 12 train + 5 test images of 28x28x1")
  assert loaded.identity() != data.load_idx_dir(directory).identity()  # MNIST's of these files.
  calls = []
  from flax_mnist import tfds_builder

  monkeypatch.setattr(
    tfds_builder, "load", lambda data_dir=None, dataset="mnist": calls.append(dataset) or "tfds"
  )
  assert data.load(dataset) == "tfds" and calls == [dataset]  # $FLAX_MNIST_DATA_DIR is MNIST's.
  assert len(data.load("mnist").train) == 7


def test_an_unknown_dataset_is_named():
  with pytest.raises(DatasetError, match="dataset 'cifar10': unknown, expected one of mnist, fash"):
    data.load("cifar10")


def test_a_drop_in_dataset_prepares_through_its_own_tfds_builder(tmp_path):
  from flax_mnist import tfds_builder

  manual_dir = write_mnist_dir(tmp_path / "manual", num_train=20, num_test=6)
  kmnist = tfds_builder.load(data_dir=tmp_path / "tfds", manual_dir=manual_dir, dataset="kmnist")
  assert kmnist.name == "kmnist" and kmnist.source.startswith("TFDS kmnist_idx")
  np.testing.assert_array_equal(kmnist.train.images, data.load_idx_dir(manual_dir).train.images)
  assert (tmp_path / "tfds" / "kmnist_idx" / "1.0.0").is_dir()
  assert not (tmp_path / "tfds" / "mnist_idx").exists()


@pytest.mark.parametrize("dataset", ["fashion_mnist", "kmnist"])
def test_a_drop_in_dataset_without_files_fails_offline_at_once_naming_it(
  dataset, tmp_path, monkeypatch
):
  from flax_mnist import tfds_builder

  monkeypatch.setitem(tfds_builder.DOWNLOAD_URLS, dataset, f"http://127.0.0.1:9/{dataset}/")
  with pytest.raises(DatasetError) as info:
    data.load(dataset, tfds_data_dir=tmp_path / "tfds")
  message = str(info.value)
  assert message.startswith(f"no {dataset} files given, and 127.0.0.1:9 cannot be reached")
  assert "--config.data_dir=DIR" in message and data.DATA_DIR_ENV not in message
  assert not (tmp_path / "tfds").exists()
