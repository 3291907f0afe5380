"""Recipe: train on data of your own, here MNIST's digits 0-4 turned a quarter turn, with a
half-width cnn_pool.

  python examples/own_data.py [WORKDIR] [EPOCHS]

``data.from_arrays`` takes uint8 (N, H, W, C) images (or floats in [0, 1]) and integer labels
of any shape and number of classes; the family adapts to them (the trainer passes the data's
shape and classes to the model), the data's identity is recorded, and a resume on other data
(or a rerun of the CLI, which trains on MNIST) is refused.
"""

import sys

import numpy as np

from flax_mnist import config, data, train

mnist = data.load_mnist()  # $FLAX_MNIST_DATA_DIR, else TFDS.


def rotated_low_digits(split: data.Split) -> tuple[np.ndarray, np.ndarray]:
  keep = split.labels < 5
  return np.rot90(split.images[keep], k=1, axes=(1, 2)), split.labels[keep]


dataset = data.from_arrays(
  *rotated_low_digits(mnist.train), *rotated_low_digits(mnist.test), name="rotated_digits_0to4"
)
workdir = sys.argv[1] if len(sys.argv) > 1 else "runs/example_own_data"
experiment = config.default_config()
experiment.model = "cnn_pool"
experiment.model_kwargs = {"width": 0.5}  # Convolutions of 4 and 8 filters, Dense 64 and 16.
experiment.num_epochs = int(sys.argv[2]) if len(sys.argv) > 2 else 3
train.train_and_evaluate(experiment, workdir, data=dataset)
