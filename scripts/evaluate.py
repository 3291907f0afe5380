"""Evaluates a trained workdir on the 10,000 test images:

  python scripts/evaluate.py --workdir runs/cnn


Prints test loss and accuracy of the best checkpoint (--which=latest for the last epoch),
or one JSON object with --json. --report adds per-class accuracy and the confusion matrix
(text), and writes confusion_matrix.png, mistakes.png and report.txt into --report_dir
(default <workdir>/report). --predict FILE.png|FILE.npy prints the class probabilities of
one 28x28 grey image, or of each image of a .npy batch (N, 28, 28[, 1]) (light digit on dark, as
MNIST; other sizes are refused, not resized). An image with a light background gets a warning on
stderr and is predicted as it is; --invert classifies 255 - image instead (a dark digit drawn on
white). --exported model.jaxexport (scripts/export.py) predicts from that file instead of a
workdir:

  python scripts/evaluate.py --exported model.jaxexport --predict batch.npy

A workdir is data: a model it names by import path is imported only with --trust_model_code.
"""

import json
import sys
from pathlib import Path

import _cli
from absl import flags

from flax_mnist import checkpoint, data, evaluation, export, workdir

_WORKDIR = flags.DEFINE_string("workdir", None, "A workdir written by scripts/train.py.")
_WHICH = flags.DEFINE_enum("which", "best", ["best", "latest"], "Which checkpoint to evaluate.")
_DATA_DIR = flags.DEFINE_string(
  "data_dir",
  None,
  "IDX directory (default: the run's config, then $FLAX_MNIST_DATA_DIR, then TFDS).",
)
_JSON = flags.DEFINE_bool("json", False, "Print one JSON object instead of text.")
_REPORT = flags.DEFINE_bool(
  "report", False, "Per-class accuracy, confusion matrix, misclassified images."
)
_REPORT_DIR = flags.DEFINE_string(
  "report_dir", None, "Where --report writes (default <workdir>/report)."
)
_PREDICT = flags.DEFINE_string("predict", None, "A 28x28 .png or .npy image to classify.")
_INVERT = flags.DEFINE_bool(
  "invert", False, "--predict: classify 255 - image (for a dark digit on a light background)."
)
_EXPORTED = flags.DEFINE_string(
  "exported", None, "--predict from this scripts/export.py file instead of --workdir."
)
_TRUST = flags.DEFINE_bool(
  "trust_model_code",
  False,
  "Import the model the workdir names by import path ('package.module:factory'): that runs its "
  "code, so only for a workdir you trust. Registered models need no opt-in.",
)


def main() -> None:
  if _INVERT.value and not _PREDICT.value:
    _cli.fail("--invert applies to the --predict image; give --predict FILE")
  if _EXPORTED.value and (_WORKDIR.value or not _PREDICT.value):
    _cli.fail("--exported: predicts the --predict images alone; give --predict FILE, no --workdir")
  if not _WORKDIR.value and not _EXPORTED.value:
    _cli.fail("--workdir: required, not given (or --exported FILE with --predict)")
  image = _user_image() if _PREDICT.value else None  # A bad image fails before any loading.
  if _EXPORTED.value:
    exported = export.load_exported(_EXPORTED.value)
    _print_predictions(export.predict_exported(exported, image), image)
    return
  model, info = checkpoint.load_model(_WORKDIR.value, _WHICH.value, trust_model_code=_TRUST.value)
  if "fallback" in info:  # The asked-for checkpoint is damaged; the other one is intact.
    print(f"warning: {info['fallback']}", file=sys.stderr)
  config = info["config"]
  if image is not None:
    _predict(model, image)
    return
  report_dir = None
  if _REPORT.value:  # Fail before evaluating, not after, when the report cannot be written.
    report_dir = _cli.check_writable_dir(
      _REPORT_DIR.value or Path(_WORKDIR.value) / "report", "--report_dir"
    )
  mnist = _trained_data(config)
  result = evaluation.evaluate_model(
    model, mnist.test.images, mnist.test.labels, batch_size=config["eval_batch_size"]
  )
  summary = {
    "workdir": _WORKDIR.value,
    "checkpoint": _WHICH.value,
    "model": info["model"],
    "epoch": info["epoch"],
    "test_loss": result["loss"],
    "test_accuracy": result["accuracy"],
    "correct": result["correct"],
    "count": result["count"],
    "recorded_val_accuracy": info["val_accuracy"],
  }
  if _REPORT.value:
    summary.update(_write_report(model, mnist.test, config["eval_batch_size"], info, report_dir))
  if _JSON.value:
    print(json.dumps(summary))
  else:
    print(
      f"{info['model']} ({_WHICH.value} checkpoint, epoch {info['epoch']}): "
      f"test_loss {result['loss']:.4f}  test_accuracy {result['accuracy']:.4f} "
      f"({result['correct']:,}/{result['count']:,})"
    )


