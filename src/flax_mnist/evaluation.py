"""Evaluation of a trained model: test loss and accuracy, probabilities, per-class accuracy,
the confusion matrix, the most confidently misclassified images, and predictions for a user's
own image. (The multi-seed study's report is ``flax_mnist.study``.)"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from flax_mnist import data, steps
from flax_mnist.errors import DatasetError


def evaluate_model(
  model: nnx.Module, images: Any, labels: Any, *, batch_size: int = 1000
) -> dict[str, float]:
  """Evaluates ``model`` (switched to eval mode) on uint8 NHWC images: loss, accuracy, correct,
  count, with the trainer's own compiled evaluation (every image, a last partial batch masked)."""
  model.eval()
  graphdef, params, model_state = nnx.split(model, nnx.Param, ...)
  evaluate = steps.make_evaluate(graphdef, batch_size)
  metrics = evaluate(params, model_state, jnp.asarray(images), jnp.asarray(labels))
  return steps.summarize(metrics)


def predict_probabilities(
  model: nnx.Module, images: np.ndarray, *, batch_size: int = 1000
) -> np.ndarray:
  """Softmax probabilities ``(N, 10)`` of uint8 NHWC images, in eval mode, batch by batch."""
  model.eval()
  graphdef, state = nnx.split(model)

  @jax.jit
  def probabilities(state, batch):
    return jax.nn.softmax(nnx.merge(graphdef, state)(data.normalize_images(batch)))

  return np.concatenate(
    [
      np.asarray(probabilities(state, jnp.asarray(images[start : start + batch_size])))
      for start in range(0, len(images), batch_size)
    ]
  )


def confusion_matrix(labels: np.ndarray, predictions: np.ndarray) -> np.ndarray:
  """``[true, predicted]`` counts, (10, 10) int64."""
  matrix = np.zeros((data.NUM_CLASSES, data.NUM_CLASSES), np.int64)
  np.add.at(matrix, (labels, predictions), 1)
  return matrix


def per_class_accuracy(matrix: np.ndarray) -> np.ndarray:
  """The accuracy on each true class: the diagonal over the row sums."""
  return np.diag(matrix) / np.maximum(matrix.sum(axis=1), 1)


def format_report(matrix: np.ndarray) -> str:
  """Per-class accuracy and the confusion matrix as text (rows: true digit, columns: predicted)."""
  accuracy = per_class_accuracy(matrix)
  lines = ["digit  images  accuracy"]
  lines += [
    f"{digit:>5}  {matrix[digit].sum():>6}  {accuracy[digit]:.4f}"
    for digit in range(data.NUM_CLASSES)
  ]
  lines += [
    f"{'all':>5}  {matrix.sum():>6}  {np.trace(matrix) / matrix.sum():.4f}",
    "",
    "confusion matrix (rows: true digit, columns: predicted)",
    "      " + "".join(f"{digit:>6}" for digit in range(data.NUM_CLASSES)),
  ]
  lines += [
    f"{digit:>6}" + "".join(f"{count:>6}" for count in matrix[digit])
    for digit in range(data.NUM_CLASSES)
  ]
  return "\n".join(lines) + "\n"


def _pyplot():
  import matplotlib

  matplotlib.use("Agg")  # Files only: no display needed, none touched.
  import matplotlib.pyplot as plt

  return plt


def plot_confusion(matrix: np.ndarray, path: str | os.PathLike, title: str = "") -> None:
  """The confusion matrix as a PNG heat map with the counts written in."""
  plt = _pyplot()
  figure, axes = plt.subplots(figsize=(7, 6))
  image = axes.imshow(np.log1p(matrix), cmap="Blues")
  for true in range(data.NUM_CLASSES):
    for predicted in range(data.NUM_CLASSES):
      axes.text(
        predicted,
        true,
        str(matrix[true, predicted]),
        ha="center",
        va="center",
        fontsize=8,
        color="white" if true == predicted else "black",
      )
  axes.set(
    xlabel="predicted digit",
    ylabel="true digit",
    xticks=range(10),
    yticks=range(10),
    title=title or "confusion matrix (colour: log counts)",
  )
  figure.colorbar(image, ax=axes, label="log(1 + count)")
  figure.tight_layout()
  figure.savefig(path, dpi=120)
  plt.close(figure)


def most_confident_mistakes(
  labels: np.ndarray, probabilities: np.ndarray, count: int = 25
) -> np.ndarray:
  """Indices of misclassified images, highest predicted probability first."""
  predictions = probabilities.argmax(axis=1)
  wrong = np.flatnonzero(predictions != labels)
  return wrong[np.argsort(-probabilities[wrong, predictions[wrong]], kind="stable")][:count]


