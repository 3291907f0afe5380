"""A TFDS builder for MNIST that prepares array_record from the IDX files, without TensorFlow.

TFDS's stock ``mnist`` builder prepares through TensorFlow and ``tfds.load`` needs it too;
this builder parses the IDX files with ``flax_mnist.data`` (so the same validation applies)
and is read back with ``as_data_source`` (array_record), which needs no TensorFlow either.
Importing this module registers the builder with TFDS under the name ``mnist_idx``.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import tensorflow_datasets as tfds

from flax_mnist import data
from flax_mnist.errors import DatasetError

# The mirror the stock TFDS builder downloads from.
DOWNLOAD_URL = "https://storage.googleapis.com/cvdf-datasets/mnist/"


class MnistIdx(tfds.core.GeneratorBasedBuilder):
  """MNIST from the four original IDX files, in the original order."""

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "First release: uint8 (28, 28, 1) images, original order."}
  MANUAL_DOWNLOAD_INSTRUCTIONS = (
    "Optional: put the four MNIST IDX files (gzipped or not) in the manual dir to prepare offline."
  )

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(
      builder=self,
      description="MNIST handwritten digits (LeCun, Cortes, Burges), from the IDX files.",
      features=tfds.features.FeaturesDict(
        {
          "image": tfds.features.Tensor(shape=data.IMAGE_SHAPE, dtype=np.uint8),
          "label": tfds.features.ClassLabel(num_classes=data.NUM_CLASSES),
        }
      ),
      supervised_keys=("image", "label"),
      # Keep the original file order; TFDS would otherwise shuffle records by key hash.
      disable_shuffling=True,
      homepage="http://yann.lecun.com/exdb/mnist/",
    )

  def _split_generators(self, dl_manager):
    paths = self._local_files(dl_manager)
    if paths is None:
      urls = {
        stem: DOWNLOAD_URL + stem + ".gz" for stems in data.IDX_FILES.values() for stem in stems
      }
      paths = {stem: Path(path) for stem, path in dl_manager.download(urls).items()}
    return {
      split: self._generate_examples(paths[images], paths[labels])
      for split, (images, labels) in data.IDX_FILES.items()
    }

  @staticmethod
  def _local_files(dl_manager) -> dict[str, Path] | None:
    """The IDX files of the manual dir, if it was given and holds all four."""
    try:
      manual_dir = dl_manager.manual_dir
    except AssertionError:  # TFDS asserts when no manual dir was configured.
      return None
    if manual_dir is None or not Path(manual_dir).is_dir():
      return None
    try:
      return {
        stem: data.find_idx_file(manual_dir, stem)
        for stems in data.IDX_FILES.values()
        for stem in stems
      }
    except DatasetError:
      return None

  def _generate_examples(self, images_path, labels_path):
    split = data.make_split(
      data.read_images(images_path),
      data.read_labels(labels_path),
      images_name=str(images_path),
      labels_name=str(labels_path),
    )
    for index in range(len(split)):
      yield index, {"image": split.images[index], "label": int(split.labels[index])}


def prepare(
  data_dir: str | os.PathLike | None = None, manual_dir: str | os.PathLike | None = None
) -> MnistIdx:
  """Prepares (once) and returns the builder; from ``manual_dir`` if given, else by download."""
  builder = MnistIdx(
    data_dir=None if data_dir is None else os.fspath(data_dir), file_format="array_record"
  )
  download_config = tfds.download.DownloadConfig(
    manual_dir=None if manual_dir is None else os.fspath(manual_dir)
  )
  try:
    builder.download_and_prepare(download_config=download_config)
  except DatasetError:
    raise
  except Exception as error:  # Network, disk and TFDS errors alike: one line that says what to do.
    reason = (str(error).strip().splitlines() or [""])[0][:300]
    raise DatasetError(
      f"TFDS mnist_idx in {builder.data_dir}: could not download or prepare "
      f"({type(error).__name__}: "
      f"{reason}); set FLAX_MNIST_DATA_DIR or config.data_dir to a directory of the MNIST IDX files"
    ) from None
  return builder


def load(
  data_dir: str | os.PathLike | None = None, manual_dir: str | os.PathLike | None = None
) -> data.Mnist:
  """Loads both splits through TFDS's array_record data source, as uint8 NHWC and int32."""
  builder = prepare(data_dir, manual_dir)
  sources = builder.as_data_source()
  splits = {}
  for split in data.SPLITS:
    records = sources[split].__getitems__(range(len(sources[split])))
    images = np.stack([record["image"] for record in records]).astype(np.uint8)
    labels = np.asarray([record["label"] for record in records], dtype=np.int32)
    splits[split] = data.make_split(
      images, labels, images_name=f"tfds:{split}/image", labels_name=f"tfds:{split}/label"
    )
  return data.Mnist(
    train=splits["train"], test=splits["test"], source=f"TFDS mnist_idx in {builder.data_dir}"
  )
