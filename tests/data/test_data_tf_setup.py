"""TensorFlow reaches jip2p.data only through `import_tf`, which hides every GPU from it."""

import ast
import pathlib

import pytest

from jip2p.data.tf_setup import import_tf

pytestmark = pytest.mark.tf

DATA = pathlib.Path(__file__).resolve().parents[2] / "jip2p" / "data"


def test_tensorflow_sees_no_gpu():
  tf = import_tf()
  assert tf.config.get_visible_devices("GPU") == []
  assert import_tf() is tf


def test_no_data_module_imports_tensorflow_itself():
  for path in sorted(DATA.glob("*.py")):
    if path.name == "tf_setup.py":
      continue
    for node in ast.walk(ast.parse(path.read_text())):
      names = ([a.name for a in node.names] if isinstance(node, ast.Import)
               else [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
      assert not any(n == "tensorflow" or n.startswith("tensorflow.") for n in names), path.name
