"""Recipe: freeze a layer with an optax mask: the first convolution keeps its initial weights.

  python examples/frozen_layer.py [WORKDIR] [EPOCHS]

Any optax transformation can replace the config's optimizer from Python
(``train_and_evaluate(config, workdir, optimizer=...)``); config.json then records
"optimizer": "custom". Here Keras's Adam trains every parameter but those of layer 0.
"""

import sys

import jax
import optax

from flax_mnist import config, optim, train


def label(params):
  """'frozen' for the first layer's parameters (path layers/0/...), 'trained' for the rest."""
  return jax.tree_util.tree_map_with_path(
    lambda path, _: "frozen" if getattr(path[1], "key", None) == 0 else "trained", params
  )


workdir = sys.argv[1] if len(sys.argv) > 1 else "runs/example_frozen"
experiment = config.default_config()
experiment.model = "cnn_pool"
experiment.num_epochs = int(sys.argv[2]) if len(sys.argv) > 2 else 3
optimizer = optax.multi_transform(
  {"trained": optim.keras_adam(experiment.learning_rate), "frozen": optax.set_to_zero()}, label
)
train.train_and_evaluate(experiment, workdir, optimizer=optimizer)
