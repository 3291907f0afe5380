"""notebooks/colab_tpu.ipynb: committed without outputs, and executed headless top to bottom
(nbclient, an ipykernel in its own process) on 4 forced CPU devices with small settings."""

from __future__ import annotations

import importlib.metadata
import json
import os
import re
import subprocess
import sys
import types

import nbformat
import pytest
from conftest import REPO_ROOT
from nbclient import NotebookClient

NOTEBOOK = REPO_ROOT / "notebooks" / "colab_tpu.ipynb"


def _read():
  return nbformat.read(NOTEBOOK, as_version=4)


def test_the_committed_notebook_has_no_outputs_and_one_parameters_cell():
  notebook = _read()
  nbformat.validate(notebook)
  code = [cell for cell in notebook.cells if cell.cell_type == "code"]
  assert all(cell.outputs == [] and cell.execution_count is None for cell in code)
  tagged = [cell for cell in code if "parameters" in cell.metadata.get("tags", [])]
  assert tagged == code[:1]
  assert "REPO_URL = " in tagged[0].source


def _install_cell() -> str:
  [install] = [cell for cell in _read().cells if "pip" in cell.source and cell.cell_type == "code"]
  return install.source


def test_the_install_cell_does_nothing_outside_colab(monkeypatch):
  monkeypatch.setattr(subprocess, "run", lambda *args, **kwargs: pytest.fail("pip ran"))
  exec(_install_cell(), {"REPO_URL": "https://github.com/example/flax_mnist"})


def test_in_colab_the_install_cell_keeps_the_installed_jax(monkeypatch, tmp_path):
  calls = []
  monkeypatch.setitem(sys.modules, "google.colab", types.ModuleType("google.colab"))
  monkeypatch.setattr(subprocess, "run", lambda command, **kwargs: calls.append(command))
  monkeypatch.setenv("TMPDIR", str(tmp_path))
  monkeypatch.setattr("tempfile.tempdir", None)  # Re-read from TMPDIR.
  exec(_install_cell(), {"REPO_URL": "https://github.com/example/flax_mnist"})
  constraints = tmp_path / "jax_constraints.txt"
  assert calls == [
    [sys.executable, "-m", "pip", "install", "-q", "-c", str(constraints)]
    + ["git+https://github.com/example/flax_mnist"]
  ]
  pins = constraints.read_text().split()
  for package in ("jax", "jaxlib"):
    assert f"{package}=={importlib.metadata.version(package)}" in pins


def _text(cell) -> str:
  return "".join(
    output.get("text", "") if output.output_type == "stream" else "" for output in cell.outputs
  )


@pytest.mark.integration
def test_the_notebook_trains_on_four_devices_and_restores_the_best_checkpoint(
  real_data_dir, tmp_path
):
  workdir = tmp_path / "run"
  env = {key: value for key, value in os.environ.items() if key not in ("XLA_FLAGS",)}
  env.update(
    XLA_FLAGS="--xla_force_host_platform_device_count=4",
    FLAX_MNIST_DATA_DIR=str(real_data_dir),
    FLAX_MNIST_NOTEBOOK_EPOCHS="1",
    FLAX_MNIST_NOTEBOOK_BATCH_SIZE="512",
    FLAX_MNIST_NOTEBOOK_WORKDIR=str(workdir),
    MPLBACKEND="module://matplotlib_inline.backend_inline",
  )
  notebook = _read()
  client = NotebookClient(
    notebook,
    timeout=600,
    kernel_name="python3",
    # Runs in the notebook's folder, as Jupyter and Colab do (nbclient's default: the caller's).
    resources={"metadata": {"path": str(NOTEBOOK.parent)}},
  )
  client.execute(env=env)
  code = [cell for cell in notebook.cells if cell.cell_type == "code"]
  errors = [output for cell in code for output in cell.outputs if output.output_type == "error"]
  assert not errors, errors
  text = "\n".join(_text(cell) for cell in code)

  assert re.search(r"backend cpu, 4 device\(s\):", text), text
  # One line per device, as str(device) names it: "cpu:0" at jax 0.10.2, "TFRT_CPU_0" at jax
  # 0.7.2 (the floor stack, .ci/floor-constraints.txt).
  device_ids = re.findall(r"^  (?:cpu:|TFRT_CPU_)(\d+)$", text, re.MULTILINE)
  assert device_ids == [str(index) for index in range(4)], text
  assert "mesh: {'seed': 1, 'data': 4}" in text
  assert 'Model: "cnn_pool"' in text and text.count('Model: "cnn_pool"') == 1
  assert "Total params: 57,034" in text
  assert "epochs: 1, devices: 4, mesh: {'seed': 1, 'data': 4}" in text

  run = json.loads((workdir / "run.json").read_text())
  assert run["mesh"] == {"seed": 1, "data": 4} and run["device_count"] == 4
  history = json.loads((workdir / "history.json").read_text())
  assert [record["epoch"] for record in history] == [1]
  assert history[0]["val_accuracy"] > 0.9
  best = f"best checkpoint: epoch 1, recorded val_accuracy {history[0]['val_accuracy']:.4f}"
  assert best in text and "same accuracy as recorded: True" in text
  predicted = re.search(r"^predicted: (\[.*\])$", text, re.MULTILINE)
  true = re.search(r"^true:      (\[.*\])$", text, re.MULTILINE)
  assert predicted and true and len(json.loads(predicted.group(1))) == 10
  # Two figures: the curves and the predicted digits.
  images = [
    output for cell in code for output in cell.outputs if "image/png" in output.get("data", {})
  ]
  assert len(images) == 2
