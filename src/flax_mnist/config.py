"""The experiment's settings: defaults, validation, and the one place every "auto" is resolved.

A config is an ``ml_collections.ConfigDict`` (``configs/<model>.py`` start from
``default_config()`` and set ``model``). ``resolve(config)`` validates it and turns every "auto"
into a concrete choice for this platform, once, as a frozen ``RunConfig``: every field, typed,
the one object the trainer passes down and records in config.json and run.json.
"""

from __future__ import annotations

import dataclasses
import difflib
import importlib.util
import json
import math
import os
from collections.abc import Mapping
from typing import Any

import jax
import ml_collections

from flax_mnist import data, layers, models, optim
from flax_mnist.errors import ConfigError

IMPLS = ("auto", *layers.IMPLS)
DROPOUT_RNG_IMPLS = ("auto", "rbg", "unsafe_rbg", "threefry2x32")
SEED_PARALLELISMS = ("auto", "loop", "vmap")
# The metric that picks the best checkpoint, and its direction. Val accuracy by default; the
# notebook's ModelCheckpoint kept Keras's default, val_loss.
BEST_METRICS = {"val_accuracy": "max", "val_loss": "min"}


def default_config() -> ml_collections.ConfigDict:
  """The notebook's settings; each file in ``configs/`` sets ``model`` and may override more."""
  config = ml_collections.ConfigDict()
  # What the experiment is.
  config.model = "cnn"  # A registered name, or "package.module:factory" (imported on use).
  config.model_kwargs = ml_collections.ConfigDict()  # Passed to the model's factory.
  config.seed = 0
  # The optimizer (optim.make_optimizer): "keras_adam" is Adam as Keras computes it (the
  # notebook's); "adam" is optax's (eps on the bias-corrected moment), "adamw", "sgd".
  config.optimizer = "keras_adam"
  config.learning_rate = 1e-3
  config.lr_schedule = "constant"  # Or cosine, warmup_cosine, onecycle.
  config.warmup_epochs = 0.0  # warmup_cosine's warmup; onecycle's peak (0: at 30% of the run).
  config.adam_eps = 1e-7  # Keras's default (optax's is 1e-8).
  config.adam_b1 = 0.9  # Adam's moment decays (keras_adam, adam, adamw), Keras's and optax's.
  config.adam_b2 = 0.999
  config.momentum = 0.9  # sgd only.
  config.weight_decay = 0.0  # adamw only (decoupled, as optax.adamw).
  config.grad_clip_norm = 0.0  # Clip the gradient's global norm to this; 0: no clipping.
  config.label_smoothing = 0.0
  # Stop after this many epochs without a better best_metric (Keras's EarlyStopping); 0: never.
  config.early_stopping_patience = 0
  # On-device augmentation of the training images, per image, per step: off by default (the
  # notebook has none). shift: random integer shifts of up to this many pixels (0: none).
  config.augment = ml_collections.ConfigDict({"shift": 0})
  config.batch_size = 512
  config.eval_batch_size = 1000
  config.num_epochs = 20
  config.shuffle = True
  config.best_metric = "val_accuracy"  # Or "val_loss" (what the notebook's ModelCheckpoint kept).
  # What the data is: "mnist", or a drop-in of its format, "fashion_mnist" or "kmnist".
  config.dataset = "mnist"
  # Where the data is. Its IDX directory; unset: $FLAX_MNIST_DATA_DIR (MNIST only), else TFDS.
  config.data_dir = ml_collections.config_dict.placeholder(str)
  config.tfds_data_dir = ml_collections.config_dict.placeholder(str)  # Unset: TFDS's default.
  # How it is executed: none of these changes what a seed computes beyond the last float bits.
  config.impl = "auto"  # "s2d" on CPU, "lax" elsewhere (resolve_impl).
  # Activations and matmuls in bfloat16 (params, optimizer state, BatchNorm and the loss stay
  # float32): the built-in family only. Measured slower on a 2-core CPU; for GPU/TPU.
  config.compute_dtype = "float32"
  # PRNG of the dropout masks. "auto": XLA's RngBitGenerator ("rbg") on CPU, where it draws them
  # ~10 ms/step faster than threefry for cnn_pool_bn; "threefry2x32" (JAX's default) elsewhere,
  # because rbg draws other bits under vmap, and seeds are vmapped there (seed_parallelism).
  config.dropout_rng_impl = "auto"
  config.progress_bar = True  # Shown only on a terminal.
  # TensorBoard's batch_loss every this many steps (each step's mean loss); 0: epochs only.
  config.log_every_steps = 0
  # Several seeds: seeds seed, seed + 1, ... unless ``seeds`` lists them. "vmap" trains them in
  # one compiled program, "loop" one after the other with one compiled program; "auto": loop on
  # CPU (vmapping measured no gain there), vmap elsewhere. Either way a seed's results equal its
  # single-seed run (tested).
  config.num_seeds = 1
  config.seeds = ()
  config.seed_parallelism = "auto"
  # Devices. Each batch is split over ``data_devices`` (0: every device on GPU/TPU, 1 on CPU,
  # where forced host devices share the same cores and bring no speedup); vmapped seeds over
  # ``seed_devices`` (the mesh is seed_devices x data_devices).
  config.data_devices = 0
  config.seed_devices = 1
  return config


