"""Speed runs: a recipe trained for a fixed number of epochs, the whole test set evaluated once at
the end, timed as a user waits for it (compile apart), over seeds.

A recipe is an ordinary config (``configs/speedrun.py``): its model, optimizer, schedule, batch
size, label smoothing and on-device augmentation are the trainer's own, compiled as the trainer
compiles them (``programs.Programs``, ``steps.make_train_epoch``); only the loop is leaner than
``train.train_seeds``: no per-epoch evaluation, checkpoint or log, since the figure is the mean
final test accuracy over seeds of a fixed schedule (stopping at the first evaluation that
crosses a target would select on the test set).

``speedrun_net`` is the recipes' model, built from the family's layers: convolutions each with
its 2x2 max-pool (one s2d block on CPU), optionally BatchNorm, and a one-hidden-layer head.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax
import ml_collections

from flax_mnist import data as data_lib
from flax_mnist import history, registry, sharding, steps
from flax_mnist.config import config_to_dict, resolve
from flax_mnist.layers import BatchNorm, Conv, Dense, Flatten, MaxPool
from flax_mnist.models import MNIST_SHAPE, Classifier
from flax_mnist.programs import Custom, Programs


def speedrun_net(
  *,
  rngs: Any,
  impl: str = "lax",
  compute_dtype: str = "float32",
  filters: Sequence[int] = (24, 32),
  kernel_sizes: Sequence[int] = (5, 3),
  hidden: int = 256,
  batch_norm: bool = False,
  input_shape: Sequence[int] = MNIST_SHAPE,
  num_classes: int = 10,
) -> Classifier:
  """Per stage a valid ``kernel_sizes[i]`` convolution of ``filters[i]`` (ReLU) and a 2x2
  max-pool (one s2d block on CPU), with BatchNorm after the pool if ``batch_norm``; then Dense
  ``hidden`` (ReLU) and one logit per class. The defaults are train_mnist_fast's net (conv 24 5x5,
  conv 32 3x3, Dense 256), in the family's layers."""
  height, width, features = input_shape
  layers: list[Any] = []
  for count, size in zip(filters, kernel_sizes, strict=True):
    layers += [Conv(features, count, size, rngs=rngs), MaxPool()]
    layers += [BatchNorm(count, rngs=rngs)] if batch_norm else []
    height, width, features = (height - size + 1) // 2, (width - size + 1) // 2, count
  layers += [
    Flatten(),
    Dense(height * width * features, hidden, activation=jax.nn.relu, rngs=rngs),
    Dense(hidden, num_classes, rngs=rngs),
  ]
  return Classifier("speedrun_net", layers, impl, compute_dtype)


def run(
  config: ml_collections.ConfigDict,
  seeds: Sequence[int],
  *,
  dataset: data_lib.Dataset | None = None,
  print_fn: Callable[[str], None] | None = print,
) -> dict[str, Any]:
  """Trains ``config`` from each seed for ``config.num_epochs`` and evaluates the test set once;
  returns per seed ``seed``, ``test_accuracy``, ``test_loss``, ``seconds`` (data on device,
  training, the final evaluation: what a user waits for once compiled) and ``compile_seconds``
  (the one compilation every seed shares), and the mean ± std over seeds."""
  say = print_fn or (lambda line: None)
  config = ml_collections.ConfigDict(config.to_dict())
  config.seeds, config.progress_bar = tuple(seeds), False
  run_config = resolve(config)
  if dataset is None:
    dataset = data_lib.load(run_config.dataset, run_config.data_dir)
  run_config = run_config.with_data(dataset)
  host = (dataset.train.images, dataset.train.labels, dataset.test.images, dataset.test.labels)
  mesh = sharding.training_mesh(run_config.seed_devices, run_config.data_devices)
  steps_per_epoch = math.ceil(len(dataset.train) / run_config.batch_size)
  programs = Programs(run_config, mesh, steps_per_epoch, Custom(), lambda line: None)
  started = time.perf_counter()
  arrays = sharding.place(host, mesh)
  train_epoch = (
    programs.train_epoch(run_config, mesh)
    .lower(programs.templates[0], arrays[0], arrays[1], programs.shuffle_keys[0])
    .compile()
  )
  evaluate = steps.make_evaluate(programs.eval_graphdef, run_config.eval_batch_size, mesh=mesh)
  template = programs.templates[0]
  evaluate = evaluate.lower(template.params, template.model_state, arrays[2], arrays[3]).compile()
  compile_seconds = time.perf_counter() - started
  results = []
  for seed, state, key in zip(run_config.seeds, programs.templates, programs.shuffle_keys):
    started = time.perf_counter()
    images, labels, test_images, test_labels = jax.block_until_ready(sharding.place(host, mesh))
    for epoch in range(1, run_config.num_epochs + 1):
      state, _ = train_epoch(state, images, labels, registry.epoch_shuffle_key(key, epoch))
    metrics = steps.summarize(
      sharding.to_host(evaluate(state.params, state.model_state, test_images, test_labels))
    )
    seconds = time.perf_counter() - started
    record = {
      "seed": seed,
      "test_accuracy": metrics["accuracy"],
      "test_loss": metrics["loss"],
      "seconds": seconds,
      "compile_seconds": compile_seconds,
    }
    results.append(record)
    say(
      f"seed {seed}: test_accuracy {record['test_accuracy']:.4f} in {seconds:.2f} s "
      f"({run_config.num_epochs} epochs; compiled once in {compile_seconds:.1f} s)"
    )
  return {
    "config": config_to_dict(config),
    "num_epochs": run_config.num_epochs,
    "seeds": results,
    **summarize(results),
  }


