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
import numpy as np
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
  # PRNG of the dropout masks. "auto": XLA's RngBitGenerator ("rbg") on CPU, where it draws them
  # ~10 ms/step faster than threefry for cnn_pool_bn; "threefry2x32" (JAX's default) elsewhere,
  # because rbg draws other bits under vmap, and seeds are vmapped there (seed_parallelism).
  config.dropout_rng_impl = "auto"
  config.progress_bar = True  # Shown only on a terminal.
  config.best_metric = "val_accuracy"  # Or "val_loss" (what the notebook's ModelCheckpoint kept).
  # Several seeds (train_seeds, or scripts/train.py with num_seeds > 1): seeds seed, seed + 1, ...
  # unless ``seeds`` lists them. "vmap" trains them in one compiled program, "loop" one after the
  # other with one compiled program; "auto": loop on CPU (vmapping measured no gain there), vmap
  # elsewhere. Either way a seed's results equal its single-seed run (tested).
  config.num_seeds = 1
  config.seeds = ()
  config.seed_parallelism = "auto"
  return config


SEED_PARALLELISMS = ("auto", "loop", "vmap")
SEED_DIR = "seed_{}"  # Each seed's workdir inside a multi-seed workdir.
SEEDS_FILE = "seeds.json"  # A multi-seed workdir's aggregate over seeds.


def resolve_dropout_rng_impl(name: str) -> str:
  """The PRNG implementation ``config.dropout_rng_impl`` stands for on this platform."""
  if name == "auto":
    return "rbg" if jax.default_backend() == "cpu" else "threefry2x32"
  if name not in DROPOUT_RNG_IMPLS:
    raise ConfigError(f"config.dropout_rng_impl {name!r}: expected one of auto, {', '.join(DROPOUT_RNG_IMPLS)}")
  return name


def resolve_seed_parallelism(name: str) -> str:
  """"loop" or "vmap": how ``config.seed_parallelism`` trains several seeds on this platform."""
  if name not in SEED_PARALLELISMS:
    raise ConfigError(f"config.seed_parallelism {name!r}: expected one of {', '.join(SEED_PARALLELISMS)}")
  if name == "auto":
    return "loop" if jax.default_backend() == "cpu" else "vmap"
  return name


def seed_list(config: Mapping[str, Any]) -> list[int]:
  """The seeds a config trains: ``config.seeds`` if set, else ``num_seeds`` from ``config.seed`` on."""
  seeds = config.get("seeds") or ()
  if seeds:
    return [int(seed) for seed in seeds]
  return list(range(config["seed"], config["seed"] + config.get("num_seeds", 1)))


def init_model(config: Mapping[str, Any], seed: int | None = None) -> models.Classifier:
  """The config's model, initialised from ``seed`` (default ``config.seed``), in train mode."""
  seed = config["seed"] if seed is None else seed
  seed_key = jax.random.key(seed)
  dropout_key = jax.random.fold_in(jax.random.key(seed, impl=resolve_dropout_rng_impl(config["dropout_rng_impl"])), 1)
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
                     shuffle: bool = True, progress: Callable[..., None] | None = None,
                     over_seeds: bool = False) -> Callable[..., tuple]:
  """Returns the jitted ``train_epoch(params, model_state, opt_state, images, labels, key)``.

  It returns ``(params, model_state, opt_state, metrics)`` with summed loss and correct count.
  ``progress(step, loss_sum, correct, count)``, if given, is called on the host after each step.
  ``over_seeds``: the states, the key and the returned metrics carry a leading seed axis (vmap);
  the images and labels are shared.
  """
  if over_seeds and progress is not None:
    raise ValueError("progress is not supported over seeds (the callback would run once per seed)")
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

  return jax.jit(jax.vmap(train_epoch, in_axes=(0, 0, 0, None, None, 0)) if over_seeds else train_epoch)


