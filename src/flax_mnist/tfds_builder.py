"""TFDS builders for MNIST and its drop-ins that prepare array_record from the IDX files, without
TensorFlow.

TFDS's stock ``mnist`` (``fashion_mnist``, ``kmnist``) builders prepare through TensorFlow and
``tfds.load`` needs it too; these builders parse the IDX files with ``flax_mnist.data`` (so the
same validation applies) and are read back with ``as_data_source`` (array_record), which needs no
TensorFlow either. Importing this module registers them with TFDS as ``mnist_idx``,
``fashion_mnist_idx`` and ``kmnist_idx``: the three datasets ship the same four IDX file names.

Without a network, preparing fails in seconds, not after TFDS's minutes of retries: the download
host is probed first (``PROBE_TIMEOUT_S``). A failed preparation leaves nothing behind in the TFDS
data dir that was not there before (downloads, incomplete directories).
"""

from __future__ import annotations

import os
import shutil
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

import numpy as np
import tensorflow_datasets as tfds

from flax_mnist import data
from flax_mnist.errors import DatasetError

# Where the stock TFDS builders download each dataset's four IDX files from.
DOWNLOAD_URLS = {
  "mnist": "https://storage.googleapis.com/cvdf-datasets/mnist/",
  "fashion_mnist": "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",
  "kmnist": "http://codh.rois.ac.jp/kmnist/dataset/kmnist/",
}
# How long the download host may take to answer before the download is abandoned.
PROBE_TIMEOUT_S = 5.0


def _shown(dataset: str) -> str:
  """How a message names ``dataset``: MNIST by its name, the others as config.dataset does."""
  return "MNIST" if dataset == "mnist" else dataset


def data_hint(dataset: str = "mnist") -> str:
  """The ways to give ``dataset``'s files instead, said by every failure to download them."""
  hint = (
    f"give a directory of the four {_shown(dataset)} IDX files with --config.data_dir=DIR "
    "(--data_dir=DIR to evaluate.py, compare.py, benchmark.py)"
  )
  return hint + (f" or {data.DATA_DIR_ENV}=DIR" if dataset == "mnist" else "")


