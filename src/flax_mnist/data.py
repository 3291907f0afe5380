"""The data: where it comes from, IDX parsing with validation, and normalisation.

MNIST, or a drop-in of its format (``DATASETS``: Fashion-MNIST and KMNIST ship the same four IDX
file names), or a user's own arrays (``from_arrays``). Images are kept as uint8 NHWC
``(N, 28, 28, 1)`` and labels as int32, in the original order of the files; scaling to [0, 1]
happens on device (``normalize_images``) so the host never holds a float copy of the dataset.

Sources, first match wins (``load``):
  1. an explicit ``data_dir`` (``config.data_dir``) holding the four IDX files;
  2. for MNIST only, the environment variable ``FLAX_MNIST_DATA_DIR``;
  3. TFDS: the ``<dataset>_idx`` builder of ``flax_mnist.tfds_builder``, prepared as
     array_record (downloads on a machine with internet, fails in seconds without; no
     TensorFlow needed).
"""

from __future__ import annotations

import dataclasses
import gzip
import hashlib
import os
import zlib
from pathlib import Path

import jax.numpy as jnp
import numpy as np

from flax_mnist.errors import DatasetError

DATA_DIR_ENV = "FLAX_MNIST_DATA_DIR"  # MNIST's IDX directory (not the other datasets').
# The datasets of MNIST's format ``config.dataset`` names: 28x28x1 uint8 images, 10 classes.
DATASETS = ("mnist", "fashion_mnist", "kmnist")
NUM_CLASSES = 10
IMAGE_SHAPE = (28, 28, 1)
SPLITS = ("train", "test")
# File stems of the original distribution; each may also be gzipped (stem + ".gz").
IDX_FILES = {
  "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
  "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
_IDX_UBYTE = 0x08
_GZIP_MAGIC = b"\x1f\x8b"


@dataclasses.dataclass(frozen=True)
class Split:
  """One split on the host: NHWC images (uint8, or float32 in [0, 1] from arrays), int32 labels."""

  images: np.ndarray
  labels: np.ndarray

  def __len__(self) -> int:
    return len(self.labels)


@dataclasses.dataclass(frozen=True)
class Dataset:
  """Both splits, a human-readable description of where they came from, and what the images
  are: MNIST from its files, or a user's arrays (``from_arrays``)."""

  train: Split
  test: Split
  source: str
  name: str = "mnist"
  num_classes: int = NUM_CLASSES

  @property
  def image_shape(self) -> tuple[int, ...]:
    """(height, width, channels) of every image."""
    return tuple(int(size) for size in self.train.images.shape[1:])

  def identity(self) -> str:
    """What the data is, whatever its path: split sizes and a content fingerprint (BLAKE2b of
    the shapes, images and labels of both splits; ~0.1 s for MNIST's 55 MB). A resume on other
    data is refused by it."""
    digest = hashlib.blake2b(digest_size=12)
    for split in (self.train, self.test):
      for array in (split.images, split.labels):
        digest.update(repr((array.shape, array.dtype.str)).encode())
        digest.update(np.ascontiguousarray(array).data)
    figures = f"{len(self.train):,} train + {len(self.test):,} test images"
    if self.name != "mnist":  # (MNIST's identity reads as it always has: its workdirs resume.)
      figures = f"{self.name}: {figures} of {'x'.join(map(str, self.image_shape))}, "
      figures += f"{self.num_classes} classes"
    return f"{figures}, blake2b {digest.hexdigest()}"


Mnist = Dataset  # The name before other data could be trained on.


def from_arrays(
  train_images: np.ndarray,
  train_labels: np.ndarray,
  test_images: np.ndarray,
  test_labels: np.ndarray,
  *,
  name: str,
  num_classes: int | None = None,
) -> Dataset:
  """A dataset of your own arrays, for ``train.train_and_evaluate(config, workdir, data=...)``
  and ``train_seeds``: images ``(N, H, W, C)`` as uint8 (scaled by 1/255 on device, as MNIST)
  or floats in [0, 1] (used as they are), integer labels in ``0..num_classes - 1``
  (``num_classes`` defaults to the largest label + 1). Any H, W, C; the family adapts to them.
  Each bad array is a one-line DatasetError naming it and what was expected."""
  if not isinstance(name, str) or not name.strip():
    raise DatasetError(f"name {name!r}: expected a non-empty string naming the dataset")
  arrays = {
    "train_images": _checked_images("train_images", train_images),
    "test_images": _checked_images("test_images", test_images),
    "train_labels": _checked_labels("train_labels", train_labels),
    "test_labels": _checked_labels("test_labels", test_labels),
  }
  if arrays["train_images"].shape[1:] != arrays["test_images"].shape[1:]:
    raise DatasetError(
      f"test_images: images of {arrays['test_images'].shape[1:]}, expected "
      f"{arrays['train_images'].shape[1:]} as train_images"
    )
  if arrays["train_images"].dtype != arrays["test_images"].dtype:
    raise DatasetError(
      f"test_images: {arrays['test_images'].dtype}, expected {arrays['train_images'].dtype} as "
      "train_images"
    )
  largest = max(int(arrays["train_labels"].max()), int(arrays["test_labels"].max()))
  if num_classes is None:
    num_classes = largest + 1
  elif not isinstance(num_classes, int) or isinstance(num_classes, bool) or num_classes < 1:
    raise DatasetError(f"num_classes {num_classes!r}: expected a positive integer")
  for split in ("train", "test"):
    labels = arrays[f"{split}_labels"]
    if labels.max() >= num_classes:
      index = int(np.argmax(labels >= num_classes))
      raise DatasetError(
        f"{split}_labels: label {labels[index]} at index {index}, expected 0..{num_classes - 1}"
      )
  splits = {
    split: make_split(
      arrays[f"{split}_images"],
      arrays[f"{split}_labels"],
      images_name=f"{split}_images",
      labels_name=f"{split}_labels",
    )
    for split in ("train", "test")
  }
  return Dataset(
    train=splits["train"],
    test=splits["test"],
    source=f"arrays ({name})",
    name=name,
    num_classes=num_classes,
  )


def _checked_images(name: str, images: np.ndarray) -> np.ndarray:
  """``images`` as uint8 or float32 (N, H, W, C), or a DatasetError naming ``name``."""
  images = np.asarray(images)
  if images.ndim != 4 or 0 in images.shape[1:]:
    raise DatasetError(
      f"{name}: shape {images.shape}, expected (N, height, width, channels), e.g. (N, 28, 28, 1)"
    )
  if images.dtype == np.uint8:
    return images
  if not np.issubdtype(images.dtype, np.floating):
    raise DatasetError(f"{name}: {images.dtype}, expected uint8 or floats in [0, 1]")
  if images.size and not (np.isfinite(images).all() and images.min() >= 0 and images.max() <= 1):
    raise DatasetError(
      f"{name}: values in [{np.nanmin(images):g}, {np.nanmax(images):g}], expected floats in "
      "[0, 1] (or uint8 0..255)"
    )
  return images.astype(np.float32)


def _checked_labels(name: str, labels: np.ndarray) -> np.ndarray:
  """``labels`` as int32 (N,) of non-negative integers, or a DatasetError naming ``name``."""
  labels = np.asarray(labels)
  if labels.ndim != 1 or labels.size == 0:
    raise DatasetError(f"{name}: shape {labels.shape}, expected (N,) integer labels, N >= 1")
  if not np.issubdtype(labels.dtype, np.integer) or labels.min() < 0:
    raise DatasetError(f"{name}: {labels.dtype} labels, expected non-negative integers")
  return labels.astype(np.int32)


def _read_bytes(path: Path) -> bytes:
  """The decompressed bytes of ``path``, gzipped or not (told by its magic, not its name)."""
  try:
    raw = path.read_bytes()
  except OSError as error:
    raise DatasetError(f"{path}: cannot read ({error.strerror})") from None
  if raw[:2] != _GZIP_MAGIC:
    return raw
  try:
    return gzip.decompress(raw)
  except (OSError, EOFError, zlib.error) as error:
    raise DatasetError(f"{path}: corrupt gzip data ({error})") from None


def read_idx(path: str | os.PathLike, *, ndim: int) -> np.ndarray:
  """Reads an IDX file of unsigned bytes with ``ndim`` dimensions into a uint8 array.

  Checks the magic number (0x0000 08 ndim), that the header is complete and that the
  file length equals the header's dimensions; raises DatasetError naming the file.
  """
  path = Path(path)
  data = _read_bytes(path)
  header_size = 4 + 4 * ndim
  if len(data) < 4:
    raise DatasetError(
      f"{path}: {len(data)} bytes, too short for an IDX header (expected at least {header_size})"
    )
  expected_magic = bytes([0, 0, _IDX_UBYTE, ndim])
  if data[:4] != expected_magic:
    raise DatasetError(
      f"{path}: bad magic number 0x{data[:4].hex()}, expected 0x{expected_magic.hex()} "
      f"(IDX unsigned bytes, {ndim} dimension{'s' if ndim > 1 else ''})"
    )
  if len(data) < header_size:
    raise DatasetError(
      f"{path}: truncated header, {len(data)} bytes, expected at least {header_size}"
    )
  dims = tuple(int(d) for d in np.frombuffer(data, dtype=">u4", count=ndim, offset=4))
  expected_size = header_size + int(np.prod(dims, dtype=np.int64))
  if len(data) != expected_size:
    raise DatasetError(
      f"{path}: file length {len(data)} bytes, expected {expected_size} for dimensions {dims}"
    )
  return np.frombuffer(data, dtype=np.uint8, offset=header_size).reshape(dims)


def read_images(path: str | os.PathLike) -> np.ndarray:
  """Reads an IDX image file into uint8 NHWC ``(N, 28, 28, 1)``."""
  images = read_idx(path, ndim=3)
  if images.shape[1:] != IMAGE_SHAPE[:2]:
    raise DatasetError(
      f"{path}: images are {images.shape[1]}x{images.shape[2]}, expected "
      f"{IMAGE_SHAPE[0]}x{IMAGE_SHAPE[1]}"
    )
  return images[..., None]


def read_labels(path: str | os.PathLike) -> np.ndarray:
  """Reads an IDX label file into int32 ``(N,)``, checking every label is in 0..9."""
  labels = read_idx(path, ndim=1)
  if labels.size and labels.max() >= NUM_CLASSES:
    index = int(np.argmax(labels >= NUM_CLASSES))
    raise DatasetError(
      f"{path}: label {labels[index]} at index {index}, expected 0..{NUM_CLASSES - 1}"
    )
  return labels.astype(np.int32)


def find_idx_file(directory: str | os.PathLike, stem: str) -> Path:
  """The path of ``stem`` or ``stem.gz`` in ``directory``; DatasetError if neither exists."""
  directory = Path(directory)
  for name in (stem, stem + ".gz"):
    if (directory / name).is_file():
      return directory / name
  if not directory.is_dir():
    raise DatasetError(f"{directory}: not a directory (expected one holding the four IDX files)")
  raise DatasetError(f"{directory / stem}: missing, expected {stem} or {stem}.gz in {directory}")


def make_split(
  images: np.ndarray, labels: np.ndarray, *, images_name: str, labels_name: str
) -> Split:
  """Pairs images and labels, checking that there are some and that their counts are equal."""
  if len(images) == 0:
    raise DatasetError(
      f"{images_name}: 0 images, expected at least one (MNIST has 60,000 + 10,000)"
    )
  if len(images) != len(labels):
    raise DatasetError(
      f"{labels_name}: {len(labels)} labels, expected {len(images)} to match the images in "
      f"{images_name}"
    )
  return Split(images=np.ascontiguousarray(images), labels=np.ascontiguousarray(labels))


def load_idx_split(directory: str | os.PathLike, split: str) -> Split:
  """Loads one split (``"train"`` or ``"test"``) from the IDX files in ``directory``."""
  if split not in IDX_FILES:
    raise DatasetError(f"split {split!r}: unknown, expected one of {', '.join(IDX_FILES)}")
  images_stem, labels_stem = IDX_FILES[split]
  images_path = find_idx_file(directory, images_stem)
  labels_path = find_idx_file(directory, labels_stem)
  return make_split(
    read_images(images_path),
    read_labels(labels_path),
    images_name=str(images_path),
    labels_name=str(labels_path),
  )


def load_idx_dir(directory: str | os.PathLike, name: str = "mnist") -> Dataset:
  """Loads train and test from a directory of IDX files, as the dataset ``name``."""
  return Dataset(
    train=load_idx_split(directory, "train"),
    test=load_idx_split(directory, "test"),
    source=f"IDX files in {Path(directory).resolve()}",
    name=name,
  )


def load(
  dataset: str = "mnist",
  data_dir: str | os.PathLike | None = None,
  *,
  tfds_data_dir: str | os.PathLike | None = None,
) -> Dataset:
  """Loads ``dataset`` (one of ``DATASETS``) from the first available source (see the module
  docstring)."""
  if dataset not in DATASETS:
    raise DatasetError(f"dataset {dataset!r}: unknown, expected one of {', '.join(DATASETS)}")
  if data_dir:
    return load_idx_dir(data_dir, dataset)
  env_dir = os.environ.get(DATA_DIR_ENV) if dataset == "mnist" else None
  if env_dir:
    return load_idx_dir(env_dir)
  # Imported here so that the IDX path never pays for importing TFDS.
  from flax_mnist import tfds_builder

  return tfds_builder.load(data_dir=tfds_data_dir, dataset=dataset)


def load_mnist(
  data_dir: str | os.PathLike | None = None, *, tfds_data_dir: str | os.PathLike | None = None
) -> Dataset:
  """Loads MNIST from the first available source: ``load("mnist", ...)``."""
  return load("mnist", data_dir, tfds_data_dir=tfds_data_dir)


def normalize_images(images: jnp.ndarray) -> jnp.ndarray:
  """Scales uint8 images to float32 in [0, 1] (x / 255), as the notebook does; runs on device.
  Float images (``from_arrays``) are in [0, 1] already and pass as they are."""
  if jnp.issubdtype(images.dtype, jnp.floating):
    return images.astype(jnp.float32)
  return images.astype(jnp.float32) / 255.0