def make_evaluate(graphdef: nnx.GraphDef, batch_size: int, *, over_seeds: bool = False) -> Callable[..., Metrics]:
  """Returns the jitted ``evaluate(params, model_state, images, labels) -> metrics`` over every image.

  ``over_seeds``: the states and the returned metrics carry a leading seed axis (vmap).
  """
  def evaluate(params, model_state, images, labels):
    step = functools.partial(eval_step, graphdef, params, model_state)
    return _scan_batches(step, _zero_metrics(), images, labels, batch_size)
  return jax.jit(jax.vmap(evaluate, in_axes=(0, 0, None, None)) if over_seeds else evaluate)


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
  dropout_rng_impl = resolve_dropout_rng_impl(config["dropout_rng_impl"])
  if not isinstance(config.get("num_seeds", 1), int) or config.get("num_seeds", 1) < 1:
    raise ConfigError(f"config.num_seeds {config['num_seeds']!r}: expected a positive integer")
  seeds = seed_list(config)
  if len(set(seeds)) != len(seeds):
    raise ConfigError(f"config.seeds {tuple(seeds)!r}: expected distinct seeds")
  parallelism = resolve_seed_parallelism(config.get("seed_parallelism", "auto"))
  # Every model of the family has Dropout.
  if len(seeds) > 1 and parallelism == "vmap" and dropout_rng_impl in ("rbg", "unsafe_rbg"):
    raise ConfigError(f"config.dropout_rng_impl {config['dropout_rng_impl']!r} with seed_parallelism 'vmap': "
                      "rbg draws other masks under vmap than alone; use threefry2x32 or 'loop'")
  if config["best_metric"] not in checkpoint.BEST_METRICS:
    raise ConfigError(f"config.best_metric {config['best_metric']!r}: expected one of "
                      f"{', '.join(checkpoint.BEST_METRICS)}")


def config_to_dict(config: Any) -> dict[str, Any]:
  """A plain, JSON-able dict of a ConfigDict or mapping."""
  return json.loads(json.dumps(config.to_dict() if hasattr(config, "to_dict") else dict(config)))


def write_json(path: Path, value: Any) -> None:
  """Writes JSON atomically: a reader never sees a half-written file."""
  temporary = path.with_suffix(path.suffix + ".tmp")
  temporary.write_text(json.dumps(value, indent=2) + "\n")
  os.replace(temporary, path)


def read_history(workdir: Path, last_epoch: int) -> list[dict[str, Any]]:
  """A workdir's recorded epochs up to ``last_epoch`` ([] if it has no history.json)."""
  path = workdir / HISTORY_FILE
  if not path.exists():
    return []
  try:
    history = json.loads(path.read_text())
  except json.JSONDecodeError as error:
    raise FlaxMnistError(f"{path}: not valid JSON ({error.msg} at line {error.lineno}); move it away to resume") from None
  return [record for record in history if record["epoch"] <= last_epoch]


def _check_resumable(workdir: Path, config: Mapping[str, Any]) -> None:
  """A workdir's checkpoints must be of the same model (and seed) as the config."""
  path = workdir / CONFIG_FILE
  if not path.exists():
    return
  previous = json.loads(path.read_text())
  for field in ("model", "seed"):
    if field in previous and previous[field] != config[field]:
      raise ConfigError(f"{workdir}: holds a run with {field} {previous[field]!r}, config.{field} is "
                        f"{config[field]!r}; use another workdir")


def _stack(trees: list[Any]) -> Any:
  return jax.tree.map(lambda *leaves: jnp.stack(leaves), *trees)


def _unstack(tree: Any, index: int) -> Any:
  return jax.tree.map(lambda leaf: leaf[index], tree)


