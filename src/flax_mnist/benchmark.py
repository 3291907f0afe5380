"""Benchmark: times the project's real training path and, side by side, a Keras baseline.

Each model runs in a fresh subprocess (so compile caches and peak memory are its own) through
``train.train_and_evaluate``, the same function ``scripts/train.py`` calls. From its history and
``run.json`` come: compile time, the median epoch time over epochs 2..N (train and eval apart;
epoch 1 alone if N is 1), images/s, achieved GFLOP/s from the model's FLOP count
(``models.training_flops``) and its fraction of the f32 matmul peak measured in the same run,
peak host and device memory. ``benchmarks/keras_baseline.py`` measures the same models with
Keras 3 + TensorFlow in its own interpreter (TensorFlow is never imported here).
"""

from __future__ import annotations

import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
from flax import nnx

from flax_mnist import config as config_lib
from flax_mnist import data, history, log, models, train, workdir
from flax_mnist.errors import FlaxMnistError

NUM_TRAIN, NUM_TEST = 60_000, 10_000
KERAS_BASELINE = Path(__file__).resolve().parents[2] / "benchmarks" / "keras_baseline.py"


def measure_matmul_peak(size: int = 1024, repeats: int = 20) -> float:
  """Median GFLOP/s of a jitted f32 ``size x size`` matmul on the default device."""
  keys = jax.random.split(jax.random.key(0), 2)
  left, right = (jax.random.normal(key, (size, size), jnp.float32) for key in keys)
  matmul = jax.jit(jnp.matmul)
  matmul(left, right).block_until_ready()
  times = []
  for _ in range(repeats):
    started = time.perf_counter()
    matmul(left, right).block_until_ready()
    times.append(time.perf_counter() - started)
  return 2 * size**3 / statistics.median(times) / 1e9


def epoch_flops(model_name: str) -> dict[str, float]:
  """FLOPs of one epoch (train 60,000 + evaluate 10,000 images) and per image."""
  train_per_image, forward_per_image = models.training_flops(
    models.create_model(model_name, rngs=nnx.Rngs(0))
  )
  return {
    "train_flops_per_image": train_per_image,
    "forward_flops_per_image": forward_per_image,
    "train_flops": NUM_TRAIN * train_per_image,
    "eval_flops": NUM_TEST * forward_per_image,
  }


def _steady_median(records: Sequence[Mapping[str, Any]], key: str) -> float:
  """The median of ``key`` over the steady epochs (``history.steady``)."""
  return statistics.median(record[key] for record in history.steady(records))


def _config(
  config: Mapping[str, Any], epochs: int, data_dir: str | None, overrides: Mapping[str, Any] | None
) -> ml_collections.ConfigDict:
  """The experiment's config (from its config file) for a benchmark run of ``epochs``."""
  config = ml_collections.ConfigDict(dict(config))
  config.update(num_epochs=epochs, progress_bar=False)
  if data_dir:
    config.data_dir = data_dir
  config.update(dict(overrides or {}))
  return config


def benchmark_model(
  config: Mapping[str, Any],
  epochs: int,
  data_dir: str | None = None,
  overrides: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
  """Trains ``config`` for ``epochs`` in this process through train_and_evaluate and measures it."""
  config = _config(config, epochs, data_dir, overrides)
  model = config.model
  with tempfile.TemporaryDirectory(prefix=f"benchmark_{model}_") as directory:
    records = train.train_and_evaluate(config, directory, print_fn=None)
    run = workdir.read_json(Path(directory) / workdir.RUN_FILE)
  device_stats = jax.devices()[0].memory_stats() or {}
  flops = epoch_flops(model)
  epoch_seconds = _steady_median(records, "seconds")
  train_seconds = _steady_median(records, "train_seconds")
  eval_seconds = _steady_median(records, "eval_seconds")
  return {
    "model": model,
    "epochs": epochs,
    "impl": run["resolved"]["impl"],
    "compute_dtype": config.compute_dtype,
    "compile_seconds": sum(run["compile_seconds"].values()),
    "compile_breakdown": run["compile_seconds"],
    "epoch_seconds": epoch_seconds,
    "train_seconds": train_seconds,
    "eval_seconds": eval_seconds,
    "epoch_seconds_all": [record["seconds"] for record in records],
    "train_images_per_second": NUM_TRAIN / train_seconds,
    "eval_images_per_second": NUM_TEST / eval_seconds,
    "gflops_per_second": (flops["train_flops"] + flops["eval_flops"]) / epoch_seconds / 1e9,
    **flops,
    "best_val_accuracy": history.best_record(records)["val_accuracy"],
    "final_val_accuracy": records[-1]["val_accuracy"],
    "peak_host_memory_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    "peak_device_memory_mb": (
      device_stats["peak_bytes_in_use"] / 2**20 if "peak_bytes_in_use" in device_stats else None
    ),
    "environment": run,
  }


