"""The notebook's own stack, Keras 3 + TensorFlow, timed like flax_mnist's benchmark.

Run by ``flax_mnist.benchmark`` (``scripts/benchmark.py --baseline keras``) in its own
interpreter, which needs keras and tensorflow (``pip install -e ".[baseline]"``, best in a
separate virtual environment: TensorFlow pins protobuf). Reads a JSON request on stdin
(``{"models": [...], "epochs": N, "data_dir": DIR}``) and prints one JSON line.

The models are the notebook's (same layers, Keras defaults), trained as the notebook does:
Adam 1e-3, sparse cross-entropy, batch 512, the test set as validation data every epoch.
An epoch's time is ``fit``'s epoch, validation included; eval time is the validation part.
"""

import gzip
import json
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ["KERAS_BACKEND"] = "tensorflow"
import keras  # noqa: E402
import tensorflow as tf  # noqa: E402
from keras import layers  # noqa: E402

FILES = {
  "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
  "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}


def read_idx(directory: Path, stem: str) -> np.ndarray:
  """Reads one IDX file (gzipped or not); the project's validated reader is not importable here."""
  path = directory / stem if (directory / stem).exists() else directory / (stem + ".gz")
  raw = path.read_bytes()
  raw = gzip.decompress(raw) if raw[:2] == b"\x1f\x8b" else raw
  ndim = raw[3]
  dims = np.frombuffer(raw, ">u4", count=ndim, offset=4)
  return np.frombuffer(raw, np.uint8, offset=4 + 4 * ndim).reshape(dims)


def build(name: str) -> keras.Model:
  """The notebook's models."""
  conv = lambda filters: layers.Conv2D(filters, (3, 3), padding="valid", activation="relu")
  stack = [keras.Input((28, 28, 1))]
  if name == "mlp":
    stack += [layers.Flatten()]
  elif name == "cnn":
    stack += [conv(8), conv(16), layers.Flatten()]
  elif name == "cnn_pool":
    stack += [conv(8), layers.MaxPooling2D(), conv(16), layers.MaxPooling2D(), layers.Flatten()]
  elif name == "cnn_pool_bn":
    stack += [
      conv(8),
      layers.MaxPooling2D(),
      layers.BatchNormalization(),
      layers.Dropout(0.2),
      conv(16),
      layers.MaxPooling2D(),
      layers.BatchNormalization(),
      layers.Dropout(0.2),
      layers.Flatten(),
    ]
  else:
    raise SystemExit(f"unknown model {name}")
  rate, batch_norm = (0.5, True) if name == "cnn_pool_bn" else (0.2, False)
  for units in (128, 32):
    stack.append(layers.Dense(units, activation="relu"))
    if batch_norm:
      stack.append(layers.BatchNormalization())
    stack.append(layers.Dropout(rate))
  stack.append(layers.Dense(10, activation="softmax"))
  return keras.Sequential(stack)


class EpochTimer(keras.callbacks.Callback):
  """Wall time of each epoch (fit's validation included) and of its validation pass."""

  def __init__(self):
    super().__init__()
    self.epochs, self.evals = [], []

  def on_epoch_begin(self, epoch, logs=None):
    self._epoch_started = time.perf_counter()

  def on_test_begin(self, logs=None):
    self._eval_started = time.perf_counter()

  def on_test_end(self, logs=None):
    self.evals.append(time.perf_counter() - self._eval_started)

  def on_epoch_end(self, epoch, logs=None):
    self.epochs.append(time.perf_counter() - self._epoch_started)


def main() -> None:
  request = json.load(sys.stdin)
  threads = os.cpu_count()
  tf.config.threading.set_intra_op_parallelism_threads(threads)
  directory = Path(request["data_dir"])
  data = {
    split: (
      read_idx(directory, images)[..., None] / 255.0,
      read_idx(directory, labels).astype(np.int32),
    )
    for split, (images, labels) in FILES.items()
  }
  (train_images, train_labels), (test_images, test_labels) = data["train"], data["test"]
  result = {
    "environment": {
      "keras": keras.__version__,
      "tensorflow": tf.__version__,
      "intra_op_threads": threads,
    },
    "models": {},
  }
  for name in request["models"]:
    keras.utils.set_random_seed(0)
    model = build(name)
    model.compile(
      optimizer=keras.optimizers.Adam(1e-3),
      loss="sparse_categorical_crossentropy",
      metrics=["accuracy"],
    )
    timer = EpochTimer()
    history = model.fit(
      train_images,
      train_labels,
      batch_size=512,
      epochs=request["epochs"],
      validation_data=(test_images, test_labels),
      callbacks=[timer],
      verbose=0,
    )
    steady = slice(1, None) if len(timer.epochs) > 1 else slice(None)
    epoch_seconds = statistics.median(timer.epochs[steady])
    eval_seconds = statistics.median(timer.evals[steady])
    result["models"][name] = {
      "params": model.count_params(),
      "epoch_seconds": epoch_seconds,
      "eval_seconds": eval_seconds,
      "train_seconds": epoch_seconds - eval_seconds,
      "first_epoch_seconds": timer.epochs[0],
      "epoch_seconds_all": timer.epochs,
      "best_val_accuracy": max(history.history["val_accuracy"]),
      "final_val_accuracy": history.history["val_accuracy"][-1],
    }
  print(json.dumps(result))


if __name__ == "__main__":
  main()