@dataclasses.dataclass(frozen=True)
class RunConfig:
  """A validated config with every "auto" resolved for this platform: the one object the trainer
  passes down (``resolve`` makes it from a ConfigDict, once; below it nothing reads a ConfigDict
  or restates a default). The fields are ``default_config()``'s (its comments say what each one
  is; a test keeps the two equal), then what a run adds to them: ``process_count``, the data's
  identity and source once the data is loaded, and the name of a caller's own loss."""

  model: str
  model_kwargs: dict[str, Any]
  seed: int
  optimizer: str
  learning_rate: float
  lr_schedule: str
  warmup_epochs: float
  adam_eps: float
  adam_b1: float
  adam_b2: float
  momentum: float
  weight_decay: float
  grad_clip_norm: float
  label_smoothing: float
  early_stopping_patience: int
  augment: dict[str, Any]
  batch_size: int
  eval_batch_size: int
  num_epochs: int
  shuffle: bool
  best_metric: str
  dataset: str  # The data's name: config.dataset's, or a caller's arrays' (from_arrays).
  data_dir: str | None
  tfds_data_dir: str | None
  impl: str
  compute_dtype: str
  dropout_rng_impl: str
  progress_bar: bool
  log_every_steps: int
  num_seeds: int
  seeds: tuple[int, ...]  # Every seed the run trains, resolved (never empty).
  seed_parallelism: str
  data_devices: int
  seed_devices: int
  # What a run adds (not config fields).
  process_count: int = 1
  data: str | None = None  # The data's identity (sizes and a fingerprint): a resume field.
  data_source: str | None = None
  input_shape: tuple[int, ...] | None = None  # The data's images (H, W, C), for the model.
  num_classes: int | None = None  # The data's, for the model's last layer.
  loss: str | None = None  # "custom: <name>" for a loss_fn passed from Python.

  def with_data(self, dataset: data.Dataset) -> RunConfig:
    """This run on ``dataset``: its name, identity, source, image shape and classes recorded."""
    return dataclasses.replace(
      self,
      dataset=dataset.name,
      data=dataset.identity(),
      data_source=dataset.source,
      input_shape=dataset.image_shape,
      num_classes=dataset.num_classes,
    )

  def for_seed(self, seed: int) -> RunConfig:
    """This run as one seed's run of it (what that seed's config.json and checkpoints hold)."""
    return dataclasses.replace(self, seed=seed, num_seeds=1, seeds=(seed,))

  def to_dict(self) -> dict[str, Any]:
    """JSON-able: what config.json and each checkpoint record (every "auto" resolved, so a
    checkpoint loads the same way on any platform). The run's additions appear once set."""
    record = {field.name: getattr(self, field.name) for field in dataclasses.fields(self)}
    del record["process_count"]
    for added in _RECORDED_ONCE_SET:
      if record[added] is None:
        del record[added]
    return json.loads(json.dumps({**record, "seeds": list(self.seeds)}))

  def resolved(self) -> dict[str, Any]:
    """What run.json records as resolved for this platform."""
    return {name: getattr(self, name) for name in _RESOLVED} | {"seeds": list(self.seeds)}


