"""The house rules on imports, checked by reading the sources (and one fresh interpreter)."""

from __future__ import annotations

import ast
import subprocess
import sys

import pytest
from conftest import REPO_ROOT

PACKAGE = REPO_ROOT / "src" / "flax_mnist"
# module -> modules of the package it must never import (directly).
FORBIDDEN = {
  "checkpoint": {"train"},
  "log": {"models", "layers"},
  "models": {"train", "data", "checkpoint", "config"},
  "layers": {"train", "data", "checkpoint", "config", "models"},
  "data": {"models", "checkpoint", "train"},
  "config": {"train", "checkpoint", "steps"},
  "steps": {"train", "checkpoint", "workdir", "log"},
  "seed_run": {"train", "programs"},
  "programs": {"train", "seed_run", "checkpoint"},
  "sharding": {"train", "checkpoint", "models"},
  "history": {"train", "checkpoint", "models"},
  "workdir": {"train", "checkpoint", "models"},
  "study.stats": {"train", "checkpoint"},
  "study.render": {"train", "checkpoint"},
}


def _imports(path) -> set[str]:
  """Every module a file imports, dotted (``flax_mnist.x`` for ``from flax_mnist import x``)."""
  names = set()
  for node in ast.walk(ast.parse(path.read_text())):
    if isinstance(node, ast.Import):
      names |= {alias.name for alias in node.names}
    elif isinstance(node, ast.ImportFrom) and node.module:
      names.add(node.module)
      names |= {f"{node.module}.{alias.name}" for alias in node.names}
  return names


def _library_modules() -> dict[str, set[str]]:
  return {
    ".".join(path.relative_to(PACKAGE).with_suffix("").parts): _imports(path)
    for path in PACKAGE.rglob("*.py")
  }


@pytest.mark.parametrize("module", sorted(FORBIDDEN))
def test_a_module_never_imports_what_sits_above_it(module):
  imported = _library_modules()[module]
  for forbidden in FORBIDDEN[module]:
    assert f"flax_mnist.{forbidden}" not in imported, f"{module} imports {forbidden}"


def test_no_library_module_reads_flags():
  for module, imported in _library_modules().items():
    assert not {"absl.flags", "absl.app", "ml_collections.config_flags"} & imported, module
    assert not any(name.startswith("absl.flags") for name in imported), module


def test_reading_a_config_file_does_not_load_the_training_stack():
  # (optax is not on the list: flax imports it itself.)
  code = (
    "import sys; from flax_mnist.config import load_config_file; "
    f"load_config_file({str(REPO_ROOT / 'configs' / 'cnn.py')!r}); "
    "print(sorted(m for m in ('orbax', 'tensorboardX', 'flax_mnist.train', "
    "'flax_mnist.checkpoint') if m in sys.modules))"
  )
  result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
  assert result.stdout.strip() == "[]"
