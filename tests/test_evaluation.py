"""Tests for flax_mnist.evaluation and evaluate.py's --report and --predict."""

from __future__ import annotations

import json

import numpy as np
import pytest
from conftest import run_script, small_config
from PIL import Image

from flax_mnist import data, evaluation, train
from flax_mnist.errors import DatasetError


def test_confusion_matrix_and_per_class_accuracy():
  labels = np.array([0, 0, 1, 1, 1, 2])
  predictions = np.array([0, 1, 1, 1, 2, 2])
  matrix = evaluation.confusion_matrix(labels, predictions)
  assert (
    matrix[0, 0] == 1
    and matrix[0, 1] == 1
    and matrix[1, 1] == 2
    and matrix[1, 2] == 1
    and matrix[2, 2] == 1
  )
  assert matrix.sum() == 6 and matrix.shape == (10, 10)
  np.testing.assert_allclose(evaluation.per_class_accuracy(matrix)[:3], [0.5, 2 / 3, 1.0])
  assert evaluation.per_class_accuracy(matrix)[5] == 0  # No images of 5: no division by zero.
  text = evaluation.format_report(matrix)
  assert "    1       3  0.6667" in text and "  all       6  0.6667" in text


def test_most_confident_mistakes_come_first():
  labels = np.array([0, 1, 2, 3])
  probabilities = np.full((4, 10), 0.01)
  probabilities[0, 0] = 0.9  # Right.
  probabilities[1, 7] = 0.6  # Wrong, less sure.
  probabilities[2, 5] = 0.95  # Wrong, most sure.
  probabilities[3, 3], probabilities[3, 4] = 0.3, 0.5  # Wrong, least sure.
  assert evaluation.most_confident_mistakes(labels, probabilities).tolist() == [2, 1, 3]
  assert evaluation.most_confident_mistakes(labels, probabilities, count=1).tolist() == [2]


def test_load_user_image_png_and_npy(tmp_path):
  digit = np.zeros((28, 28), np.uint8)
  digit[5:20, 12:15] = 255
  Image.fromarray(digit).save(tmp_path / "grey.png")
  Image.fromarray(np.stack([digit] * 3, axis=-1)).save(tmp_path / "rgb.png")
  np.save(tmp_path / "floats.npy", digit / 255.0)
  for name in ("grey.png", "rgb.png", "floats.npy"):
    image = evaluation.load_user_image(tmp_path / name)
    assert image.shape == (1, 28, 28, 1) and image.dtype == np.uint8
    np.testing.assert_array_equal(image[0, ..., 0], digit)


@pytest.mark.parametrize(
  "name, content, message",
  [
    ("big.npy", np.zeros((32, 32)), "image is 32x32, expected 28x28"),
    ("range.npy", np.full((28, 28), 2.0), r"float values in \[2, 2\], expected \[0, 1\]"),
    ("digit.jpg", None, "unsupported file type '.jpg', expected .png or .npy"),
    ("broken.png", b"not a png", "not a readable PNG"),
    ("zero.npy", b"", "empty file, expected 28x28 grey levels"),
    ("text.npy", b"1 2 3", r"not a .npy file \(no NUMPY header\)"),
    ("empty.npy", np.zeros((0, 28)), r"an empty array, shape \(0, 28\)"),
    ("scalar.npy", np.array(0.5), "image is a single value, expected 28x28"),
    ("inf.npy", np.where(np.eye(28) > 0, np.inf, 0.0), "28 infinite values of 784"),
    ("nan.npy", np.where(np.eye(28) > 0, np.nan, 0.0)[:1, :1], "1 NaN value of 1"),
    ("bool.npy", np.ones((28, 28), bool), r"an array of booleans \(bool\)"),
    ("complex.npy", np.zeros((28, 28), complex), "an array of complex numbers"),
    ("bytes.npy", np.full((28, 28), b"x"), r"an array of bytes \(\|S1\)"),
    ("ints.npy", np.full((28, 28), 256), r"integer values in \[256, 256\], expected 0..255"),
  ],
)
def test_bad_user_images_are_one_line_errors(tmp_path, name, content, message):
  path = tmp_path / name
  if isinstance(content, np.ndarray):
    np.save(path, content)
  else:
    path.write_bytes(content or b"")
  with pytest.raises(DatasetError, match=message) as info:
    evaluation.load_user_image(path)
  assert str(info.value).startswith(str(path)) and "\n" not in str(info.value)


def test_light_background_tells_a_dark_digit_on_white():
  digit = np.zeros((28, 28), np.uint8)
  digit[5:22, 12:16] = 255  # Light on dark, as MNIST: no warning.
  assert evaluation.light_background(digit) is None
  assert evaluation.light_background(255 - digit) == 255.0
  touching = digit.copy()
  touching[:, 13] = 255  # A stroke across the whole image: the frame stays mostly dark.
  assert evaluation.light_background(touching[None, ..., None]) is None


@pytest.mark.integration
def test_evaluate_report_and_predict_from_the_command_line(idx_dir, tmp_path):
  workdir = tmp_path / "run"
  history = train.train_and_evaluate(small_config(idx_dir, num_epochs=3), workdir, print_fn=None)
  result = run_script(
    "evaluate.py", "--workdir", str(workdir), "--data_dir", str(idx_dir), "--report", "--json"
  )
  assert result.returncode == 0, result.stderr[-3000:]
  summary = json.loads(result.stdout.strip().splitlines()[-1])
  matrix = np.array(summary["confusion_matrix"])
  best = max(history, key=lambda record: record["val_accuracy"])
  assert (
    matrix.sum() == 100
    and np.trace(matrix) / 100 == best["val_accuracy"] == summary["test_accuracy"]
  )
  for name in ("report.txt", "confusion_matrix.png", "mistakes.png"):
    assert (workdir / "report" / name).stat().st_size > 0
  assert Image.open(workdir / "report" / "confusion_matrix.png").size[0] > 300
  test = data.load_idx_dir(idx_dir).test
  np.save(tmp_path / "digit.npy", test.images[0, ..., 0])
  result = run_script(
    "evaluate.py", "--workdir", str(workdir), "--predict", str(tmp_path / "digit.npy"), "--json"
  )
  assert result.returncode == 0, result.stderr[-3000:]
  prediction = json.loads(result.stdout.strip().splitlines()[-1])
  assert abs(sum(prediction["probabilities"]) - 1) < 1e-5
  assert prediction["predicted"] == int(np.argmax(prediction["probabilities"]))
  result = run_script(
    "evaluate.py", "--workdir", str(workdir), "--predict", str(tmp_path / "missing.png")
  )
  assert (
    result.returncode == 2
    and "Traceback" not in result.stderr
    and "missing.png: no such file" in result.stderr
  )
