"""Every config opens with its command and its expected result, and says what is not yet known.

Read as text (no config is imported): a header must show an indented console command that
names the config itself, then an "Expect:" paragraph; the SD training configs must also say what
is known and what has not been measured yet."""

import ast
import pathlib
import re

import pytest

CONFIGS = sorted((pathlib.Path(__file__).resolve().parents[1] / "configs").glob("*.py"))


def header(path):
  return ast.get_docstring(ast.parse(path.read_text())) or ""


def test_there_are_configs():
  assert len(CONFIGS) >= 6


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_header_gives_command_and_expected_result(path):
  text = header(path)
  commands = re.findall(r"^  (jip2p-[a-z-]+ .*)$", text, re.M)
  assert any(f"configs/{path.name}" in c for c in commands), (path.name, commands)
  assert re.search(r"^Expect: \S", text, re.M), path.name


@pytest.mark.parametrize("path", [p for p in CONFIGS if p.name.startswith("ip2p_")],
                         ids=lambda p: p.name)
def test_sd_training_configs_mark_what_is_not_measured(path):
  text = header(path)
  assert re.search(r"^Known: ", text, re.M) and re.search(r"^Not yet measured", text, re.M)
  assert "25.5 h on 8× A100-40GB" in text  # the paper's time
  assert re.search(r"\d+\.\d GB", text)  # the train state
