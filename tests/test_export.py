"""Tests for flax_mnist.export and scripts/export.py: the exported model gives the checkpoint's
probabilities at any batch size, lowers for accelerators on CPU, and runs in a process where
flax and flax_mnist cannot be imported."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from conftest import make_digits, run_script, small_config

from flax_mnist import checkpoint, evaluation, export, models, train
from flax_mnist.errors import DatasetError

# Every layout computes the same function; the checkpoint's (s2d on CPU) and the export's (lax)
# sum in other orders: probabilities measured within 3e-7 of each other.
TOLERANCE = {"rtol": 1e-5, "atol": 2e-6}

# The README's loader, run where importing flax or flax_mnist fails.
LOADER = """
import sys, json
class Refuse:
  def find_spec(self, name, path=None, target=None):
    if name.split(".")[0] in ("flax", "flax_mnist"):
      raise ImportError(f"{name} is not allowed here")
sys.meta_path.insert(0, Refuse())
import numpy as np
from jax import export
with open(sys.argv[1], "rb") as file:
  exported = export.deserialize(bytearray(file.read()))
probabilities = np.asarray(exported.call(np.load(sys.argv[2])))
try:
  import flax
except ImportError:
  print(json.dumps(probabilities.tolist()))
"""


def test_the_exported_model_is_the_model_at_any_batch_size_and_lowers_for_accelerators(tmp_path):
  model = models.init_model("cnn_pool_bn", 0, impl="lax", dropout_rng_impl="threefry2x32")
  exported = export.export_model(model, (28, 28, 1), ("cpu", "cuda", "tpu"))
  assert exported.platforms == ("cpu", "cuda", "tpu")
  restored = export.load_exported(export.save(exported, tmp_path / "model.jaxexport"))
  images = make_digits(5, seed=2)[0][..., None]
  want = evaluation.predict_probabilities(model, images)
  for count in (1, 5):
    got = export.predict_exported(restored, images[:count])
    np.testing.assert_allclose(got, want[:count], **TOLERANCE)
  with pytest.raises(
    DatasetError, match=r"images of shape \(5, 28, 28\): .*takes \(N, 28, 28, 1\)"
  ):
    export.predict_exported(exported, images[..., 0])
  with pytest.raises(ValueError, match="expected some of cpu, cuda, rocm, tpu"):
    export.export_model(model, (28, 28, 1), ("gpu",))


def test_a_file_that_is_not_an_export_is_one_line(tmp_path):
  (tmp_path / "junk.jaxexport").write_bytes(b"not a flatbuffer at all")
  with pytest.raises(DatasetError, match="junk.jaxexport: not a jax.export file"):
    export.load_exported(tmp_path / "junk.jaxexport")


@pytest.mark.integration
def test_an_exported_workdir_predicts_without_flax_as_its_checkpoint_does(idx_dir, tmp_path):
  workdir = tmp_path / "run"
  config = small_config(idx_dir, model="cnn_pool_bn", num_epochs=1)
  train.train_and_evaluate(config, workdir, print_fn=None)
  out = tmp_path / "model.jaxexport"
  result = run_script("export.py", "--workdir", str(workdir), "--out", str(out))
  assert result.returncode == 0, result.stderr[-3000:]
  assert "for cpu" in result.stdout and out.is_file()
  images = make_digits(7, seed=3)[0][..., None]
  np.save(tmp_path / "batch.npy", images)
  model, _ = checkpoint.load_model(workdir)
  want = evaluation.predict_probabilities(model, images)
  # Where flax and flax_mnist cannot be imported: jax and numpy alone.
  loaded = subprocess.run(
    [sys.executable, "-c", LOADER, str(out), str(tmp_path / "batch.npy")],
    capture_output=True,
    text=True,
  )
  assert loaded.returncode == 0, loaded.stderr[-3000:]
  np.testing.assert_allclose(np.array(json.loads(loaded.stdout)), want, **TOLERANCE)
  predicted = run_script(
    "evaluate.py", "--exported", str(out), "--predict", str(tmp_path / "batch.npy"), "--json"
  )
  assert predicted.returncode == 0, predicted.stderr[-3000:]
  assert json.loads(predicted.stdout)["predicted"] == want.argmax(axis=1).tolist()
  # The checkpoint predicts the same batch through evaluate.py too; an existing --out is kept.
  from_checkpoint = run_script(
    "evaluate.py", "--workdir", str(workdir), "--predict", str(tmp_path / "batch.npy"), "--json"
  )
  assert json.loads(from_checkpoint.stdout)["predicted"] == want.argmax(axis=1).tolist()
  again = run_script("export.py", "--workdir", str(workdir), "--out", str(out))
  assert again.returncode == 2 and again.stderr.startswith(f"error: {out}: exists, not overwritten")


# The ONNX export needs the onnx extra (jax2onnx pins orbax-checkpoint and jax apart from the main
# stack): CI installs it in a stage of its own and sets FLAX_MNIST_ONNX=1 there, where a missing
# jax2onnx fails instead of skipping.
def _onnxruntime():
  if os.environ.get("FLAX_MNIST_ONNX") != "1":
    pytest.importorskip("jax2onnx", reason="the onnx extra (CI's onnx stage runs this)")
  import onnxruntime

  return onnxruntime


@pytest.mark.parametrize("name", [*models.model_names(), "speedrun_net"])
def test_every_model_exports_to_onnx_with_the_same_probabilities(name, tmp_path):
  onnxruntime = _onnxruntime()
  from flax import nnx

  from flax_mnist import speedrun

  if name == "speedrun_net":
    model = speedrun.speedrun_net(rngs=nnx.Rngs(0), impl="lax", batch_norm=True)
  else:
    model = models.create_model(name, rngs=nnx.Rngs(0), impl="lax")
  path = export.save_onnx(export.export_onnx(model, (28, 28, 1)), tmp_path / "model.onnx")
  session = onnxruntime.InferenceSession(str(path))
  [inputs] = session.get_inputs()
  images = make_digits(6, seed=4)[0][..., None]
  want = evaluation.predict_probabilities(model, images)
  for count in (1, 6):  # The batch dimension is symbolic.
    [got] = session.run(None, {inputs.name: images[:count]})
    np.testing.assert_allclose(got, want[:count], **TOLERANCE)


@pytest.mark.integration
def test_a_workdir_exports_to_onnx_through_the_script(idx_dir, tmp_path):
  onnxruntime = _onnxruntime()
  workdir = tmp_path / "run"
  train.train_and_evaluate(small_config(idx_dir, model="cnn", num_epochs=1), workdir, print_fn=None)
  out = tmp_path / "model.onnx"
  result = run_script("export.py", "--workdir", str(workdir), "--out", str(out), "--format=onnx")
  assert result.returncode == 0, result.stderr[-3000:]
  assert "as ONNX" in result.stdout
  images = make_digits(5, seed=5)[0][..., None]
  model, _ = checkpoint.load_model(workdir)
  session = onnxruntime.InferenceSession(str(out))
  [got] = session.run(None, {session.get_inputs()[0].name: images})
  np.testing.assert_allclose(got, evaluation.predict_probabilities(model, images), **TOLERANCE)


def test_onnx_without_jax2onnx_is_one_line(monkeypatch):
  monkeypatch.setitem(sys.modules, "jax2onnx", None)  # An import of it now fails.
  from flax import nnx

  model = models.create_model("mlp", rngs=nnx.Rngs(0), impl="lax")
  with pytest.raises(export.ExportError, match=r"needs jax2onnx: pip install -e '\.\[onnx\]'"):
    export.export_onnx(model, (28, 28, 1))
