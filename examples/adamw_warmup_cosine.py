"""Recipe: AdamW with a linear warmup and a cosine decay, from the config alone.

  python examples/adamw_warmup_cosine.py [WORKDIR] [EPOCHS]

The same from the command line:

  python scripts/train.py --config configs/cnn_pool.py --workdir runs/adamw \\
      --config.optimizer=adamw --config.weight_decay=1e-4 --config.learning_rate=3e-3 \\
      --config.lr_schedule=warmup_cosine --config.warmup_epochs=1.0
"""

import sys

from flax_mnist import config, train

workdir = sys.argv[1] if len(sys.argv) > 1 else "runs/example_adamw"
experiment = config.default_config()
experiment.update(
  model="cnn_pool",
  optimizer="adamw",
  weight_decay=1e-4,
  learning_rate=3e-3,
  lr_schedule="warmup_cosine",
  num_epochs=int(sys.argv[2]) if len(sys.argv) > 2 else 5,
)
experiment.warmup_epochs = min(1.0, experiment.num_epochs / 2)
train.train_and_evaluate(experiment, workdir)