class _SeedRun:
  """One seed's workdir: its state, checkpoints, history and TensorBoard log."""

  def __init__(self, config_dict: dict[str, Any], workdir: Path, template: dict[str, Any], *,
               is_writer: bool, say: Callable[[str], None]):
    self.seed = config_dict["seed"]
    self.config_dict = config_dict
    self.workdir = workdir
    self.is_writer = is_writer
    workdir.mkdir(parents=True, exist_ok=True)
    _check_resumable(workdir, config_dict)
    self.checkpoints = checkpoint.Checkpoints(workdir, best_metric=config_dict["best_metric"])
    self.tensorboard: log.TensorBoard | None = None
    self.state = template
    self.start_epoch = 0
    self.history: list[dict[str, Any]] = []
    try:
      if self.checkpoints.epoch("latest") is not None:
        self.state, meta = self.checkpoints.restore("latest", template)
        self.start_epoch = meta["epoch"]
        self.history = read_history(workdir, self.start_epoch)
        say(f"resumed from {self.checkpoints.directory / 'latest'} at epoch {self.start_epoch}")
      if is_writer:
        write_json(workdir / CONFIG_FILE, config_dict)
    except BaseException:
      self.checkpoints.close()
      raise

  def finish_epoch(self, epoch: int, state: dict[str, Any], train_metrics: Metrics, val_metrics: Metrics,
                   timings: dict[str, float], train_graphdef: nnx.GraphDef) -> dict[str, Any]:
    """Records an epoch: history, checkpoints, TensorBoard. Returns its history record."""
    train_summary, val_summary = summarize(train_metrics), summarize(val_metrics)
    if not math.isfinite(train_summary["loss"]):
      raise FlaxMnistError(f"training diverged at epoch {epoch} (seed {self.seed}): train_loss is "
                           f"{train_summary['loss']}; lower config.learning_rate")
    record = {"epoch": epoch,
              "train_loss": train_summary["loss"], "train_accuracy": train_summary["accuracy"],
              "val_loss": val_summary["loss"], "val_accuracy": val_summary["accuracy"],
              **timings, "images_per_second": timings["parallel_seeds"] * train_summary["count"] / timings["train_seconds"]}
    self.history.append(record)
    self.state = state
    meta = {"epoch": epoch, "model": self.config_dict["model"], "val_accuracy": record["val_accuracy"],
            "val_loss": record["val_loss"], "train_accuracy": record["train_accuracy"],
            "train_loss": record["train_loss"], "config": self.config_dict}
    self.checkpoints.save_epoch(epoch, state, meta)
    if self.is_writer:
      write_json(self.workdir / HISTORY_FILE, self.history)
      if self.tensorboard is None:
        self.tensorboard = log.TensorBoard(self.workdir / "tensorboard", enabled=True)
      self.tensorboard.write_epoch(epoch, record, nnx.merge(train_graphdef, state["params"], state["model_state"]))
    return record

  def close(self) -> None:
    """Closes the TensorBoard writer and waits for pending checkpoint saves."""
    try:
      if self.tensorboard is not None:
        self.tensorboard.close()
    finally:
      self.checkpoints.close()


def _run_config_dict(config: Any, seed: int) -> dict[str, Any]:
  """The config as one seed's run of it: what config.json and each checkpoint record."""
  config_dict = config_to_dict(config)
  config_dict.update(seed=seed, num_seeds=1, seeds=[],
                     dropout_rng_impl=resolve_dropout_rng_impl(config["dropout_rng_impl"]))
  return config_dict


