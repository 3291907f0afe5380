"""cnn with 2x2 max-pooling after each conv (57,034 params).

Run: python scripts/train.py --config configs/cnn_pool.py --workdir runs/cnn_pool
Expect (20 epochs, batch 512, Adam 1e-3): see the README's results table for best val accuracy
and seconds per epoch on a 2-core CPU.
"""

import ml_collections

from flax_mnist import train


def get_config() -> ml_collections.ConfigDict:
  """The notebook's settings for cnn_pool."""
  config = train.default_config()
  config.model = "cnn_pool"
  return config