class _IdxBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
  """A dataset of the four IDX files, in the original order; a subclass names it."""

  dataset = "mnist"  # A key of DOWNLOAD_URLS.
  DESCRIPTION = ""
  HOMEPAGE = ""
  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "First release: uint8 (28, 28, 1) images, original order."}
  MANUAL_DOWNLOAD_INSTRUCTIONS = (
    "Optional: put the four IDX files (gzipped or not) in the manual dir to prepare offline."
  )

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(
      builder=self,
      description=self.DESCRIPTION,
      features=tfds.features.FeaturesDict(
        {
          "image": tfds.features.Tensor(shape=data.IMAGE_SHAPE, dtype=np.uint8),
          "label": tfds.features.ClassLabel(num_classes=data.NUM_CLASSES),
        }
      ),
      supervised_keys=("image", "label"),
      # Keep the original file order; TFDS would otherwise shuffle records by key hash.
      disable_shuffling=True,
      homepage=self.HOMEPAGE,
    )

  def _split_generators(self, dl_manager):
    paths = self._local_files(dl_manager)
    if paths is None:
      urls = {
        stem: DOWNLOAD_URLS[self.dataset] + stem + ".gz"
        for stems in data.IDX_FILES.values()
        for stem in stems
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
    return _manual_files(manual_dir)

  def _generate_examples(self, images_path, labels_path):
    split = data.make_split(
      data.read_images(images_path),
      data.read_labels(labels_path),
      images_name=str(images_path),
      labels_name=str(labels_path),
    )
    for index in range(len(split)):
      yield index, {"image": split.images[index], "label": int(split.labels[index])}


class MnistIdx(_IdxBuilder):
  """MNIST from the four original IDX files, in the original order."""

  dataset = "mnist"
  DESCRIPTION = "MNIST handwritten digits (LeCun, Cortes, Burges), from the IDX files."
  HOMEPAGE = "http://yann.lecun.com/exdb/mnist/"


class FashionMnistIdx(_IdxBuilder):
  """Fashion-MNIST (Zalando) from its four IDX files, in the original order."""

  dataset = "fashion_mnist"
  DESCRIPTION = "Fashion-MNIST: Zalando's article images, MNIST's format (Xiao et al., 2017)."
  HOMEPAGE = "https://github.com/zalandoresearch/fashion-mnist"


class KmnistIdx(_IdxBuilder):
  """Kuzushiji-MNIST from its four IDX files, in the original order."""

  dataset = "kmnist"
  DESCRIPTION = "Kuzushiji-MNIST: cursive Japanese characters, MNIST's format (Clanuwat et al.)."
  HOMEPAGE = "https://github.com/rois-codh/kmnist"


BUILDERS: dict[str, type[_IdxBuilder]] = {
  builder.dataset: builder for builder in (MnistIdx, FashionMnistIdx, KmnistIdx)
}


def _manual_files(manual_dir: str | os.PathLike | None) -> dict[str, Path] | None:
  """The four IDX files in ``manual_dir``, or None if it is not given or lacks one."""
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


def probe_download(dataset: str = "mnist", timeout: float = PROBE_TIMEOUT_S) -> None:
  """Raises DatasetError naming ``dataset``, with ``data_hint``, when the host it downloads from
  (``DOWNLOAD_URLS``) does not answer within ``timeout`` seconds (no network, no DNS, a firewall);
  the environment's proxies apply."""
  url = DOWNLOAD_URLS[dataset]
  host = urllib.parse.urlsplit(url).netloc
  request = urllib.request.Request(url + data.IDX_FILES["test"][1] + ".gz", method="HEAD")
  try:
    with urllib.request.urlopen(request, timeout=timeout):
      pass
  except urllib.error.HTTPError:  # The host answered: the network is there; TFDS says the rest.
    return
  except (urllib.error.URLError, OSError) as error:
    reason = getattr(error, "reason", None) or error
    reason = getattr(reason, "strerror", None) or str(reason) or type(error).__name__
    raise DatasetError(
      f"no {_shown(dataset)} files given, and {host} cannot be reached to download them "
      f"({reason}); {data_hint(dataset)}"
    ) from None


def _entries(root: Path, name: str) -> set[Path]:
  """What preparing the builder ``name`` may add under the TFDS data dir ``root``: its downloads
  and builder directories and their direct entries (not the rest of a shared TFDS dir)."""
  found = set()
  for directory in (root, root / "downloads", root / "downloads" / name, root / name):
    if directory.is_dir():
      found.add(directory)
      found.update(directory.iterdir())
  return found


def _remove_new(root: Path, name: str, before: set[Path]) -> None:
  """Removes what a failed preparation of ``name`` added under ``root`` (partial downloads,
  incomplete directories), deepest first, and ``root`` itself if it was made for it and is left
  empty."""
  for entry in sorted(_entries(root, name) - before, key=lambda entry: -len(entry.parts)):
    if entry == root:
      continue
    if entry.is_dir() and not entry.is_symlink():
      shutil.rmtree(entry, ignore_errors=True)
    else:
      entry.unlink(missing_ok=True)
  if root not in before and root.is_dir() and not any(root.iterdir()):
    root.rmdir()


def prepare(
  data_dir: str | os.PathLike | None = None,
  manual_dir: str | os.PathLike | None = None,
  *,
  dataset: str = "mnist",
) -> _IdxBuilder:
  """Prepares (once) and returns ``dataset``'s builder; from ``manual_dir`` if given, else by
  download.

  Fails in seconds without a network (DatasetError naming the dataset, ``--config.data_dir``
  and, for MNIST, ``FLAX_MNIST_DATA_DIR``), and leaves no partial download behind on any failure.
  """
  builder = BUILDERS[dataset](
    data_dir=None if data_dir is None else os.fspath(data_dir), file_format="array_record"
  )
  if builder.data_path.exists() and builder.is_prepared():  # (is_prepared warns if not there.)
    return builder
  root = Path(os.fspath(builder.data_dir_root))
  before = _entries(root, builder.name)
  download_config = tfds.download.DownloadConfig(
    manual_dir=None if manual_dir is None else os.fspath(manual_dir),
    try_download_gcs=False,  # The builders are ours: no prepared copy on TFDS's bucket to find.
  )
  try:
    if _manual_files(manual_dir) is None:
      probe_download(dataset)
    builder.download_and_prepare(download_config=download_config)
  except BaseException as error:  # Ctrl-C included: nothing partial stays behind.
    _remove_new(root, builder.name, before)
    if isinstance(error, DatasetError) or not isinstance(error, Exception):
      raise
    # Network, disk and TFDS errors alike: one line that says what to do.
    reason = (str(error).strip().splitlines() or [""])[0][:300]
    raise DatasetError(
      f"TFDS {builder.name} in {builder.data_dir}: could not download or prepare "
      f"({type(error).__name__}: {reason}); {data_hint(dataset)}"
    ) from None
  return builder


def load(
  data_dir: str | os.PathLike | None = None,
  manual_dir: str | os.PathLike | None = None,
  *,
  dataset: str = "mnist",
) -> data.Dataset:
  """Loads both splits of ``dataset`` (a key of ``BUILDERS``) through TFDS's array_record data
  source, as uint8 NHWC and int32."""
  builder = prepare(data_dir, manual_dir, dataset=dataset)
  sources = builder.as_data_source()
  splits = {}
  for split in data.SPLITS:
    records = sources[split].__getitems__(range(len(sources[split])))
    images = np.stack([record["image"] for record in records]).astype(np.uint8)
    labels = np.asarray([record["label"] for record in records], dtype=np.int32)
    splits[split] = data.make_split(
      images, labels, images_name=f"tfds:{split}/image", labels_name=f"tfds:{split}/label"
    )
  return data.Dataset(
    train=splits["train"],
    test=splits["test"],
    source=f"TFDS {builder.name} in {builder.data_dir}",
    name=dataset,
  )