def plot_mistakes(
  images: np.ndarray,
  labels: np.ndarray,
  probabilities: np.ndarray,
  path: str | os.PathLike,
  count: int = 25,
) -> np.ndarray:
  """A grid of the most confidently misclassified images (true, predicted, probability);
  returns their indices."""
  plt = _pyplot()
  indices = most_confident_mistakes(labels, probabilities, count)
  columns = 5
  rows = max(1, -(-len(indices) // columns))
  figure, axes = plt.subplots(rows, columns, figsize=(2 * columns, 2.2 * rows), squeeze=False)
  for axis in axes.ravel():
    axis.axis("off")
  for axis, index in zip(axes.ravel(), indices):
    predicted = int(probabilities[index].argmax())
    axis.imshow(images[index, ..., 0], cmap="gray")
    axis.set_title(
      f"#{index}: true {labels[index]}, pred {predicted}\np={probabilities[index, predicted]:.3f}",
      fontsize=8,
    )
  figure.suptitle("most confidently misclassified test images")
  figure.tight_layout()
  figure.savefig(path, dpi=120)
  plt.close(figure)
  return indices


# What a user's .npy may hold, said in every refusal of one.
_NPY_EXPECTED = "expected 28x28 grey levels: integers 0..255 or floats in [0, 1]"
_NPY_MAGIC = b"\x93NUMPY"
# A frame this wide around the image: MNIST's is black (the digits are centred in 20x20).
_BORDER = 2


def load_user_image(path: str | os.PathLike) -> np.ndarray:
  """A user's images as uint8 (N, 28, 28, 1): a .png (one image, converted to grey) or a .npy
  of 28x28 values, or of a batch of them, (N, 28, 28) or (N, 28, 28, 1).

  Images are not resized: another size is an error, since MNIST digits are centred in 28x28
  and a resize would quietly change what the model sees. Like MNIST, digits are light on dark
  (``light_background`` tells a dark-on-light one). A .npy must hold numbers: integers 0..255,
  or floats in [0, 1] (scaled to 0..255); an empty, boolean, string, complex or object array,
  NaN or inf, is refused with a one-line DatasetError naming the file.
  """
  path = Path(path)
  if not path.is_file():
    raise DatasetError(f"{path}: no such file")
  if path.suffix.lower() == ".npy":
    array = _load_npy(path)
  elif path.suffix.lower() == ".png":
    from PIL import Image, UnidentifiedImageError

    try:
      with Image.open(path) as image:
        array = np.asarray(image.convert("L"))
    except (UnidentifiedImageError, OSError) as error:
      raise DatasetError(f"{path}: not a readable PNG ({error})") from None
  else:
    raise DatasetError(f"{path}: unsupported file type {path.suffix!r}, expected .png or .npy")
  if array.shape[-2:] != data.IMAGE_SHAPE[:2] or array.ndim not in (2, 3):
    raise DatasetError(
      f"{path}: image is {'x'.join(map(str, array.shape)) or 'a single value'}, expected 28x28 "
      "or a batch N x 28 x 28 (grey, digit light on dark, not resized)"
    )
  return array.astype(np.uint8).reshape(-1, *data.IMAGE_SHAPE)


def _load_npy(path: Path) -> np.ndarray:
  """The grey levels 0..255 of a .npy file, squeezed; DatasetError for anything but numbers."""
  with open(path, "rb") as file:
    magic = file.read(len(_NPY_MAGIC))
  if not magic:
    raise DatasetError(f"{path}: empty file, {_NPY_EXPECTED}")
  if magic != _NPY_MAGIC:
    raise DatasetError(f"{path}: not a .npy file (no NUMPY header), {_NPY_EXPECTED}")
  try:
    array = np.load(path, allow_pickle=False)
  except (ValueError, OSError, EOFError) as error:
    reason = (str(error).split(". ")[0] or type(error).__name__).rstrip(".")
    raise DatasetError(
      f"{path}: not a readable .npy array of numbers ({reason}); {_NPY_EXPECTED}"
    ) from None
  array = np.squeeze(array)
  kind = {"b": "booleans", "U": "strings", "S": "bytes", "c": "complex numbers", "O": "objects"}
  if array.dtype.kind not in "iuf":
    what = kind.get(array.dtype.kind, f"dtype {array.dtype}")
    raise DatasetError(f"{path}: an array of {what} ({array.dtype}), {_NPY_EXPECTED}")
  if array.size == 0:
    raise DatasetError(f"{path}: an empty array, shape {array.shape}; {_NPY_EXPECTED}")
  if array.dtype.kind == "f":
    counts = {"NaN": int(np.isnan(array).sum()), "infinite": int(np.isinf(array).sum())}
    if any(counts.values()):
      found = " and ".join(f"{count} {name}" for name, count in counts.items() if count)
      plural = "s" if sum(counts.values()) > 1 else ""
      raise DatasetError(f"{path}: {found} value{plural} of {array.size}; {_NPY_EXPECTED}")
    if array.min() < 0 or array.max() > 1:
      raise DatasetError(
        f"{path}: float values in [{array.min():.3g}, {array.max():.3g}], expected [0, 1]"
      )
    return np.round(array * 255)
  if array.min() < 0 or array.max() > 255:
    raise DatasetError(f"{path}: integer values in [{array.min()}, {array.max()}], expected 0..255")
  return array


def light_background(image: np.ndarray) -> float | None:
  """The mean grey level (0..255) of the image's outer frame if it is light (above 127), else
  None. MNIST's frame is black, digits light on dark: a dark-on-light image, a scan or a drawing
  on white, is classified as noise by a model trained on MNIST, often confidently."""
  grey = np.asarray(image, np.float64).reshape(data.IMAGE_SHAPE[:2])
  frame = np.ones(grey.shape, bool)
  frame[_BORDER:-_BORDER, _BORDER:-_BORDER] = False
  level = float(grey[frame].mean())
  return level if level > 127 else None