def summarize(results: Sequence[dict[str, Any]]) -> dict[str, Any]:
  """Mean ± std (sample) over seeds of the test accuracy and the seconds."""
  return {
    "test_accuracy": history.spread([record["test_accuracy"] for record in results]),
    "seconds": history.spread([record["seconds"] for record in results]),
    "compile_seconds": results[0]["compile_seconds"] if results else None,
  }


def render(results: dict[str, Any]) -> str:
  """report.md of a speed run's ``results`` (scripts/speedrun.py writes both)."""
  from flax_mnist import log
  from flax_mnist.study.formats import mean_std, points, table

  recipe = results["recipe"]
  environment = results["environment"]
  seeds = len(recipe["seeds"])
  rows = []
  for name, entry in [("recipe", recipe), *results["ablations"].items(), *_baseline(results)]:
    accuracy, seconds = entry["test_accuracy"], entry["seconds"]
    change = accuracy["mean"] - recipe["test_accuracy"]["mean"]
    rows.append(
      [
        name,
        str(entry["num_epochs"]),
        mean_std(accuracy),
        f"{accuracy['min']:.4f}",
        f"{seconds['mean']:.2f} ± {seconds['std']:.2f}",
        f"{entry['compile_seconds']:.1f}",
        ""
        if entry is recipe
        else f"{points(change)} points, {seconds['mean'] / recipe['seconds']['mean']:.2f}x time",
      ]
    )
  header = (
    "run | epochs | test accuracy (mean ± std) | worst seed | seconds (mean ± std) | compile s | "
    "against the recipe"
  )
  target = results["target"]
  reached = recipe["test_accuracy"]["mean"] >= target
  verdict = (
    f"The recipe's mean final test accuracy over {seeds} seeds is "
    f"{recipe['test_accuracy']['mean']:.4f} ({'meets' if reached else 'misses'} the {target} "
    f"target) in {recipe['seconds']['mean']:.2f} s per run after compiling"
  )
  if "baseline" in results:
    base = results["baseline"]
    verdict += (
      f"; the notebook's cnn_pool recipe, measured the same way, reaches "
      f"{base['test_accuracy']['mean']:.4f} in {base['seconds']['mean']:.1f} s "
      f"({base['seconds']['mean'] / recipe['seconds']['mean']:.1f}x the recipe's time)"
    )
  per_seed = table(
    "seed | test accuracy | seconds",
    [[str(r["seed"]), f"{r['test_accuracy']:.4f}", f"{r['seconds']:.2f}"] for r in recipe["seeds"]],
  )
  sections = [
    f"# Speed run: MNIST to {target:.1%} mean test accuracy ({results['platform']})",
    "## Result",
    verdict + ".",
    table(header, rows),
    (
      "Each run trains a fixed number of epochs from its seed and evaluates the whole test set "
      "once at the end: no stopping at the first evaluation that crosses the target (that would "
      "select on the test set). Seconds: data placed on the device, training and the final "
      "evaluation, what a user waits for once the program is compiled; the compilation, shared "
      "by the seeds, apart. Ablations undo one part of the recipe over the same seeds."
    ),
    "## The recipe",
    f"`{results['config']}`: "
    + ", ".join(f"{key} {value!r}" for key, value in _recipe_fields(recipe)),
    "## Per seed",
    per_seed,
    "## Where",
    f"{log.describe_hardware(environment)}; jax {environment['versions']['jax']}.",
    "## Reproduce",
    f"```\n{results['command']}\n```",
  ]
  return "\n\n".join(sections) + "\n"


def _baseline(results: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
  return (
    [("the notebook's cnn_pool (configs/cnn_pool.py)", results["baseline"])]
    if "baseline" in results
    else []
  )


_SHOWN = (
  "model_kwargs",
  "optimizer",
  "learning_rate",
  "lr_schedule",
  "adam_b1",
  "adam_b2",
  "batch_size",
  "num_epochs",
  "label_smoothing",
  "augment",
)


def _recipe_fields(entry: dict[str, Any]) -> list[tuple[str, Any]]:
  return [(key, entry["config"][key]) for key in _SHOWN]
