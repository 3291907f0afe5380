"""Training: pure train/eval steps, one compiled program per epoch, and the loop.

The whole dataset lives on device as uint8. Each epoch is one compiled call: a seeded
on-device shuffle, then a ``lax.scan`` over the batches. Like Keras, the remainder is trained
on, not dropped: 60,000 images at batch 512 are 117 steps of 512 and a 118th of 96 real images
(padded to 512 and masked, so one step shape is compiled: its loss is the mean over its 96
images and BatchNorm's statistics see only them). Evaluation covers every test image the same
way, in eval mode (no dropout, BatchNorm moving statistics).

``train_and_evaluate(config, workdir)`` runs a whole experiment, resuming from the latest
checkpoint in ``workdir`` if there is one, and returns the history (one dict per epoch).
"""

from __future__ import annotations

import functools
import json
import math
import os
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import optax
from flax import nnx

from flax_mnist import checkpoint, data, log, models
from flax_mnist.errors import ConfigError, FlaxMnistError

Metrics = dict[str, jax.Array]
HISTORY_FILE = "history.json"
CONFIG_FILE = "config.json"
DROPOUT_RNG_IMPLS = ("rbg", "unsafe_rbg", "threefry2x32")
RUN_FILE = "run.json"  # This invocation: compile times, hardware, versions.


def default_config() -> ml_collections.ConfigDict:
  """The notebook's settings; each file in ``configs/`` sets ``model`` and may override more."""
  config = ml_collections.ConfigDict()
  config.model = "cnn"
  config.seed = 0
  config.learning_rate = 1e-3
  config.adam_eps = 1e-7  # Keras's default (optax's is 1e-8).
  config.batch_size = 512
  config.eval_batch_size = 1000
  config.num_epochs = 20
  config.shuffle = True
  # IDX directory; unset: $FLAX_MNIST_DATA_DIR, else TFDS.
  config.data_dir = ml_collections.config_dict.placeholder(str)
  config.tfds_data_dir = ml_collections.config_dict.placeholder(str)  # Unset: TFDS's default.
  config.impl = "auto"  # models.resolve_impl: "im2col" on CPU, "lax" elsewhere.
  # PRNG of the dropout masks: XLA's RngBitGenerator ("rbg") draws them ~10 ms/step faster than
  # threefry on CPU for cnn_pool_bn; "threefry2x32" is JAX's default.
  config.dropout_rng_impl = "rbg"
  config.progress_bar = True  # Shown only on a terminal.
  config.best_metric = "val_accuracy"  # Or "val_loss" (what the notebook's ModelCheckpoint kept).
  return config


def init_model(config: Mapping[str, Any]) -> models.Classifier:
  """The config's model, initialised from ``config.seed`` (in train mode)."""
  seed_key = jax.random.key(config["seed"])
  dropout_key = jax.random.fold_in(jax.random.key(config["seed"], impl=config["dropout_rng_impl"]), 1)
  return models.create_model(config["model"], impl=config["impl"],
                             rngs=nnx.Rngs(params=jax.random.fold_in(seed_key, 0), dropout=dropout_key))


def make_optimizer(config: Mapping[str, Any]) -> optax.GradientTransformation:
  """Adam with Keras's defaults (b1 0.9, b2 0.999, eps 1e-7 unless the config says otherwise)."""
  return optax.adam(learning_rate=config["learning_rate"], b1=0.9, b2=0.999, eps=config["adam_eps"])


def _zero_metrics() -> Metrics:
  return {"loss_sum": jnp.zeros((), jnp.float32), "correct": jnp.zeros((), jnp.int32),
          "count": jnp.zeros((), jnp.int32), "steps": jnp.zeros((), jnp.int32)}


def _accumulate(metrics: Metrics, losses: jax.Array, logits: jax.Array, labels: jax.Array,
                mask: jax.Array | None) -> Metrics:
  """Adds a batch's summed loss and correct count; rows where ``mask`` is False are padding."""
  hits = jnp.argmax(logits, axis=-1) == labels
  if mask is None:
    loss_sum, correct, count = losses.sum(), jnp.sum(hits, dtype=jnp.int32), labels.shape[0]
  else:
    loss_sum = jnp.where(mask, losses, 0.0).sum()
    correct, count = jnp.sum(hits & mask, dtype=jnp.int32), jnp.sum(mask, dtype=jnp.int32)
  return {"loss_sum": metrics["loss_sum"] + loss_sum, "correct": metrics["correct"] + correct,
          "count": metrics["count"] + count, "steps": metrics["steps"] + 1}


