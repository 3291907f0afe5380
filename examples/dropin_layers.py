"""Your own model at the family's speed on CPU: flax_mnist.nn's drop-ins for flax.nnx's layers.

The notebook's cnn_pool written with stock flax.nnx layers (``mode="stock"``), the same with
``nn.Conv`` and ``nn.max_pool`` in their place (``"dropin"``: the same arguments, parameters and
results), and with ``nn.conv_pool`` (``"fused"``: each Conv + ReLU + MaxPool as the family's s2d
block). The trainer warns about the stock one on CPU. Step times: benchmarks/README.md.

  python examples/dropin_layers.py WORKDIR [EPOCHS] [MODE]

trains ``dropin_layers:cnn_pool`` with ``model_kwargs={"mode": MODE}`` (default fused).
"""

import sys

from flax import nnx

from flax_mnist import nn


class CnnPool(nnx.Module):
  """Conv 8, MaxPool, Conv 16, MaxPool, Dense 128, Dense 32, Dense 10 (Dropout 0.2 in the head),
  as the family's cnn_pool; ``mode`` picks the layers (see the module docstring)."""

  def __init__(self, mode: str, *, rngs: nnx.Rngs):
    conv = nnx.Conv if mode == "stock" else nn.Conv
    self.mode = mode
    self.conv1 = conv(1, 8, (3, 3), padding="VALID", rngs=rngs)
    self.conv2 = conv(8, 16, (3, 3), padding="VALID", rngs=rngs)
    self.dense1 = nnx.Linear(5 * 5 * 16, 128, rngs=rngs)
    self.dense2 = nnx.Linear(128, 32, rngs=rngs)
    self.dense3 = nnx.Linear(32, 10, rngs=rngs)
    self.dropout = nnx.Dropout(0.2, rngs=rngs)

  def _conv_pool(self, conv, images):
    if self.mode == "fused":
      return nn.conv_pool(conv, images, 2)
    pool = nnx.max_pool if self.mode == "stock" else nn.max_pool
    return pool(nnx.relu(conv(images)), (2, 2), strides=(2, 2))

  def __call__(self, images):
    features = self._conv_pool(self.conv2, self._conv_pool(self.conv1, images))
    hidden = features.reshape(features.shape[0], -1)
    hidden = self.dropout(nnx.relu(self.dense1(hidden)))
    hidden = self.dropout(nnx.relu(self.dense2(hidden)))
    return self.dense3(hidden)


def cnn_pool(*, rngs: nnx.Rngs, mode: str = "fused") -> CnnPool:
  """The factory a config names: ``dropin_layers:cnn_pool``."""
  if mode not in ("stock", "dropin", "fused"):
    raise ValueError(f"mode {mode!r}: expected stock, dropin or fused")
  return CnnPool(mode, rngs=rngs)


if __name__ == "__main__":
  from flax_mnist import config as config_lib
  from flax_mnist import train

  workdir = sys.argv[1]
  experiment = config_lib.default_config()
  experiment.model = "dropin_layers:cnn_pool"
  experiment.model_kwargs = {"mode": sys.argv[3] if len(sys.argv) > 3 else "fused"}
  experiment.num_epochs = int(sys.argv[2]) if len(sys.argv) > 2 else 3
  train.train_and_evaluate(experiment, workdir)