def benchmark_seeds(
  config: Mapping[str, Any],
  epochs: int,
  num_seeds: int,
  data_dir: str | None = None,
  overrides: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
  """Trains ``num_seeds`` seeds of ``model`` through ``train.train_seeds`` and times an epoch of
  all seeds.

  The epoch of all seeds is the sum of the seeds' epochs in a loop, or the one shared epoch under
  vmap; its median over epochs 2..N against one seed's epoch says what the extra seeds cost.
  """
  config = _config(config, epochs, data_dir, {"num_seeds": num_seeds, **(overrides or {})})
  model = config.model
  parallelism = config_lib.resolve_seed_parallelism(config.seed_parallelism)
  if parallelism == "vmap" and config.dropout_rng_impl == "auto":
    config.dropout_rng_impl = "threefry2x32"  # rbg is not vmap-invariant (config.resolve).
  resolved = config_lib.resolve(config)
  with tempfile.TemporaryDirectory(prefix=f"benchmark_seeds_{model}_") as directory:
    histories = list(train.train_seeds(config, directory, print_fn=None).values())
    run = workdir.read_json(workdir.seed_dir(directory, resolved.seeds[0]) / workdir.RUN_FILE)
  if parallelism == "vmap":
    group = [{"seconds": record["seconds"]} for record in histories[0]]
  else:
    group = [
      {"seconds": sum(records[epoch]["seconds"] for records in histories)}
      for epoch in range(epochs)
    ]
  return {
    "model": model,
    "num_seeds": num_seeds,
    "seed_parallelism": parallelism,
    "dropout_rng_impl": resolved.dropout_rng_impl,
    "compile_seconds": sum(run["compile_seconds"].values()),
    "seeds_epoch_seconds": _steady_median(group, "seconds"),
    "peak_host_memory_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
  }


def _run_json_subprocess(command: Sequence[str], payload: dict[str, Any], what: str) -> Any:
  """Runs ``command`` with ``payload`` as JSON on stdin; returns the JSON on its last line."""
  result = subprocess.run(list(command), input=json.dumps(payload), capture_output=True, text=True)
  lines = result.stdout.strip().splitlines()
  if result.returncode != 0 or not lines:
    error_lines = [line for line in result.stderr.strip().splitlines() if line.strip()]
    reason = error_lines[-1] if error_lines else f"exit code {result.returncode}"
    raise FlaxMnistError(f"{what} failed: {reason}")
  return json.loads(lines[-1])


def in_subprocess(
  function: Callable[..., dict[str, Any]], config: Mapping[str, Any], epochs: int, **arguments: Any
) -> dict[str, Any]:
  """``function(config, epochs, **arguments)`` (``benchmark_model``, ``benchmark_seeds``) in a
  fresh Python process: its own compile cache and peak memory."""
  payload = {"config": config_lib.config_to_dict(config), "epochs": epochs, **arguments}
  what = f"{function.__name__} of {config['model']}"
  code = (
    "import json, sys; from absl import logging; logging.set_verbosity(logging.WARNING); "
    "from flax_mnist import benchmark; "
    f"print(json.dumps(benchmark.{function.__name__}(**json.load(sys.stdin))))"
  )
  return _run_json_subprocess([sys.executable, "-c", code], payload, what)


def run_keras(
  models_to_run: Sequence[str], epochs: int, data_dir: str | None, python: str
) -> dict[str, Any]:
  """Runs ``benchmarks/keras_baseline.py`` with ``python`` (an interpreter with keras and TF)."""
  data_dir = data_dir or os.environ.get(data.DATA_DIR_ENV)  # The baseline reads IDX files only.
  if not data_dir:
    raise FlaxMnistError(
      f"the Keras baseline reads IDX files: pass --data_dir or set {data.DATA_DIR_ENV}"
    )
  return _run_json_subprocess(
    [python, str(KERAS_BASELINE)],
    {"models": list(models_to_run), "epochs": epochs, "data_dir": data_dir},
    f"Keras baseline with {python}",
  )


def run(
  configs: Mapping[str, Mapping[str, Any]],
  epochs: int,
  *,
  data_dir: str | None = None,
  baseline: str | None = None,
  baseline_python: str | None = None,
  overrides: Mapping[str, Any] | None = None,
  num_seeds: int = 1,
  seed_parallelism: str = "auto",
) -> dict[str, Any]:
  """The whole benchmark of ``configs`` ({model name: its experiment config}): environment,
  matmul peak, each model, the baseline if asked, and with ``num_seeds`` > 1 what training that
  many seeds together costs against one."""
  models_to_run = list(configs)
  if baseline not in (None, "keras"):
    raise FlaxMnistError(f"baseline {baseline!r}: unknown, expected keras")
  result: dict[str, Any] = {
    "environment": log.environment(),
    "matmul_peak_gflops": measure_matmul_peak(),
    "epochs": epochs,
    "models": {},
  }
  for name in models_to_run:
    measured = in_subprocess(
      benchmark_model, configs[name], epochs, data_dir=data_dir, overrides=overrides
    )
    measured["fraction_of_matmul_peak"] = (
      measured["gflops_per_second"] / result["matmul_peak_gflops"]
    )
    result["models"][name] = measured
    if num_seeds > 1:
      seed_overrides = {**(overrides or {}), "seed_parallelism": seed_parallelism}
      seeds = in_subprocess(
        benchmark_seeds,
        configs[name],
        epochs,
        num_seeds=num_seeds,
        data_dir=data_dir,
        overrides=seed_overrides,
      )
      seeds["ratio_to_one_seed"] = seeds["seeds_epoch_seconds"] / measured["epoch_seconds"]
      measured["seeds"] = seeds
  if baseline == "keras":
    keras = run_keras(models_to_run, epochs, data_dir, baseline_python or sys.executable)
    result["baseline"] = keras
    for name in models_to_run:
      result["models"][name]["ratio_to_keras"] = (
        result["models"][name]["epoch_seconds"] / keras["models"][name]["epoch_seconds"]
      )
  return result


def _timing_table(result: dict[str, Any]) -> list[str]:
  """One row per model: compile, epoch, throughput, FLOP rate, memory, accuracy, Keras's."""
  has_keras = "baseline" in result
  header = [
    "model",
    "compile s",
    "epoch s (median)",
    "train s",
    "eval s",
    "train img/s",
    "GFLOP/s",
    "% matmul peak",
    "peak host MB",
    "best val acc",
  ]
  if has_keras:
    header += ["Keras-TF epoch s", "ratio to Keras"]
  lines = ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
  for name, row in result["models"].items():
    cells = [
      name,
      f"{row['compile_seconds']:.1f}",
      f"{row['epoch_seconds']:.2f}",
      f"{row['train_seconds']:.2f}",
      f"{row['eval_seconds']:.3f}",
      f"{row['train_images_per_second']:,.0f}",
      f"{row['gflops_per_second']:.1f}",
      f"{100 * row['fraction_of_matmul_peak']:.0f}%",
      f"{row['peak_host_memory_mb']:,.0f}",
      f"{row['best_val_accuracy']:.4f}",
    ]
    if has_keras:
      keras = result["baseline"]["models"][name]
      cells += [f"{keras['epoch_seconds']:.2f}", f"{row['ratio_to_keras']:.2f}x"]
    lines.append("| " + " | ".join(cells) + " |")
  return lines


def _footer(result: dict[str, Any]) -> list[str]:
  """What was run, where, with what: impl, dtype, hardware, versions, the matmul peak."""
  environment = result["environment"]
  # Results written before these fields (the committed Intel runs) say "?".
  settings = sorted(
    {
      f"{row.get('impl', '?')}, {row.get('compute_dtype', '?')}"
      for row in result["models"].values()
    }
  )
  lines = [
    "",
    f"impl and compute dtype: {'; '.join(settings)}.",
    f"{result['epochs']} epochs per model; epoch = train 60,000 + evaluate 10,000 images "
    "at batch 512, "
    f"median of epochs 2..N, compilation excluded; {log.describe_hardware(environment)}; "
    f"jax {environment['versions']['jax']}, flax {environment['versions']['flax']}; "
    f"f32 matmul peak measured in this run: {result['matmul_peak_gflops']:.0f} GFLOP/s.",
  ]
  if "baseline" in result:
    keras_env = result["baseline"]["environment"]
    lines.append(
      f"Keras baseline: keras {keras_env['keras']}, tensorflow {keras_env['tensorflow']}, "
      f"{keras_env['intra_op_threads']} intra-op threads, same data, batch and epochs, same run."
    )
  return lines


def _seeds_table(result: dict[str, Any]) -> list[str]:
  """What training several seeds together cost against one (``--seeds``), if it was run."""
  seeded = {name: row["seeds"] for name, row in result["models"].items() if "seeds" in row}
  if not seeded:
    return []
  lines = [
    "",
    "| model | seeds | trained by | dropout PRNG | compile s (once) "
    "| epoch s, all seeds (median) "
    "| x one seed's epoch |",
    "| --- | --- | --- | --- | --- | --- | --- |",
  ]
  for name, seeds in seeded.items():
    lines.append(
      f"| {name} | {seeds['num_seeds']} | {seeds['seed_parallelism']} "
      f"| {seeds['dropout_rng_impl']} "
      f"| {seeds['compile_seconds']:.1f} | {seeds['seeds_epoch_seconds']:.2f} "
      f"| {seeds['ratio_to_one_seed']:.2f}x |"
    )
  lines.append(
    "x one seed's epoch: the seeds' epoch over the single-seed epoch above "
    "(1x: the extra seeds are "
    "free; the number of seeds: no gain over running them one after the other)."
  )
  return lines


def to_markdown(result: dict[str, Any]) -> str:
  """The benchmark's tables: per-model timing, seeds, and the per-layer FLOP counts."""
  lines = _timing_table(result) + _footer(result) + _seeds_table(result)
  lines += ["", "| model | layer | forward MFLOP / image |", "| --- | --- | ---: |"]
  for name in result["models"]:
    for layer, flops in models.layer_flops(models.create_model(name, rngs=nnx.Rngs(0))):
      if flops:
        lines.append(f"| {name} | {layer} | {flops / 1e6:.3f} |")
  return "\n".join(lines) + "\n"


def save_step_table(
  rows: Sequence[str],
  result: Mapping[str, Any],
  *,
  repeats: int,
  steps: int,
  json_path: str | None,
  markdown_path: str | None,
) -> str:
  """A ms-per-step table (its Markdown ``rows``) with the footer saying how it was timed and on
  what; printed, and written to ``json_path`` (``result``) and ``markdown_path`` if given."""
  environment = result["environment"]
  table = "\n".join(rows) + (
    f"\n\nms per training step of 512 (the fastest of {repeats} interleaved runs of "
    f"{steps} steps); {log.describe_hardware(environment)}; jax "
    f"{environment['versions']['jax']}.\n"
  )
  print(table)
  if json_path:
    workdir.write_json(json_path, result)
  if markdown_path:
    workdir.write_text(markdown_path, table)
  return table
