"""MLP baseline: Flatten, Dense 128, Dense 32, Dense 10 (104,938 params).

Run: python scripts/train.py --config configs/mlp.py --workdir runs/mlp
Expect (20 epochs, batch 512, Adam 1e-3): see the README's results table for best val accuracy
and seconds per epoch on a 2-core CPU.
"""

import ml_collections

from flax_mnist import train


def get_config() -> ml_collections.ConfigDict:
  """The notebook's settings for mlp."""
  config = train.default_config()
  config.model = "mlp"
  return config
