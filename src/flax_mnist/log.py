"""Reporting a run: a live progress bar, one console line per epoch, TensorBoard event files.

TensorBoard files are written with tensorboardX, which needs no TensorFlow (flax's and clu's
writers import it). Like the notebook's ``TensorBoard(histogram_freq=1)``, every epoch
logs the scalars and a histogram of every weight and bias.
"""

from __future__ import annotations

import importlib.metadata
import os
import platform
import sys
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, TextIO

import jax
import numpy as np
from tensorboardX import SummaryWriter
from tqdm import tqdm

Say = Callable[[str], None]  # Where a run's lines go (print, a logger, a list).


class ProgressBar:
  """A per-epoch tqdm bar updated from inside the compiled epoch (through a host callback)."""

  def __init__(self, total_steps: int, *, enabled: bool, stream: TextIO | None = None):
    self.total_steps = total_steps
    self.stream = stream or sys.stderr
    self.enabled = enabled and self.stream.isatty()
    self._bar: tqdm | None = None
    self.last_step = 0  # The last step reported in the current epoch (0: none, or no bar).

  def start(self, epoch: int, num_epochs: int) -> None:
    """Opens the bar for one epoch."""
    self.last_step = 0
    if self.enabled:
      self._bar = tqdm(
        total=self.total_steps,
        desc=f"epoch {epoch}/{num_epochs}",
        unit="step",
        file=self.stream,
        leave=False,
        dynamic_ncols=True,
      )

  def update(self, step: Any, loss_sum: Any, correct_sum: Any, seen: Any) -> None:
    """Called by the compiled epoch after each step with the running sums."""
    if self._bar is None:
      return
    seen = max(int(seen), 1)
    self.last_step = int(step)
    self._bar.n = int(step)
    self._bar.set_postfix(
      loss=f"{float(loss_sum) / seen:.4f}", accuracy=f"{int(correct_sum) / seen:.4f}", refresh=False
    )
    self._bar.refresh()

  def close(self) -> None:
    """Closes the bar of the current epoch."""
    if self._bar is not None:
      self._bar.close()
      self._bar = None


_VERSIONED = ("jax", "jaxlib", "flax", "optax", "orbax-checkpoint", "numpy", "flax_mnist")


def environment() -> dict[str, Any]:
  """Where and with what a run happens: platform, devices, CPU, library versions, XLA flags."""
  device = jax.devices()[0]
  cpu = platform.processor()
  if Path("/proc/cpuinfo").exists():
    names = [
      line.split(":", 1)[1].strip()
      for line in Path("/proc/cpuinfo").read_text().splitlines()
      if line.startswith("model name")
    ]
    cpu = names[0] if names else cpu
  return {
    "platform": device.platform,
    "device_kind": device.device_kind,
    "device_count": jax.device_count(),
    "process_count": jax.process_count(),
    "cpu": cpu,
    "cpu_count": os.cpu_count(),
    "python": platform.python_version(),
    "versions": {name: importlib.metadata.version(name) for name in _VERSIONED},
    "xla_flags": os.environ.get("XLA_FLAGS", ""),
  }


def describe_hardware(environment: dict[str, Any]) -> str:
  """One phrase for the hardware of ``environment()``: the CPU and its cores, or accelerators."""
  if environment["platform"] == "cpu":
    return f"CPU: {environment['cpu']}, {environment['cpu_count']} cores"
  return f"{environment['device_count']} x {environment['device_kind']}"


def format_epoch(record: dict[str, Any], num_epochs: int) -> str:
  """One console line for an epoch's history record."""
  return (
    f"epoch {record['epoch']:>3}/{num_epochs}  "
    f"train_loss {record['train_loss']:.4f}  train_accuracy {record['train_accuracy']:.4f}  "
    f"val_loss {record['val_loss']:.4f}  val_accuracy {record['val_accuracy']:.4f}  "
    f"{record['seconds']:.2f} s  {record['images_per_second']:,.0f} images/s"
  )


# Keras's TensorBoard callback layout: runs "train" and "validation", each with epoch_loss and
# epoch_accuracy, so that TensorBoard draws train and val of a metric on one chart.
KERAS_SCALARS = {
  "train": {"epoch_loss": "train_loss", "epoch_accuracy": "train_accuracy"},
  "validation": {"epoch_loss": "val_loss", "epoch_accuracy": "val_accuracy"},
}
TIMING_SCALARS = ("seconds", "train_seconds", "eval_seconds", "images_per_second")


class TensorBoard:
  """TensorBoard event files as Keras writes them: ``<logdir>/train`` and
  ``<logdir>/validation`` with ``epoch_loss`` and ``epoch_accuracy``; the timings and one
  histogram per weight, bias and BatchNorm moving statistic in ``train``. Nothing constant is
  logged (a flat line per run says nothing)."""

  def __init__(self, logdir: str | os.PathLike, *, enabled: bool = True):
    self.writers = (
      {run: SummaryWriter(os.path.join(os.fspath(logdir), run)) for run in KERAS_SCALARS}
      if enabled
      else {}
    )

  def write_epoch(
    self,
    epoch: int,
    record: Mapping[str, Any],
    histograms: Mapping[str, Any],
    learning_rate: float | None = None,
    step_losses: Mapping[int, float] | None = None,
  ) -> None:
    """Writes the epoch's scalars and one histogram per named array (``{"dense/kernel": ...}``);
    ``learning_rate`` (the last step's, where a schedule moves it) as ``epoch_learning_rate`` in
    ``train``, as Keras logs it. A metrics_fn's figures (``train_<name>``, ``val_<name>``) go
    where Keras puts a compiled metric: ``epoch_<name>`` in ``train`` and ``validation``;
    ``step_losses`` ({global step: mean loss}) as ``batch_loss`` in ``train``, as Keras's
    ``update_freq`` does."""
    if not self.writers:
      return
    extra = [key[len("val_") :] for key in record if key.startswith("val_")]
    extra = [name for name in extra if name not in ("loss", "accuracy")]
    for run, tags in KERAS_SCALARS.items():
      prefix = "train_" if run == "train" else "val_"
      tags = {**tags, **{f"epoch_{name}": prefix + name for name in extra}}
      for tag, key in tags.items():
        self.writers[run].add_scalar(tag, record[key], epoch)
    train = self.writers["train"]
    for key in TIMING_SCALARS:
      train.add_scalar(f"epoch_{key}", record[key], epoch)
    if learning_rate is not None:
      train.add_scalar("epoch_learning_rate", learning_rate, epoch)
    for step, loss in (step_losses or {}).items():
      train.add_scalar("batch_loss", loss, step)
    for name, value in histograms.items():
      train.add_histogram(name, np.asarray(value), epoch)
    for writer in self.writers.values():
      writer.flush()

  def close(self) -> None:
    """Flushes and closes the event files."""
    for writer in self.writers.values():
      writer.close()
