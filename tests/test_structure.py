"""The house rules on imports, and the modules the docs name, checked by reading the sources (and
one fresh interpreter)."""

from __future__ import annotations

import ast
import importlib
import io
import re
import subprocess
import sys
import tokenize

import pytest
from conftest import REPO_ROOT

PACKAGE = REPO_ROOT / "src" / "flax_mnist"
# Where docstrings and comments may name a module of the package (``flax_mnist.<name>``).
DOCUMENTED = ("src", "scripts", "tests")
NAMED = re.compile(r"\bflax_mnist((?:\.[A-Za-z_]\w*)+)")
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
  """Every module a file imports, dotted (``flax_mnist.<m>`` for ``from flax_mnist import <m>``)."""
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


@pytest.mark.integration
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


def _docstrings_and_comments(path) -> list[tuple[int, str]]:
  """(line, text) of every docstring and comment of a file, read as text (nothing imported):
  Python's docstrings and ``#`` comments; a shell script's ``#`` lines."""
  text = path.read_text()
  if path.suffix != ".py":
    return [(n, line) for n, line in enumerate(text.splitlines(), 1) if line.lstrip()[:1] == "#"]
  found = [
    (token.start[0], token.string)
    for token in tokenize.generate_tokens(io.StringIO(text).readline)
    if token.type == tokenize.COMMENT
  ]
  documented = (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)
  for node in ast.walk(ast.parse(text)):
    if isinstance(node, documented) and ast.get_docstring(node, clean=False) is not None:
      found.append((node.body[0].lineno, ast.get_docstring(node, clean=False)))
  return found


def _exists(dotted: str) -> bool:
  """Whether ``flax_mnist.<dotted>`` is a module of the package or an attribute of one."""
  found = importlib.import_module("flax_mnist")
  for index, part in enumerate(dotted.split(".")):
    if hasattr(found, part):
      found = getattr(found, part)
      continue
    name = ".".join(["flax_mnist", *dotted.split(".")[: index + 1]])
    if not hasattr(found, "__path__"):  # Not a package: no submodule to import.
      return False
    try:
      found = importlib.import_module(name)
    except ModuleNotFoundError as error:
      if error.name != name:
        raise
      return False
  return True


def test_every_module_a_docstring_or_comment_names_exists():
  named = {}  # "<dotted>" -> the places that name it
  for directory in DOCUMENTED:
    for path in sorted((REPO_ROOT / directory).rglob("*")):
      if path.suffix not in (".py", ".sh", ".sbatch") or not path.is_file():
        continue
      for line, text in _docstrings_and_comments(path):
        for match in NAMED.finditer(text):
          place = f"{path.relative_to(REPO_ROOT)}:{line}"
          named.setdefault(match.group(1)[1:], []).append(place)
  assert len(named) > 10, sorted(named)  # The scan reads what it should.
  missing = {dotted: places for dotted, places in named.items() if not _exists(dotted)}
  assert not missing, "no such module or attribute: " + "; ".join(
    f"flax_mnist.{dotted} (named in {', '.join(places)})" for dotted, places in missing.items()
  )