_RECORDED_ONCE_SET = ("data", "data_source", "input_shape", "num_classes", "loss")
_RESOLVED = (
  "model",
  "seeds",
  "impl",
  "dropout_rng_impl",
  "seed_parallelism",
  "seed_devices",
  "data_devices",
  "compute_dtype",
  "process_count",
)


def resolve_impl(name: str) -> str:
  """The layer implementation ``config.impl`` stands for on this platform.

  ``lax``: NHWC, XLA's convolution (GPU, TPU). ``s2d`` (CPU): each conv + ReLU + 2x2 max-pool
  as one space-to-depth matmul block, and each conv without a pool as one matmul into 2x2
  blocks of outputs (measured per step: cnn_pool 28 -> 12.5 ms, cnn_pool_bn 40 -> 25 ms, cnn
  82 -> 68 ms; mlp has no conv and runs the im2col ops); XLA:CPU's convolution gradients
  inside a compiled loop are 5-10x slower. ``im2col``: each convolution one matmul over stacked
  shifted slices (2x slower for the pooled models: benchmarks/results/layouts_cpu_amd_2core.md).
  """
  _check_choice("impl", name, IMPLS)
  if name == "auto":
    return "s2d" if jax.default_backend() == "cpu" else "lax"
  return name


def resolve_dropout_rng_impl(name: str) -> str:
  """The PRNG implementation ``config.dropout_rng_impl`` stands for on this platform."""
  _check_choice("dropout_rng_impl", name, DROPOUT_RNG_IMPLS)
  if name == "auto":
    return "rbg" if jax.default_backend() == "cpu" else "threefry2x32"
  return name


def resolve_seed_parallelism(name: str) -> str:
  """ "loop" or "vmap": how ``config.seed_parallelism`` trains several seeds on this platform."""
  _check_choice("seed_parallelism", name, SEED_PARALLELISMS)
  if name == "auto":
    return "loop" if jax.default_backend() == "cpu" else "vmap"
  return name


def seed_list(config: Mapping[str, Any]) -> list[int]:
  """The seeds a config trains: ``config.seeds`` if set, else ``num_seeds`` from ``seed`` on.
  Raises ConfigError for a seed that is not a non-negative integer (``int(1.9)`` would train
  seed 1 and record 1.9)."""
  seeds = config["seeds"]
  if not isinstance(seeds, (tuple, list)):
    raise ConfigError(f"config.seeds {seeds!r}: expected a tuple of integers such as (0, 1)")
  for seed in seeds or [config["seed"]]:
    if not isinstance(seed, int) or isinstance(seed, bool) or not 0 <= seed < 2**32:
      field = "seeds" if seeds else "seed"
      raise ConfigError(
        f"config.{field} {tuple(seeds) if seeds else seed!r}: {seed!r} is not a seed, expected "
        "integers in 0..2**32-1"
      )
  if seeds:
    return list(seeds)
  return list(range(config["seed"], config["seed"] + config["num_seeds"]))


def resolve(config: Mapping[str, Any]) -> RunConfig:
  """Validates ``config`` (a ConfigDict or mapping with ``default_config()``'s fields) and
  resolves its every "auto" for this platform, once: the RunConfig the trainer runs."""
  check_fields(config, "config")
  validate_config(config)
  seeds = tuple(seed_list(config))
  plain = config_to_dict(config)
  run = RunConfig(
    **{name: plain[name] for name in default_config().keys()},
    process_count=jax.process_count(),
  )
  run = dataclasses.replace(
    run,
    model_kwargs=plain["model_kwargs"] or {},
    seed=seeds[0],  # config.seeds, when set, names the seeds: (5,) trains seed 5.
    seeds=seeds,
    num_seeds=len(seeds),
    impl=resolve_impl(run.impl),
    dropout_rng_impl=resolve_dropout_rng_impl(run.dropout_rng_impl),
    seed_parallelism=resolve_seed_parallelism(run.seed_parallelism),
    data_devices=resolve_data_devices(run.data_devices, run.seed_devices),
  )
  _check_devices(run)
  # Every model of the family has Dropout.
  vmapped = len(seeds) > 1 and run.seed_parallelism == "vmap"
  if vmapped and run.dropout_rng_impl in ("rbg", "unsafe_rbg"):
    raise ConfigError(
      f"config.dropout_rng_impl {config['dropout_rng_impl']!r} with seed_parallelism 'vmap': "
      "rbg draws other masks under vmap than alone; use threefry2x32 or 'loop'"
    )
  return run


