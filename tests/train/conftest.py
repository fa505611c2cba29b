"""Fixtures of the training tests (helpers in helpers.py)."""

from __future__ import annotations

import pytest

from tests.train.helpers import write_micro_folder


@pytest.fixture(scope="session")
def micro_folder(tmp_path_factory) -> str:
  return write_micro_folder(str(tmp_path_factory.mktemp("micro") / "model"))


@pytest.fixture(scope="session")
def compile_cache(tmp_path_factory) -> str:
  return str(tmp_path_factory.mktemp("jax_cache"))
