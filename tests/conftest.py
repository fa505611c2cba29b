"""Test-wide setup: 8 fake CPU devices (sharding tests), and the TF/torch process boundary.

TensorFlow and PyTorch segfault when imported into one process, so the suite runs as two pytest
processes: ``--side=torch`` (everything else) and ``--side=tf`` (modules that declare
``pytestmark = pytest.mark.tf``). A module of the other side is not even collected — collecting
imports it.
"""

import os
import pathlib
import sys

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest  # noqa: E402

TF_MARK = "pytestmark = pytest.mark.tf"


def pytest_addoption(parser):
  parser.addoption("--side", choices=("torch", "tf", "all"), default="all",
                   help="torch: modules without the tf mark; tf: only those; all: both (only safe "
                        "when the selection stays on one side)")


def pytest_configure(config):
  config.addinivalue_line("markers", "tf: imports TensorFlow; runs in the TensorFlow-side process")
  config.addinivalue_line("markers", "alone: needs the machine's memory to itself; deselected by "
                          "default, run with -m alone (the test command runs it after both sides)")


def pytest_ignore_collect(collection_path: pathlib.Path, config):
  side = config.getoption("--side")
  if side == "all" or collection_path.suffix != ".py" or not collection_path.name.startswith("test"):
    return None
  is_tf = TF_MARK in collection_path.read_text()
  return (side == "tf") != is_tf


@pytest.fixture(autouse=True)
def _tf_and_torch_never_meet():
  """Fail the test that brings both TensorFlow and PyTorch into one process."""
  yield
  both = "tensorflow" in sys.modules and "torch" in sys.modules
  assert not both, "TensorFlow and PyTorch were both imported in one test process"