def resolve_data_devices(data_devices: int, seed_devices: int = 1) -> int:
  """How many devices split each batch: ``data_devices``, or for 0 every device left by the seed
  axis on GPU/TPU and 1 on CPU (forced host devices share the cores: measured no speedup)."""
  if data_devices:
    return data_devices
  if jax.default_backend() == "cpu" and jax.process_count() == 1:
    return 1
  return max(1, jax.device_count() // seed_devices)


def _check_devices(run: RunConfig) -> None:
  """The mesh must fit the devices, and every batch must split evenly over ``data`` (uneven
  batches run, but drift ~2e-4 from one device after a few Adam steps)."""
  wanted = run.seed_devices * run.data_devices
  if wanted > jax.device_count():
    raise ConfigError(
      f"config.seed_devices {run.seed_devices} x config.data_devices {run.data_devices} = "
      f"{wanted} devices, but JAX sees {jax.device_count()}"
    )
  for field in ("batch_size", "eval_batch_size"):
    if getattr(run, field) % run.data_devices:
      raise ConfigError(
        f"config.{field} {getattr(run, field)} does not divide over {run.data_devices} data "
        f"devices: expected a multiple of {run.data_devices}"
      )
  if run.seed_devices > 1 and (run.seed_parallelism != "vmap" or len(run.seeds) % run.seed_devices):
    raise ConfigError(
      f"config.seed_devices {run.seed_devices}: needs seed_parallelism 'vmap' and a number of "
      f"seeds divisible by it (got {run.seed_parallelism!r}, {len(run.seeds)} seeds)"
    )


def _check_choice(field: str, value: Any, choices: tuple[str, ...]) -> None:
  if value not in choices:
    raise ConfigError(f"config.{field} {value!r}: expected one of {', '.join(choices)}")


def _check_positive_int(config: Mapping[str, Any], field: str, minimum: int = 1) -> None:
  value = config[field]
  if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
    expected = "a positive integer" if minimum == 1 else f"an integer >= {minimum}"
    raise ConfigError(f"config.{field} {value!r}: expected {expected}")


def _check_number(
  config: Mapping[str, Any],
  field: str,
  low: float,
  high: float = math.inf,
  *,
  low_open: bool = False,
) -> None:
  """``config[field]`` a finite number in [low, high) (or (low, high))."""
  value = config[field]
  number = isinstance(value, (int, float)) and not isinstance(value, bool)
  if not (
    number and math.isfinite(value) and low <= value < high and (value > low or not low_open)
  ):
    if math.isinf(high):
      expected = "a positive number" if low_open and low == 0 else f"a number >= {low:g}"
    else:
      expected = f"a number in {'(' if low_open else '['}{low:g}, {high:g})"
    raise ConfigError(f"config.{field} {value!r}: expected {expected}")


def _check_optimizer(config: Mapping[str, Any]) -> None:
  """The optimizer fields: names, ranges, and no field that the chosen optimizer ignores."""
  _check_choice("optimizer", config["optimizer"], optim.OPTIMIZERS)
  _check_choice("lr_schedule", config["lr_schedule"], optim.SCHEDULES)
  _check_number(config, "learning_rate", 0.0, low_open=True)
  _check_number(config, "adam_eps", 0.0, low_open=True)
  _check_number(config, "adam_b1", 0.0, 1.0)
  _check_number(config, "adam_b2", 0.0, 1.0)
  _check_number(config, "warmup_epochs", 0.0)
  _check_number(config, "momentum", 0.0, 1.0)
  _check_number(config, "weight_decay", 0.0)
  _check_number(config, "grad_clip_norm", 0.0)
  _check_number(config, "label_smoothing", 0.0, 1.0)
  if config["weight_decay"] and config["optimizer"] != "adamw":
    raise ConfigError(
      f"config.weight_decay {config['weight_decay']!r}: only config.optimizer 'adamw' decays "
      f"weights, not {config['optimizer']!r}"
    )
  warmup, epochs = config["warmup_epochs"], config["num_epochs"]
  if warmup and epochs and warmup >= epochs:
    raise ConfigError(
      f"config.warmup_epochs {warmup!r}: expected fewer than config.num_epochs {epochs}"
    )


def validate_config(config: Mapping[str, Any]) -> None:
  """Raises ConfigError naming the first field whose value cannot be used."""
  try:
    models.resolve_model(config["model"])
  except ConfigError as error:
    raise ConfigError(f"config.{error}") from None
  kwargs = config.get("model_kwargs") or {}
  if not isinstance(kwargs, Mapping) and not hasattr(kwargs, "to_dict"):
    raise ConfigError(f"config.model_kwargs {kwargs!r}: expected a mapping of factory arguments")
  _check_positive_int(config, "batch_size")
  _check_positive_int(config, "eval_batch_size")
  _check_positive_int(config, "num_epochs", minimum=0)
  _check_positive_int(config, "early_stopping_patience", minimum=0)
  _check_positive_int(config, "log_every_steps", minimum=0)
  shift = config["augment"]["shift"]
  if not isinstance(shift, int) or isinstance(shift, bool) or not 0 <= shift <= 8:
    raise ConfigError(f"config.augment.shift {shift!r}: expected an integer in 0..8 (pixels)")
  _check_optimizer(config)
  _check_choice("impl", config["impl"], IMPLS)
  _check_choice("compute_dtype", config["compute_dtype"], layers.COMPUTE_DTYPES)
  _check_choice("dropout_rng_impl", config["dropout_rng_impl"], DROPOUT_RNG_IMPLS)
  _check_choice("seed_parallelism", config["seed_parallelism"], SEED_PARALLELISMS)
  _check_choice("best_metric", config["best_metric"], tuple(BEST_METRICS))
  _check_choice("dataset", config["dataset"], data.DATASETS)
  _check_positive_int(config, "num_seeds")
  _check_positive_int(config, "data_devices", minimum=0)
  _check_positive_int(config, "seed_devices")
  seeds = seed_list(config)
  if len(set(seeds)) != len(seeds):
    raise ConfigError(f"config.seeds {tuple(seeds)!r}: expected distinct seeds")


def result_fields(lr_schedule: str) -> tuple[str, ...]:
  """The fields a resumed run must share with its workdir's: those that change what training
  computes (not how fast, nor for how long, unless ``lr_schedule`` spans the run)."""
  fields = (
    "model",
    "model_kwargs",
    "seed",
    "batch_size",
    "shuffle",
    "label_smoothing",
    "augment",
    "loss",
    "data",  # Not a config field: the data's identity, recorded by the trainer.
    *optim.OPTIMIZER_FIELDS,
  )
  if lr_schedule != "constant":
    fields += ("num_epochs",)
  return fields


def config_to_dict(config: Any) -> dict[str, Any]:
  """A plain, JSON-able dict of a ConfigDict or mapping."""
  return json.loads(json.dumps(config.to_dict() if hasattr(config, "to_dict") else dict(config)))


def check_fields(config: Mapping[str, Any], where: str) -> None:
  """Refuses fields the defaults do not have (a misspelt ``num_epoch`` would be ignored)."""
  known = set(default_config().keys())
  for field in config.keys():
    if field not in known:
      nearest = difflib.get_close_matches(field, sorted(known), n=1)
      hint = f"; did you mean {nearest[0]!r}?" if nearest else ""
      raise ConfigError(f"{where}: unknown field config.{field}{hint}")


def load_config_file(
  path: str | os.PathLike, argument: str | None = None
) -> ml_collections.ConfigDict:
  """Runs a config file's ``get_config()``, or ``get_config(argument)`` (ml_collections'
  ``--config=path:argument``). A missing or broken file, a raise or exit while it loads, and
  anything but a ConfigDict back are one-line ConfigErrors (the file's own error chained)."""
  path = os.fspath(path)
  module = _config_module(path)
  what = "loading it"
  try:
    if not callable(getattr(module, "get_config", None)):
      raise ConfigError(f"{path}: defines no get_config() (expected one returning a ConfigDict)")
    if argument is None:
      config = module.get_config()
    else:
      what = f"get_config({argument!r})"
      config = module.get_config(argument)
  except ConfigError:
    raise
  except SyntaxError as error:
    raise ConfigError(f"{path}:{error.lineno}: syntax error ({error.msg})") from error
  except (Exception, SystemExit) as error:  # noqa: BLE001 (a config file may raise anything)
    # SystemExit too: sys.exit(0) in a config file would otherwise end the run with status 0,
    # having trained nothing.
    raise ConfigError(config_file_raised(path, error, what)) from error
  if not isinstance(config, ml_collections.ConfigDict):
    raise ConfigError(
      f"{path}: {what.replace('loading it', 'get_config()')} returned {type(config).__name__}, "
      "expected a ConfigDict"
    )
  check_fields(config, path)
  return config


def _config_module(path: str) -> Any:
  """The config file at ``path``, run as a module; a one-line ConfigError if it cannot be."""
  if not os.path.isfile(path):
    raise ConfigError(f"{path}: no such config file (expected a file like configs/cnn.py)")
  spec = importlib.util.spec_from_file_location(f"_flax_mnist_config_{abs(hash(path))}", path)
  module = importlib.util.module_from_spec(spec)
  try:
    spec.loader.exec_module(module)
  except SyntaxError as error:
    raise ConfigError(f"{path}:{error.lineno}: syntax error ({error.msg})") from error
  except (Exception, SystemExit) as error:  # noqa: BLE001 (a config file may raise anything)
    raise ConfigError(config_file_raised(path, error, "loading it")) from error
  return module


def load_sweep(path: str | os.PathLike) -> list[dict[str, Any]] | None:
  """The override dicts ``{field: value}`` that a config file's ``sweep()`` yields (kauldron's
  convention, for sweeps that are not products), or None when it defines none."""
  overrides = _call_config_function(path, "sweep")
  return None if overrides is None else [dict(changes) for changes in overrides]


def load_ablations(path: str | os.PathLike) -> dict[str, dict[str, Any]]:
  """``{name: overrides}`` of a config file's ``ablations()`` (a speed run's recipe undone one
  part at a time), or {} when it defines none."""
  ablations = _call_config_function(path, "ablations")
  return {} if ablations is None else {str(name): dict(o) for name, o in dict(ablations).items()}


def _call_config_function(path: str | os.PathLike, name: str) -> Any:
  """What the config file's function ``name()`` returns (lists of its generator's values), or
  None when it has none; a raise is one line naming the file."""
  path = os.fspath(path)
  function = getattr(_config_module(path), name, None)
  if function is None:
    return None
  try:
    result = function()
    return list(result) if not isinstance(result, Mapping) else result
  except (Exception, SystemExit) as error:  # noqa: BLE001 (a config file may raise anything)
    raise ConfigError(config_file_raised(path, error, f"{name}()")) from error


def config_file_raised(path: str, error: BaseException, what: str) -> str:
  """The one line for a config file at ``path`` whose ``what`` (loading it, ``get_config(arg)``)
  raised ``error``: SystemExit and KeyboardInterrupt raised by the file are broken files too."""
  if isinstance(error, SystemExit):
    return (
      f"{path}: {what} raised SystemExit({error.code!r}): a config file must not exit; expected "
      "get_config() to return a ConfigDict"
    )
  if isinstance(error, KeyboardInterrupt):  # Raised by the file (a real Ctrl-C never gets here).
    return f"{path}: {what} raised KeyboardInterrupt; expected get_config() to return a ConfigDict"
  text = str(error).strip()
  reason = f": {text.splitlines()[0]}" if text else ""
  return f"{path}: {what} raised {type(error).__name__}{reason}"


def kind_of(value: Any) -> str:
  """What a config field's value is, in words, for "expected ..."."""
  if isinstance(value, bool):
    return "true or false"
  if isinstance(value, int):
    return "an integer"
  if isinstance(value, float):
    return "a number"
  if isinstance(value, str):
    return "a string"
  if isinstance(value, (tuple, list)):
    return "a tuple such as '(0, 1)'"
  return f"a {type(value).__name__}"
