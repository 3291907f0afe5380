"""Recipe: train with a loss of your own (here a focal loss) instead of cross-entropy.

  python examples/own_loss.py [WORKDIR] [EPOCHS]

``loss_fn(logits, labels)`` returns one loss per example; the trainer averages it over the
real images of each batch and reports it as train and val loss.
"""

import sys

import jax
import jax.numpy as jnp

from flax_mnist import config, train


def focal_loss(logits: jax.Array, labels: jax.Array, gamma: float = 2.0) -> jax.Array:
  """-(1 - p)^gamma log p of the true class (Lin et al. 2017)."""
  log_p = jnp.take_along_axis(jax.nn.log_softmax(logits), labels[:, None], axis=-1)[:, 0]
  return -((1 - jnp.exp(log_p)) ** gamma) * log_p


workdir = sys.argv[1] if len(sys.argv) > 1 else "runs/example_focal"
experiment = config.default_config()
experiment.model = "mlp"
experiment.num_epochs = int(sys.argv[2]) if len(sys.argv) > 2 else 3
train.train_and_evaluate(experiment, workdir, loss_fn=focal_loss)
