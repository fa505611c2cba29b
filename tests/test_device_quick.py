"""`bench/device_quick.sh --dry-run` on the CPU, as on the GPU machine: the wheels it carries are
installed with --no-deps into a fresh folder and used from there, TensorFlow cannot be imported,
and the run stops at its total time, leaving a table and JSON of what finished.

The wheels are packed here from this environment's installed copies of the pinned packages (no
network in tests); on the GPU machine they come from `pip download` (bench/device_wheels.txt).
"""

import importlib.metadata as md
import json
import os
import pathlib
import re
import subprocess
import sys
import time
import zipfile

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
SECONDS = 100
CASES = ["train_unet_32_b2", "train_full_32_b2", "edit_64_s2_b1", "train_full_64_b2",
         "p2p_64_s2_k1"]


def _pins() -> dict[str, str]:
  lines = (REPO / "bench" / "device_wheels.txt").read_text().splitlines()
  pins = [line.split("#")[0].strip() for line in lines]
  return dict(pin.split("==") for pin in pins if pin)


def _pack(dist_name: str, folder: pathlib.Path) -> None:
  """The installed distribution as a wheel of its files (scripts and caches left out)."""
  dist = md.distribution(dist_name)
  root = pathlib.Path(dist.locate_file(""))
  name = re.sub(r"[-_.]+", "_", dist.metadata["Name"])
  with zipfile.ZipFile(folder / f"{name}-{dist.version}-py3-none-any.whl", "w") as z:
    for f in dist.files:
      if f.parts[0] != ".." and "__pycache__" not in f.parts:
        z.write(root / f, f.as_posix())


def test_pins_are_the_constraints():
  constraints = dict(line.split("==") for line in
                     (REPO / "launch" / "constraints.txt").read_text().splitlines()
                     if "==" in line and not line.startswith("#"))
  pins = _pins()
  assert {"diffusers", "ftfy", "open_clip_torch", "flax"} <= set(pins)
  assert all(constraints[name] == version for name, version in pins.items())


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
  tmp = tmp_path_factory.mktemp("quick")
  wheels, shim, out = tmp / "wheels", tmp / "shim" / "tensorflow", tmp / "out"
  wheels.mkdir()
  for name, version in _pins().items():
    assert md.version(name) == version
    _pack(name, wheels)
  shim.mkdir(parents=True)  # The GPU machine has no TensorFlow: importing it must fail.
  (shim / "__init__.py").write_text('raise ImportError("no TensorFlow here (test shim)")\n')
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  env.update(PYTHON=sys.executable, JIP2P_WHEELS=str(wheels), PYTHONPATH=str(shim.parent),
             TMPDIR=str(tmp))
  start = time.monotonic()
  done = subprocess.run(["bash", "bench/device_quick.sh", "--dry-run", "--seconds", str(SECONDS),
                         str(out)], capture_output=True, text=True, timeout=SECONDS + 120,
                        env=env, cwd=REPO)
  return done, time.monotonic() - start, out, tmp


def test_stops_at_its_total_time(dry_run):
  done, seconds, _, tmp = dry_run
  assert done.returncode == 0, done.stderr[-3000:]
  assert seconds < SECONDS + 10
  assert not list(tmp.glob("jip2p-quick-site.*"))  # the fresh folder is removed


def test_carried_wheels_are_used_from_a_fresh_folder(dry_run):
  _, _, out, tmp = dry_run
  setup = dict(re.findall(r"^(\w+): (.*)$", (out / "setup.txt").read_text(), re.M))
  for module in ("diffusers", "ftfy", "wcwidth", "open_clip", "flax"):
    assert setup[module].split()[1] == "carried"
    assert f"{tmp}/jip2p-quick-site." in setup[module]
  for module in ("jax", "torch", "transformers"):
    assert setup[module].split()[1] == "installed"
  assert "(test shim)" in (tmp / "shim" / "tensorflow" / "__init__.py").read_text()
  assert str(tmp / "shim") in setup["tensorflow"]


def test_every_row_has_figures_or_ran_out_of_time(dry_run):
  """Cases in order, JAX then PyTorch eager; a process either finished with figures or was cut
  off by its own or the total time (never failed otherwise, e.g. for a missing import)."""
  done, _, out, _ = dry_run
  doc = json.loads((out / "quick.json").read_text())
  rows = [(r["case"], r["side"]) for r in doc["records"]]
  expected = [(c, side) for c in CASES for side in ("jax", "torch")
              if not (c.startswith("p2p") and side == "torch")]
  assert rows == expected
  for r in doc["records"]:
    if "error" in r:
      assert r.get("not_run") or r["error"].startswith("timed out after"), r
    else:
      assert r["iters"] == 1 and r["time_s"] > 0 and r["items_per_s"] > 0, r
  md_text = (out / "quick.md").read_text()
  assert md_text.strip() in done.stdout
  for r in doc["records"]:
    assert f"| {r['case']} | {'JAX' if r['side'] == 'jax' else 'PyTorch'}" in md_text
  assert "-m jip2p.bench.jax_side --case train_unet_32_b2" in (out / "log.txt").read_text()
