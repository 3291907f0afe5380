"""Evaluates a trained workdir on the 10,000 test images: python scripts/evaluate.py --workdir runs/cnn

Prints test loss and accuracy of the best checkpoint (--which=latest for the last epoch),
or one JSON object with --json.
"""

import json
import sys

from absl import app, flags, logging

from flax_mnist import FlaxMnistError, checkpoint, data, train

_WORKDIR = flags.DEFINE_string("workdir", None, "A workdir written by scripts/train.py.")
_WHICH = flags.DEFINE_enum("which", "best", ["best", "latest"], "Which checkpoint to evaluate.")
_DATA_DIR = flags.DEFINE_string("data_dir", None, "IDX directory (default: the run's config, "
                                "then $FLAX_MNIST_DATA_DIR, then TFDS).")
_JSON = flags.DEFINE_bool("json", False, "Print one JSON object instead of text.")
flags.mark_flag_as_required("workdir")


def main(argv: list[str]) -> None:
  logging.set_verbosity(logging.WARNING)  # orbax logs every save at INFO.
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
  try:
    model, info = checkpoint.load_model(_WORKDIR.value, _WHICH.value)
    config = info["config"]
    mnist = data.load_mnist(_DATA_DIR.value or config.get("data_dir"), tfds_data_dir=config.get("tfds_data_dir"))
    result = train.evaluate_model(model, mnist.test.images, mnist.test.labels,
                                  batch_size=config["eval_batch_size"])
  except FlaxMnistError as error:
    print(f"error: {error}", file=sys.stderr)
    sys.exit(1)
  report = {"workdir": _WORKDIR.value, "checkpoint": _WHICH.value, "model": info["model"],
            "epoch": info["epoch"], "test_loss": result["loss"], "test_accuracy": result["accuracy"],
            "correct": result["correct"], "count": result["count"],
            "recorded_val_accuracy": info["val_accuracy"]}
  if _JSON.value:
    print(json.dumps(report))
  else:
    print(f"{info['model']} ({_WHICH.value} checkpoint, epoch {info['epoch']}): "
          f"test_loss {result['loss']:.4f}  test_accuracy {result['accuracy']:.4f} "
          f"({result['correct']:,}/{result['count']:,})")


if __name__ == "__main__":
  app.run(main)
