"""Recipe: train, checkpoint and reload a model of your own, named by import path.

  python examples/own_model.py [WORKDIR] [EPOCHS]

The same from the command line (this folder on PYTHONPATH):

  PYTHONPATH=examples python scripts/train.py --config configs/cnn_pool.py \\
      --workdir runs/wide --config.model=my_models:wide_cnn
  PYTHONPATH=examples python scripts/evaluate.py --workdir runs/wide --trust_model_code
"""

import sys

from flax_mnist import checkpoint, config, train

workdir = sys.argv[1] if len(sys.argv) > 1 else "runs/example_own_model"
experiment = config.default_config()
experiment.model = "my_models:wide_cnn"  # examples/my_models.py, found on sys.path.
experiment.model_kwargs = {"width": 16}
experiment.num_epochs = int(sys.argv[2]) if len(sys.argv) > 2 else 3
history = train.train_and_evaluate(experiment, workdir)
# The workdir names the model by import path: loading it imports (runs) that module, so it takes
# an opt-in, as for any workdir you trust (evaluate.py: --trust_model_code).
model, info = checkpoint.load_model(workdir, trust_model_code=True)  # In a fresh process too.
print(f"reloaded {type(model).__name__} from epoch {info['epoch']}: val {info['val_accuracy']}")
