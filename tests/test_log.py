"""Tests for flax_mnist.log: TensorBoard event files read back, epoch lines, the progress bar."""

from __future__ import annotations

import io
import struct

import jax.numpy as jnp
import pytest
from conftest import small_config
from tensorboardX.proto import event_pb2

from flax_mnist import log, optim, train
from flax_mnist.errors import ConfigError


def read_events(logdir):
  """Parses every TFRecord-framed Event in the directory's event files (no TensorFlow)."""
  events = []
  for path in sorted(logdir.glob("events.out.tfevents.*")):
    raw = path.read_bytes()
    offset = 0
    while offset < len(raw):
      (length,) = struct.unpack("<Q", raw[offset : offset + 8])
      event = event_pb2.Event()
      event.ParseFromString(raw[offset + 12 : offset + 12 + length])
      events.append(event)
      offset += 12 + length + 4
  return events


def _run_values(logdir):
  values = [(event.step, value) for event in read_events(logdir) for value in event.summary.value]
  scalars = {(step, v.tag): v.simple_value for step, v in values if v.HasField("simple_value")}
  histograms = {(step, v.tag): v.histo for step, v in values if v.HasField("histo")}
  return scalars, histograms


def test_tensorboard_is_laid_out_as_keras_writes_it(idx_dir, tmp_path):
  history = train.train_and_evaluate(
    small_config(idx_dir, model="cnn_pool_bn"), tmp_path, print_fn=None
  )
  train_scalars, histograms = _run_values(tmp_path / "tensorboard" / "train")
  val_scalars, val_histograms = _run_values(tmp_path / "tensorboard" / "validation")
  # Train and val of a metric under one tag, in two runs: TensorBoard draws them on one chart.
  for record in history:
    epoch = record["epoch"]
    assert train_scalars[(epoch, "epoch_loss")] == pytest.approx(record["train_loss"], rel=1e-6)
    assert train_scalars[(epoch, "epoch_accuracy")] == pytest.approx(record["train_accuracy"])
    assert val_scalars[(epoch, "epoch_loss")] == pytest.approx(record["val_loss"], rel=1e-6)
    assert val_scalars[(epoch, "epoch_accuracy")] == pytest.approx(record["val_accuracy"])
    assert train_scalars[(epoch, "epoch_seconds")] == pytest.approx(record["seconds"], rel=1e-6)
  assert not val_histograms
  assert not {tag for _, tag in train_scalars} & {"parallel_seeds", "epoch_parallel_seeds"}
  assert "epoch_learning_rate" not in {tag for _, tag in train_scalars}  # Constant: not logged.
  # 6 kernels + 6 biases (conv, dense), 4 BatchNorm scales + 4 biases, and their moving
  # mean and variance, every epoch.
  expected_tags = {
    f"{layer}/{name}"
    for layer in ("conv2d", "conv2d_1", "dense", "dense_1", "dense_2")
    for name in ("kernel", "bias")
  }
  for suffix in ("", "_1", "_2", "_3"):
    expected_tags |= {f"batch_normalization{suffix}/{name}" for name in ("scale", "bias")}
    expected_tags |= {f"batch_normalization{suffix}/{name}" for name in ("mean", "var")}
  for epoch in (1, 2):
    assert {tag for step, tag in histograms if step == epoch} == expected_tags
  assert histograms[(1, "conv2d/kernel")].num == 3 * 3 * 1 * 8
  assert histograms[(2, "dense/kernel")].num == 400 * 128
  assert histograms[(1, "dense/kernel")].sum != histograms[(2, "dense/kernel")].sum  # Trained.
  mean = "batch_normalization/mean"
  assert histograms[(1, mean)].sum != histograms[(2, mean)].sum  # The moving statistics move.


def test_a_scheduled_learning_rate_is_logged_per_epoch_as_keras_does(idx_dir, tmp_path):
  config = small_config(idx_dir, lr_schedule="cosine", learning_rate=0.01, num_epochs=3)
  train.train_and_evaluate(config, tmp_path, print_fn=None)
  scalars, _ = _run_values(tmp_path / "tensorboard" / "train")
  steps_per_epoch = 5  # 300 images at batch 64.
  schedule = optim.make_schedule(config, steps_per_epoch)
  logged = [scalars[(epoch, "epoch_learning_rate")] for epoch in (1, 2, 3)]
  # The rate of each epoch's last step (the optimizer's count before its update).
  want = [float(schedule(epoch * steps_per_epoch - 1)) for epoch in (1, 2, 3)]
  assert logged == pytest.approx(want, rel=1e-6)
  assert logged[0] > logged[1] > logged[2] > 0  # Cosine decay to 0 at step 15.


def _agreement_and_top2(logits, labels):
  """A metric that must equal the built-in accuracy, and one that must not fall below it."""
  top2 = jnp.argsort(logits, axis=-1)[:, -2:]
  return {
    "agreement": jnp.argmax(logits, axis=-1) == labels,
    "top2": jnp.any(top2 == labels[:, None], axis=-1),
  }