def _trained_data(config: dict) -> data.Dataset:
  """The data the workdir's model was trained on (config.json's ``dataset``; MNIST in a record
  from before the field), from --data_dir, the recorded directory or the usual sources; refused
  when it is not what the run recorded (other files, or a caller's own arrays)."""
  dataset = config.get("dataset", "mnist")
  if dataset not in data.DATASETS:
    _cli.fail(
      f"{_WORKDIR.value}: trained on your own arrays ({dataset!r}), which evaluate.py cannot "
      "load; evaluate from Python with flax_mnist.evaluation.evaluate_model"
    )
  loaded = data.load(
    dataset, _DATA_DIR.value or config.get("data_dir"), tfds_data_dir=config.get("tfds_data_dir")
  )
  if config.get("data") not in (None, loaded.identity()):
    _cli.fail(
      f"{loaded.source}: {loaded.identity()}, expected the data {_WORKDIR.value} was trained on "
      f"({config['data']}); pass --data_dir with those files"
    )
  return loaded


def _user_image():
  """The --predict image (inverted with --invert); warns when its background is light.

  A light background is warned about, not refused: the test is a heuristic (the image's outer
  frame), and a user may mean to probe the model with exactly that image; the warning says what
  the prediction is worth and how to get a meaningful one.
  """
  image = evaluation.load_user_image(_PREDICT.value)
  if _INVERT.value:
    image = 255 - image
  levels = [evaluation.light_background(one) for one in image]
  light = [level for level in levels if level is not None]
  if light:
    where = "after --invert " if _INVERT.value else ""
    remedy = "drop --invert" if _INVERT.value else "invert it (255 - x) or pass --invert"
    which = "" if len(image) == 1 else f" in {len(light)} of {len(image)} images"
    _cli.warn(
      f"{_PREDICT.value}: light background {where}(mean {light[0]:.0f}/255 at the border{which}, "
      f"MNIST's is 0): MNIST digits are light on dark, {remedy}; this prediction is likely "
      "meaningless"
    )
  return image


def _predict(model, image) -> None:
  """Prints the class probabilities of the --predict image(s) through the checkpoint's model."""
  _print_predictions(evaluation.predict_probabilities(model, image), image)


def _print_predictions(probabilities, images) -> None:
  """One image: its class probabilities; a batch: each image's prediction (all with --json)."""
  if len(images) > 1:
    predicted = probabilities.argmax(axis=1)
    if _JSON.value:
      record = {"file": _PREDICT.value, "predicted": predicted.tolist()}
      print(json.dumps({**record, "probabilities": probabilities.tolist()}))
      return
    for index, (digit, row) in enumerate(zip(predicted, probabilities)):
      print(f"{_PREDICT.value}[{index}]: predicted {digit} ({row[digit]:.4f})")
    return
  probabilities, image = probabilities[0], images[0]
  if _JSON.value:
    print(
      json.dumps(
        {
          "file": _PREDICT.value,
          "predicted": int(probabilities.argmax()),
          "probabilities": [float(p) for p in probabilities],
          "inverted": _INVERT.value,
          "light_background": evaluation.light_background(image) is not None,
        }
      )
    )
    return
  print(f"{_PREDICT.value}: predicted {probabilities.argmax()}")
  for digit, probability in enumerate(probabilities):
    print(f"  {digit}: {probability:.4f}")


def _write_report(model, test: data.Split, batch_size: int, info: dict, directory: Path) -> dict:
  """Writes the report files, prints the text report, returns what --json adds."""
  probabilities = evaluation.predict_probabilities(model, test.images, batch_size=batch_size)
  matrix = evaluation.confusion_matrix(test.labels, probabilities.argmax(axis=1))
  text = evaluation.format_report(matrix)
  workdir.write_text(directory / "report.txt", text)
  evaluation.plot_confusion(
    matrix,
    directory / "confusion_matrix.png",
    f"{info['model']}, epoch {info['epoch']}: confusion matrix (colour: log counts)",
  )
  mistakes = evaluation.plot_mistakes(
    test.images, test.labels, probabilities, directory / "mistakes.png"
  )
  if not _JSON.value:
    print(text + f"wrote {directory}/report.txt, confusion_matrix.png, mistakes.png")
  return {
    "per_class_accuracy": evaluation.per_class_accuracy(matrix).tolist(),
    "confusion_matrix": matrix.tolist(),
    "most_confident_mistakes": mistakes.tolist(),
    "report_dir": str(directory),
  }


if __name__ == "__main__":
  _cli.run(main)
