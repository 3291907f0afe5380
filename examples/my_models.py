"""A model defined outside flax_mnist, with stock flax.nnx layers: nothing to register.

Name it by import path: ``--config.model=my_models:wide_cnn`` with this folder on PYTHONPATH
(or ``config.model = "my_models:wide_cnn"`` from Python). Any factory ``fn(*, rngs, **kwargs)``
returning an nnx.Module that maps float NHWC images in [0, 1] to logits works;
``config.model_kwargs`` are passed to it.
"""

from flax import nnx


class WideCnn(nnx.Module):
  """Conv 32 (3x3, same), max-pool, Dense 10: a stock-nnx classifier."""

  def __init__(self, width: int, *, rngs: nnx.Rngs):
    self.conv = nnx.Conv(1, width, kernel_size=(3, 3), rngs=rngs)
    self.dense = nnx.Linear(14 * 14 * width, 10, rngs=rngs)

  def __call__(self, images):
    features = nnx.max_pool(nnx.relu(self.conv(images)), (2, 2), strides=(2, 2))
    return self.dense(features.reshape(features.shape[0], -1))


def wide_cnn(*, rngs: nnx.Rngs, width: int = 32) -> WideCnn:
  """The factory a config names: ``my_models:wide_cnn``."""
  return WideCnn(width, rngs=rngs)