def test_metrics_fn_and_per_step_losses_reach_history_and_tensorboard(idx_dir, tmp_path):
  config = small_config(idx_dir, model="cnn_pool_bn", log_every_steps=1)
  history = train.train_and_evaluate(
    config, tmp_path, print_fn=None, metrics_fn=_agreement_and_top2
  )
  train_scalars, _ = _run_values(tmp_path / "tensorboard" / "train")
  val_scalars, _ = _run_values(tmp_path / "tensorboard" / "validation")
  sizes = [64, 64, 64, 64, 44]  # 300 images at batch 64: the last step is padded and masked.
  for record in history:
    epoch = record["epoch"]
    for split, scalars in (("train", train_scalars), ("val", val_scalars)):
      # Counted over the real rows only, as the accuracy: equal to it, padding and all.
      assert record[f"{split}_agreement"] == record[f"{split}_accuracy"]
      assert 1.0 >= record[f"{split}_top2"] >= record[f"{split}_accuracy"]
      assert scalars[(epoch, "epoch_top2")] == pytest.approx(record[f"{split}_top2"], rel=1e-6)
    # Each step's mean loss, weighted by its real rows, is the epoch's train loss.
    first = (epoch - 1) * len(sizes)
    losses = [train_scalars[(first + index + 1, "batch_loss")] for index in range(len(sizes))]
    weighted = sum(loss * size for loss, size in zip(losses, sizes)) / sum(sizes)
    assert weighted == pytest.approx(record["train_loss"], rel=1e-5)
  logged_steps = sorted(step for step, tag in train_scalars if tag == "batch_loss")
  assert logged_steps == list(range(1, 11))


def test_a_bad_metrics_fn_is_named_before_anything_compiles(idx_dir, tmp_path):
  config = small_config(idx_dir, num_epochs=1)
  cases = {
    "expected a non-empty dict": lambda logits, labels: logits.sum(),
    r"metric 'mean' has shape \(\) for a batch of 2, expected \(2,\)": (
      lambda logits, labels: {"mean": logits.mean()}
    ),
    "metric name 'loss': expected an identifier other than": (
      lambda logits, labels: {"loss": labels}
    ),
    "metric name 'count': expected an identifier other than": (
      lambda logits, labels: {"count": labels}
    ),
  }
  for message, metrics_fn in cases.items():
    with pytest.raises(ConfigError, match=f"metrics_fn <lambda>: .*{message}"):
      train.train_and_evaluate(config, tmp_path / "bad", print_fn=None, metrics_fn=metrics_fn)
  with pytest.raises(TypeError, match="unexpected keyword argument 'metric_fn': expected data"):
    train.train_and_evaluate(config, tmp_path / "bad", metric_fn=_agreement_and_top2)


def test_format_epoch_line():
  record = {
    "epoch": 3,
    "train_loss": 0.25,
    "train_accuracy": 0.9,
    "val_loss": 0.125,
    "val_accuracy": 0.95,
    "seconds": 1.5,
    "images_per_second": 40000.0,
  }
  line = log.format_epoch(record, 20)
  assert line.startswith("epoch   3/20")
  assert "val_accuracy 0.9500" in line and "1.50 s" in line and "40,000 images/s" in line


class _Terminal(io.StringIO):
  def isatty(self):
    return True


def test_progress_bar_only_on_a_terminal_and_shows_running_metrics():
  assert not log.ProgressBar(10, enabled=True, stream=io.StringIO()).enabled
  assert not log.ProgressBar(10, enabled=False, stream=_Terminal()).enabled
  stream = _Terminal()
  bar = log.ProgressBar(10, enabled=True, stream=stream)
  bar.start(1, 20)
  bar.update(4, 2.0, 3, 4)
  bar.close()
  text = stream.getvalue()
  assert (
    "epoch 1/20" in text and "4/10" in text and "loss=0.5000" in text and "accuracy=0.7500" in text
  )


def test_live_progress_bar_is_driven_from_the_compiled_epoch(idx_dir, tmp_path, monkeypatch):
  terminal = _Terminal()
  monkeypatch.setattr("sys.stderr", terminal)
  history = train.train_and_evaluate(
    small_config(idx_dir, num_epochs=1, progress_bar=True), tmp_path, print_fn=None
  )
  text = terminal.getvalue()
  # 300 images at batch 64: 5 steps, the last of 44; the bar's last update shows the epoch's sums.
  assert "epoch 1/1" in text and "5/5" in text
  assert f"accuracy={history[0]['train_accuracy']:.4f}" in text
  assert f"loss={history[0]['train_loss']:.4f}" in text


def test_describe_hardware_names_the_cpu_or_the_accelerators():
  assert (
    log.describe_hardware({"platform": "cpu", "cpu": "Xeon", "cpu_count": 2})
    == "CPU: Xeon, 2 cores"
  )
  assert (
    log.describe_hardware({"platform": "gpu", "device_count": 8, "device_kind": "H200"})
    == "8 x H200"
  )
  environment = log.environment()
  assert environment["versions"]["flax_mnist"] and environment["platform"] == "cpu"