def _train(config: Any, seeds: list[int], workdirs: list[Path], say: Callable[[str], None],
           parallelism: str) -> list[list[dict[str, Any]]]:
  """Trains one copy of ``config.model`` per seed, each into its workdir; returns the histories."""
  is_writer = jax.process_index() == 0
  mnist = data.load_mnist(config["data_dir"] or None, tfds_data_dir=config["tfds_data_dir"] or None)
  train_images, train_labels = jax.device_put(mnist.train.images), jax.device_put(mnist.train.labels)
  test_images, test_labels = jax.device_put(mnist.test.images), jax.device_put(mnist.test.labels)
  say(f"data: {mnist.source}: {len(mnist.train):,} train, {len(mnist.test):,} test images")

  tx = make_optimizer(config)
  templates, shuffle_keys = [], []
  for seed in seeds:
    model = init_model(config, seed)
    model.train()
    train_graphdef, params, model_state = nnx.split(model, nnx.Param, ...)
    templates.append({"params": params, "model_state": model_state, "opt_state": tx.init(params)})
    shuffle_keys.append(jax.random.fold_in(jax.random.key(seed), 2))
  say(models.summary(model))
  model.eval()
  eval_graphdef = nnx.graphdef(model)

  runs: list[_SeedRun] = []
  try:
    for seed, workdir, template in zip(seeds, workdirs, templates):
      runs.append(_SeedRun(_run_config_dict(config, seed), workdir, template, is_writer=is_writer, say=say))
    num_epochs = config["num_epochs"]
    batch_size = config["batch_size"]
    steps_per_epoch = math.ceil(len(mnist.train) / batch_size)
    over_seeds = parallelism == "vmap"
    if over_seeds and len({run.start_epoch for run in runs}) > 1:
      raise ConfigError("seed_parallelism 'vmap' resumes only seeds stopped at the same epoch; these are at "
                        + ", ".join(f"{run.seed}: {run.start_epoch}" for run in runs)
                        + "; resume with --config.seed_parallelism=loop")
    progress = log.ProgressBar(steps_per_epoch, enabled=config["progress_bar"] and not over_seeds)
    train_epoch = make_train_epoch(train_graphdef, tx, batch_size, shuffle=config["shuffle"],
                                   progress=progress.update if progress.enabled else None, over_seeds=over_seeds)
    evaluate = make_evaluate(eval_graphdef, config["eval_batch_size"], over_seeds=over_seeds)
    pending = [run for run in runs if run.start_epoch < num_epochs]
    if not pending:
      return [run.history for run in runs]

    # One compiled program for every seed: all seeds' states have the same shapes.
    example = _stack([run.state for run in pending]) if over_seeds else pending[0].state
    example_key = _stack(shuffle_keys[:len(pending)]) if over_seeds else shuffle_keys[0]
    started = time.perf_counter()
    train_epoch = train_epoch.lower(example["params"], example["model_state"], example["opt_state"],
                                    train_images, train_labels, example_key).compile()
    compiled_train = time.perf_counter()
    evaluate = evaluate.lower(example["params"], example["model_state"], test_images, test_labels).compile()
    compile_seconds = {"train_epoch": compiled_train - started, "evaluate": time.perf_counter() - compiled_train}
    together = f" for {len(pending)} seeds at once" if over_seeds else ""
    say(f"compiled the train epoch ({steps_per_epoch} steps of {batch_size}) and evaluation{together} "
        f"in {sum(compile_seconds.values()):.1f} s")
    if is_writer:
      for run in pending:
        write_json(run.workdir / RUN_FILE, {
            "start_epoch": run.start_epoch, "compile_seconds": compile_seconds, "seed_parallelism": parallelism,
            "compiled_once_for_seeds": [other.seed for other in pending], **log.environment()})

    def timed_epoch(states: dict[str, Any], keys: jax.Array) -> tuple:
      started = time.perf_counter()
      params, model_state, opt_state, train_metrics = train_epoch(
          states["params"], states["model_state"], states["opt_state"], train_images, train_labels, keys)
      train_metrics = jax.device_get(train_metrics)  # Waits for the epoch.
      trained = time.perf_counter()
      val_metrics = jax.device_get(evaluate(params, model_state, test_images, test_labels))
      finished = time.perf_counter()
      timings = {"seconds": finished - started, "train_seconds": trained - started,
                 "eval_seconds": finished - trained, "parallel_seeds": len(pending) if over_seeds else 1}
      return {"params": params, "model_state": model_state, "opt_state": opt_state}, train_metrics, val_metrics, timings

    def report(run: _SeedRun, record: dict[str, Any]) -> None:
      prefix = f"seed {run.seed}: " if len(runs) > 1 else ""
      say(prefix + log.format_epoch(record, num_epochs))

    try:
      if over_seeds:
        states = _stack([run.state for run in pending])
        keys = _stack([key for run, key in zip(runs, shuffle_keys) if run in pending])
        for epoch in range(pending[0].start_epoch + 1, num_epochs + 1):
          states, train_metrics, val_metrics, timings = timed_epoch(
              states, jax.vmap(jax.random.fold_in, in_axes=(0, None))(keys, epoch))
          for index, run in enumerate(pending):
            report(run, run.finish_epoch(epoch, _unstack(states, index), _unstack(train_metrics, index),
                                         _unstack(val_metrics, index), timings, train_graphdef))
      else:
        for run, key in zip(runs, shuffle_keys):
          state = run.state
          for epoch in range(run.start_epoch + 1, num_epochs + 1):
            progress.start(epoch, num_epochs)
            state, train_metrics, val_metrics, timings = timed_epoch(state, jax.random.fold_in(key, epoch))
            progress.close()
            report(run, run.finish_epoch(epoch, state, train_metrics, val_metrics, timings, train_graphdef))
    finally:
      progress.close()
  finally:
    for run in runs:
      run.close()
  return [run.history for run in runs]