def _scan_batches(step: Callable[[Any, tuple], Any], carry: Any, images: jax.Array, labels: jax.Array,
                  batch_size: int, order: jax.Array | None = None) -> Any:
  """Applies ``step(carry, (images, labels, mask))`` to consecutive batches in one ``lax.scan``.

  ``order`` (a permutation of the examples) shuffles them. A last partial batch is padded to
  ``batch_size`` and ``mask`` marks its real rows (it is None when every batch is full): one
  step shape, so the step is compiled once, not twice (that halved cnn_pool_bn's compile time).
  """
  num_examples = images.shape[0]
  num_steps = -(-num_examples // batch_size)
  padding = num_steps * batch_size - num_examples
  if padding:
    index = jnp.arange(num_examples) if order is None else order
    order = jnp.concatenate([index, jnp.zeros((padding,), index.dtype)])
    mask = (jnp.arange(num_steps * batch_size) < num_examples).reshape(num_steps, batch_size)
  else:
    mask = None
  if order is not None:
    images, labels = images[order], labels[order]
  batches = (images.reshape(num_steps, batch_size, *images.shape[1:]), labels.reshape(num_steps, batch_size), mask)
  carry, _ = jax.lax.scan(lambda carry, batch: (step(carry, batch), None), carry, batches)
  return carry


def train_step(graphdef: nnx.GraphDef, tx: optax.GradientTransformation, carry: tuple,
               batch: tuple[jax.Array, jax.Array, jax.Array | None]) -> tuple:
  """One Adam step on a batch of uint8 images; a pure function of (params, model_state, opt_state, metrics).

  ``batch`` is (images, labels, mask): where ``mask`` is given, only its True rows count (in the
  loss, its mean, BatchNorm's statistics and the metrics), as if the batch held just those.
  """
  params, model_state, opt_state, metrics = carry
  images, labels, mask = batch

  def loss_fn(params):
    model = nnx.merge(graphdef, params, model_state, copy=True)
    logits = model(data.normalize_images(images), mask=mask)
    losses = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
    if mask is None:
      loss = losses.mean()
    else:
      loss = jnp.where(mask, losses, 0.0).sum() / mask.sum()
    _, _, new_model_state = nnx.split(model, nnx.Param, ...)  # BatchNorm stats, dropout RNG counts.
    return loss, (losses, logits, new_model_state)

  (_, (losses, logits, model_state)), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
  updates, opt_state = tx.update(grads, opt_state, params)
  params = optax.apply_updates(params, updates)
  return params, model_state, opt_state, _accumulate(metrics, losses, logits, labels, mask)


def eval_step(graphdef: nnx.GraphDef, params: nnx.State, model_state: nnx.State, metrics: Metrics,
              batch: tuple[jax.Array, jax.Array, jax.Array | None]) -> Metrics:
  """Adds a batch's summed loss and correct count (eval-mode ``graphdef``) to ``metrics``."""
  images, labels, mask = batch
  logits = nnx.merge(graphdef, params, model_state, copy=True)(data.normalize_images(images))
  losses = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
  return _accumulate(metrics, losses, logits, labels, mask)


def make_train_epoch(graphdef: nnx.GraphDef, tx: optax.GradientTransformation, batch_size: int, *,
                     shuffle: bool = True,
                     progress: Callable[..., None] | None = None) -> Callable[..., tuple]:
  """Returns the jitted ``train_epoch(params, model_state, opt_state, images, labels, key)``.

  It returns ``(params, model_state, opt_state, metrics)`` with summed loss and correct count.
  ``progress(step, loss_sum, correct, count)``, if given, is called on the host after each step.
  """
  def step(carry, batch):
    carry = train_step(graphdef, tx, carry, batch)
    if progress is not None:
      metrics = carry[3]
      jax.debug.callback(progress, metrics["steps"], metrics["loss_sum"], metrics["correct"], metrics["count"])
    return carry

  def train_epoch(params, model_state, opt_state, images, labels, key):
    order = jax.random.permutation(key, images.shape[0]) if shuffle else None
    return _scan_batches(step, (params, model_state, opt_state, _zero_metrics()), images, labels, batch_size,
                         order)

  return jax.jit(train_epoch)


def make_evaluate(graphdef: nnx.GraphDef, batch_size: int) -> Callable[..., Metrics]:
  """Returns the jitted ``evaluate(params, model_state, images, labels) -> metrics`` over every image."""
  def evaluate(params, model_state, images, labels):
    step = functools.partial(eval_step, graphdef, params, model_state)
    return _scan_batches(step, _zero_metrics(), images, labels, batch_size)
  return jax.jit(evaluate)


def summarize(metrics: Metrics) -> dict[str, float]:
  """Mean loss and accuracy from summed metrics (fetched to the host)."""
  count = int(metrics["count"])
  return {"loss": float(metrics["loss_sum"]) / count, "accuracy": int(metrics["correct"]) / count,
          "correct": int(metrics["correct"]), "count": count}


def evaluate_model(model: models.Classifier, images: Any, labels: Any, *, batch_size: int = 1000) -> dict[str, float]:
  """Evaluates ``model`` (switched to eval mode) on uint8 NHWC images: loss, accuracy, correct, count."""
  model.eval()
  graphdef, params, model_state = nnx.split(model, nnx.Param, ...)
  metrics = make_evaluate(graphdef, batch_size)(params, model_state, jnp.asarray(images), jnp.asarray(labels))
  return summarize(metrics)


def validate_config(config: Mapping[str, Any]) -> None:
  """Raises ConfigError naming the first field whose value cannot be used."""
  if config["model"] not in models.model_names():
    raise ConfigError(f"config.model {config['model']!r}: unknown, expected one of {', '.join(models.model_names())}")
  for field in ("batch_size", "eval_batch_size"):
    if not isinstance(config[field], int) or config[field] < 1:
      raise ConfigError(f"config.{field} {config[field]!r}: expected a positive integer")
  if not isinstance(config["num_epochs"], int) or config["num_epochs"] < 0:
    raise ConfigError(f"config.num_epochs {config['num_epochs']!r}: expected an integer >= 0")
  for field in ("learning_rate", "adam_eps"):
    if not (isinstance(config[field], (int, float)) and math.isfinite(config[field]) and config[field] > 0):
      raise ConfigError(f"config.{field} {config[field]!r}: expected a positive number")
  models.resolve_impl(config["impl"])
  if config["dropout_rng_impl"] not in DROPOUT_RNG_IMPLS:
    raise ConfigError(f"config.dropout_rng_impl {config['dropout_rng_impl']!r}: expected one of "
                      f"{', '.join(DROPOUT_RNG_IMPLS)}")
  if config["best_metric"] not in checkpoint.BEST_METRICS:
    raise ConfigError(f"config.best_metric {config['best_metric']!r}: expected one of "
                      f"{', '.join(checkpoint.BEST_METRICS)}")


def config_to_dict(config: Any) -> dict[str, Any]:
  """A plain, JSON-able dict of a ConfigDict or mapping."""
  return json.loads(json.dumps(config.to_dict() if hasattr(config, "to_dict") else dict(config)))


def _write_json(path: Path, value: Any) -> None:
  """Writes JSON atomically: a reader never sees a half-written file."""
  temporary = path.with_suffix(path.suffix + ".tmp")
  temporary.write_text(json.dumps(value, indent=2) + "\n")
  os.replace(temporary, path)


def _read_history(workdir: Path, last_epoch: int) -> list[dict[str, Any]]:
  path = workdir / HISTORY_FILE
  if not path.exists():
    return []
  try:
    history = json.loads(path.read_text())
  except json.JSONDecodeError as error:
    raise FlaxMnistError(f"{path}: not valid JSON ({error.msg} at line {error.lineno}); move it away to resume") from None
  return [record for record in history if record["epoch"] <= last_epoch]


def _check_resumable(workdir: Path, config: Mapping[str, Any]) -> None:
  """A workdir's checkpoints must be of the same model as the config."""
  path = workdir / CONFIG_FILE
  if not path.exists():
    return
  previous = json.loads(path.read_text())
  if previous.get("model") != config["model"]:
    raise ConfigError(f"{workdir}: holds a {previous.get('model')!r} run, config.model is {config['model']!r}; "
                      "use another workdir")


def train_and_evaluate(config: Any, workdir: str | os.PathLike, *,
                       print_fn: Callable[[str], None] | None = print) -> list[dict[str, Any]]:
  """Trains ``config.model`` for ``config.num_epochs``, validating on the test set after each epoch.

  Writes into ``workdir``: config.json, history.json, run.json (compile seconds, hardware,
  versions), checkpoints/{best,latest}, tensorboard/.
  Resumes from ``checkpoints/latest`` if present. Returns the history, one dict per epoch with
  epoch, train_loss, train_accuracy, val_loss, val_accuracy, seconds (train + eval, compile
  excluded), train_seconds, eval_seconds and images_per_second (training throughput).
  """
  validate_config(config)
  say = print_fn or (lambda line: None)
  workdir = Path(workdir)
  is_writer = jax.process_index() == 0
  workdir.mkdir(parents=True, exist_ok=True)
  _check_resumable(workdir, config)

  mnist = data.load_mnist(config["data_dir"] or None, tfds_data_dir=config["tfds_data_dir"] or None)
  train_images, train_labels = jax.device_put(mnist.train.images), jax.device_put(mnist.train.labels)
  test_images, test_labels = jax.device_put(mnist.test.images), jax.device_put(mnist.test.labels)
  say(f"data: {mnist.source}: {len(mnist.train):,} train, {len(mnist.test):,} test images")

  model = init_model(config)
  shuffle_key = jax.random.fold_in(jax.random.key(config["seed"]), 2)
  say(models.summary(model))
  model.train()
  train_graphdef, params, model_state = nnx.split(model, nnx.Param, ...)
  model.eval()
  eval_graphdef = nnx.graphdef(model)
  tx = make_optimizer(config)
  opt_state = tx.init(params)

  checkpoints = checkpoint.Checkpoints(workdir, best_metric=config["best_metric"])
  try:
    start_epoch = 0
    history: list[dict[str, Any]] = []
    if checkpoints.epoch("latest") is not None:
      restored, meta = checkpoints.restore("latest", {"params": params, "model_state": model_state,
                                                      "opt_state": opt_state})
      params, model_state, opt_state = restored["params"], restored["model_state"], restored["opt_state"]
      start_epoch = meta["epoch"]
      history = _read_history(workdir, start_epoch)
      say(f"resumed from {checkpoints.directory / 'latest'} at epoch {start_epoch}")
    config_dict = config_to_dict(config)
    if is_writer:
      _write_json(workdir / CONFIG_FILE, config_dict)

    num_epochs = config["num_epochs"]
    batch_size = config["batch_size"]
    steps_per_epoch = math.ceil(len(mnist.train) / batch_size)
    progress = log.ProgressBar(steps_per_epoch, enabled=config["progress_bar"])
    train_epoch = make_train_epoch(train_graphdef, tx, batch_size, shuffle=config["shuffle"],
                                   progress=progress.update if progress.enabled else None)
    evaluate = make_evaluate(eval_graphdef, config["eval_batch_size"])
    if start_epoch < num_epochs:
      started = time.perf_counter()
      train_epoch = train_epoch.lower(params, model_state, opt_state, train_images, train_labels,
                                       shuffle_key).compile()
      compiled_train = time.perf_counter()
      evaluate = evaluate.lower(params, model_state, test_images, test_labels).compile()
      compile_seconds = {"train_epoch": compiled_train - started,
                         "evaluate": time.perf_counter() - compiled_train}
      say(f"compiled the train epoch ({steps_per_epoch} steps of {batch_size}) and evaluation "
          f"in {sum(compile_seconds.values()):.1f} s")
      if is_writer:
        _write_json(workdir / RUN_FILE, {"start_epoch": start_epoch, "compile_seconds": compile_seconds,
                                         **log.environment()})
    tensorboard = log.TensorBoard(workdir / "tensorboard", enabled=is_writer)
    try:
      for epoch in range(start_epoch + 1, num_epochs + 1):
        progress.start(epoch, num_epochs)
        started = time.perf_counter()
        params, model_state, opt_state, train_metrics = train_epoch(
            params, model_state, opt_state, train_images, train_labels, jax.random.fold_in(shuffle_key, epoch))
        train_summary = summarize(train_metrics)  # Fetching the sums waits for the epoch.
        trained = time.perf_counter()
        val_summary = summarize(evaluate(params, model_state, test_images, test_labels))
        finished = time.perf_counter()
        progress.close()
        if not math.isfinite(train_summary["loss"]):
          raise FlaxMnistError(f"training diverged at epoch {epoch}: train_loss is {train_summary['loss']}; "
                               "lower config.learning_rate")
        record = {"epoch": epoch,
                  "train_loss": train_summary["loss"], "train_accuracy": train_summary["accuracy"],
                  "val_loss": val_summary["loss"], "val_accuracy": val_summary["accuracy"],
                  "seconds": finished - started, "train_seconds": trained - started,
                  "eval_seconds": finished - trained,
                  "images_per_second": train_summary["count"] / (trained - started)}
        history.append(record)
        say(log.format_epoch(record, num_epochs))

        state = {"params": params, "model_state": model_state, "opt_state": opt_state}
        meta = {"epoch": epoch, "model": config["model"], "val_accuracy": record["val_accuracy"],
                "val_loss": record["val_loss"], "train_accuracy": record["train_accuracy"],
                "train_loss": record["train_loss"], "config": config_dict}
        checkpoints.save_epoch(epoch, state, meta)
        if is_writer:
          _write_json(workdir / HISTORY_FILE, history)
          tensorboard.write_epoch(epoch, record, nnx.merge(train_graphdef, params, model_state))
    finally:
      tensorboard.close()
      progress.close()
  finally:
    checkpoints.close()
  if history:
    best = max(history, key=lambda record: record["val_accuracy"])
    say(f"best val_accuracy {best['val_accuracy']:.4f} at epoch {best['epoch']}")
  return history