def train_and_evaluate(config: Any, workdir: str | os.PathLike, *,
                       print_fn: Callable[[str], None] | None = print) -> list[dict[str, Any]]:
  """Trains ``config.model`` from ``config.seed`` for ``config.num_epochs``, validating on the test
  set after each epoch. (Several seeds: ``train_seeds``.)

  Writes into ``workdir``: config.json, history.json, run.json (compile seconds, hardware,
  versions), checkpoints/{best,latest}, tensorboard/.
  Resumes from ``checkpoints/latest`` if present. Returns the history, one dict per epoch with
  epoch, train_loss, train_accuracy, val_loss, val_accuracy, seconds (train + eval, compile
  excluded), train_seconds, eval_seconds, parallel_seeds (1 here) and images_per_second
  (training throughput).
  """
  validate_config(config)
  if len(seed_list(config)) > 1:
    raise ConfigError(f"config trains seeds {seed_list(config)}: use train_seeds for several seeds")
  say = print_fn or (lambda line: None)
  [history] = _train(config, [config["seed"]], [Path(workdir)], say, "loop")
  _say_best(history, say)
  return history


def _say_best(history: list[dict[str, Any]], say: Callable[[str], None], prefix: str = "") -> None:
  if history:
    best = max(history, key=lambda record: record["val_accuracy"])
    say(f"{prefix}best val_accuracy {best['val_accuracy']:.4f} at epoch {best['epoch']}")


AGGREGATED = ("train_loss", "train_accuracy", "val_loss", "val_accuracy")


def spread(values: Any) -> dict[str, float]:
  """Mean, sample std (ddof 1; 0 for one value), min, max and count of ``values`` (over seeds)."""
  array = np.asarray(values, np.float64)
  return {"mean": float(array.mean()), "std": float(array.std(ddof=1)) if array.size > 1 else 0.0,
          "min": float(array.min()), "max": float(array.max()), "n": int(array.size)}


def aggregate_seeds(histories: Mapping[int, list[dict[str, Any]]]) -> dict[str, Any]:
  """``spread`` over seeds of each epoch's metrics and of the best epoch."""
  best = {seed: max(history, key=lambda record: record["val_accuracy"]) for seed, history in histories.items()
          if history}
  num_epochs = min((len(history) for history in histories.values()), default=0)
  return {
      "seeds": list(histories),
      "best": {str(seed): {"epoch": record["epoch"], "val_accuracy": record["val_accuracy"],
                           "val_loss": record["val_loss"]} for seed, record in best.items()},
      "best_val_accuracy": spread([record["val_accuracy"] for record in best.values()]) if best else None,
      "epochs": [{"epoch": epoch + 1,
                  **{name: spread([history[epoch][name] for history in histories.values()]) for name in AGGREGATED}}
                 for epoch in range(num_epochs)],
  }


def train_seeds(config: Any, workdir: str | os.PathLike, *,
                print_fn: Callable[[str], None] | None = print) -> dict[int, list[dict[str, Any]]]:
  """Trains ``config.model`` from each seed of ``seed_list(config)``, compiling once.

  Each seed gets a full single-seed workdir, ``workdir/seed_<seed>/`` (the same files, history
  and best checkpoint as ``train_and_evaluate`` with that seed would write, to float tolerance
  under vmap and exactly in a loop); ``workdir/seeds.json`` holds the aggregate over seeds
  (``aggregate_seeds``). ``config.seed_parallelism`` picks vmap or loop. Returns
  {seed: history}.
  """
  validate_config(config)
  say = print_fn or (lambda line: None)
  seeds = seed_list(config)
  workdir = Path(workdir)
  parallelism = resolve_seed_parallelism(config["seed_parallelism"])
  say(f"seeds {', '.join(map(str, seeds))} ({parallelism})")
  histories = _train(config, seeds, [workdir / SEED_DIR.format(seed) for seed in seeds], say, parallelism)
  by_seed = dict(zip(seeds, histories))
  for seed, history in by_seed.items():
    _say_best(history, say, prefix=f"seed {seed}: ")
  aggregate = aggregate_seeds(by_seed)
  if jax.process_index() == 0:
    write_json(workdir / SEEDS_FILE, {"model": config["model"], "seed_parallelism": parallelism, **aggregate})
  if aggregate["best_val_accuracy"]:
    best = aggregate["best_val_accuracy"]
    say(f"best val_accuracy over {len(seeds)} seeds: {best['mean']:.4f} ± {best['std']:.4f} "
        f"(min {best['min']:.4f}, max {best['max']:.4f})")
  return by_seed
