"""launch/tpu_vm.sh run by bash with a stand-in for ``gcloud`` on PATH that records its calls and
plays two TPU workers: ``tpu-vm scp`` copies into each worker's home, ``tpu-vm ssh`` runs the
command there with bash (the worker's ``python3`` a stand-in that answers the version check as
the image's Python would), and a queued resource moves to its next state at each ``sleep``.

What is shown: the runtime version chosen by accelerator; queued resources (spot) waited for until
ACTIVE; ``setup`` on a Python 3.10 image installing Python 3.11 through uv (and the system Python
kept when it is 3.11); ``train`` appending to train.log and ``stop`` reaching the trainer itself;
``resume`` deleting a preempted slice (or queued resource) and creating it again before setup and
the same training command.
"""

from __future__ import annotations

import os
import pathlib
import signal
import stat
import subprocess
import sys
import time

import pytest

from tests.train.helpers import REPO

SCRIPT = REPO / "launch" / "tpu_vm.sh"

GCLOUD = r"""#!/usr/bin/env bash
# Records the call (an ssh's command left out), then plays the TPU API and the workers.
[ "$1 $2" = "compute tpus" ] || { echo "unexpected gcloud $*" >&2; exit 99; }
group=$3 verb=$4
shift 4
record="gcloud $group $verb"
command= workers=
for a in "$@"; do
  case $a in
    --command=*) command=${a#--command=} ;;
    *) record+=" $a"; case $a in --worker=*) workers=${a#--worker=} ;; esac ;;
  esac
done
echo "$record" >> "$CALLS"
case "$group $verb" in
  "queued-resources create") printf '%s\n' $QUEUE_STATES > "$STATE/queued" ;;
  "queued-resources describe")
    [ -f "$STATE/queued" ] || { echo "ERROR: NOT_FOUND" >&2; exit 1; }
    head -n 1 "$STATE/queued" ;;
  "queued-resources delete") rm -f "$STATE/queued" ;;
  "tpu-vm describe") echo READY ;;
  "tpu-vm scp") for w in "$WORKERS"/*; do cp "$1" "$w/${2#*:}"; done ;;
  "tpu-vm ssh")
    for w in "$WORKERS"/*; do
      [ "$workers" = all ] || [ "$(basename "$w")" = "$workers" ] || continue
      (cd "$w" && HOME="$w" PATH="$WORKER_PATH" bash -c "$command") || exit $?
    done ;;
esac
exit 0
"""

# Time passes only while the script sleeps: a queued resource takes its next state.
SLEEP = r"""#!/usr/bin/env bash
echo "sleep $*" >> "$CALLS"
[ -f "$STATE/queued" ] && [ "$(wc -l < "$STATE/queued")" -gt 1 ] && sed -i 1d "$STATE/queued"
exit 0
"""

# The image's python3: the version check is evaluated with $IMAGE_PYTHON in place of
# sys.version_info; `-m venv` and `-m pip install --user uv` make stand-ins of what they install.
PYTHON = r"""#!/usr/bin/env bash
echo "python3 $*" >> "$HOME/calls"
if [ "$1" = -c ]; then
  exec "$REAL_PYTHON" -c "${2//sys.version_info/($IMAGE_PYTHON)}"
fi
case "$1 $2 $3" in
  "-m venv .venv") mkdir -p .venv/bin && cp "$STANDINS/pip" "$STANDINS/jip2p-train" .venv/bin/ ;;
  "-m pip install") mkdir -p "$HOME/.local/bin" && cp "$STANDINS/uv" "$HOME/.local/bin/" ;;
  *) exit 98 ;;
esac
"""

UV = r"""#!/usr/bin/env bash
echo "uv $*" >> "$HOME/calls"
[ "$1" = venv ] && mkdir -p .venv/bin && cp "$STANDINS/jip2p-train" .venv/bin/
exit 0
"""

PIP = r"""#!/usr/bin/env bash
echo "pip $*" >> "$HOME/calls"
"""

# Runs until SIGTERM, on which it "saves" and exits 0, as jip2p-train does (and ends by itself
# after two minutes, should a test fail before stopping it).
TRAINER = r"""#!/usr/bin/env bash
echo "jip2p-train $* cache=$JAX_COMPILATION_CACHE_DIR"
trap 'echo "jip2p-train: SIGTERM, saved"; exit 0' TERM
while [ $SECONDS -lt 120 ]; do sleep 0.05; done
"""


def _executable(path: pathlib.Path, text: str) -> None:
  path.write_text(text)
  path.chmod(path.stat().st_mode | stat.S_IEXEC)


@pytest.fixture
def cloud(tmp_path):
  """Runs the script against the stand-ins; ``cloud.calls()`` are the recorded gcloud calls."""
  bin_dir, standins, state = tmp_path / "bin", tmp_path / "standins", tmp_path / "state"
  worker_bin, workers = tmp_path / "worker_bin", tmp_path / "workers"
  for d in (bin_dir, standins, state, worker_bin, workers / "0", workers / "1"):
    d.mkdir(parents=True)
  _executable(bin_dir / "gcloud", GCLOUD)
  _executable(bin_dir / "sleep", SLEEP)
  _executable(worker_bin / "python3", PYTHON)
  for name, text in (("uv", UV), ("pip", PIP), ("jip2p-train", TRAINER)):
    _executable(standins / name, text)
  real_path = os.environ["PATH"]
  env = {k: v for k, v in os.environ.items()
         if k not in ("SPOT", "JAX_COMPILATION_CACHE_DIR", "LIBTPU_INIT_ARGS")}
  env.update(PATH=f"{bin_dir}{os.pathsep}{real_path}", CALLS=str(tmp_path / "calls"),
             STATE=str(state), WORKERS=str(workers), STANDINS=str(standins),
             WORKER_PATH=f"{worker_bin}{os.pathsep}{real_path}", REAL_PYTHON=sys.executable,
             IMAGE_PYTHON="3, 10, 12", QUEUE_STATES="ACTIVE")

  class Cloud:
    root = tmp_path

    def run(self, *args: str, check: bool = True, **extra: str) -> subprocess.CompletedProcess:
      result = subprocess.run(["bash", str(SCRIPT), *args], env=dict(env, **extra),
                              capture_output=True, text=True, timeout=120)
      if check:
        assert result.returncode == 0, result.stdout + result.stderr
      return result

    def calls(self) -> list[str]:
      path = tmp_path / "calls"
      calls = path.read_text().splitlines() if path.exists() else []
      path.unlink(missing_ok=True)
      return calls

    def worker(self, w: int) -> pathlib.Path:
      return workers / str(w)

  yield Cloud()
  for w in (0, 1):  # a trainer stand-in still running
    pid = workers / str(w) / "jip2p" / "train.pid"
    if pid.exists():
      try:
        os.kill(int(pid.read_text()), signal.SIGKILL)
      except ProcessLookupError:
        pass


@pytest.mark.parametrize("accelerator, runtime", [
    ("v4-32", "tpu-ubuntu2204-base"), ("v5litepod-32", "v2-alpha-tpuv5-lite"),
    ("v5p-64", "v2-alpha-tpuv5"), ("v6e-16", "v2-alpha-tpuv6e")])
def test_the_runtime_follows_the_accelerator(cloud, accelerator, runtime):
  cloud.run("create", "ip2p", "zone-a", accelerator)
  assert cloud.calls() == [f"gcloud tpu-vm create ip2p --zone=zone-a "
                           f"--accelerator-type={accelerator} --version={runtime}"]
  cloud.run("queue", "ip2p", "zone-a", accelerator)
  assert cloud.calls()[0] == (f"gcloud queued-resources create ip2p --node-id=ip2p "
                              f"--zone=zone-a --accelerator-type={accelerator} "
                              f"--runtime-version={runtime}")


def test_a_runtime_given_wins_and_an_unknown_accelerator_is_refused(cloud):
  cloud.run("create", "ip2p", "zone-a", "v5p-64", "my-runtime", SPOT="1")
  assert cloud.calls() == ["gcloud tpu-vm create ip2p --zone=zone-a --accelerator-type=v5p-64 "
                           "--version=my-runtime --spot"]
  refused = cloud.run("create", "ip2p", "zone-a", "v3-8", check=False)
  assert refused.returncode == 2
  assert "no default runtime for accelerator v3-8: pass RUNTIME" in refused.stderr
  assert cloud.calls() == []


def test_a_spot_queued_resource_is_waited_for_until_active(cloud):
  cloud.run("queue", "ip2p", "zone-a", "v5litepod-32", SPOT="1",
            QUEUE_STATES="WAITING_FOR_RESOURCES PROVISIONING ACTIVE")
  calls = cloud.calls()
  assert calls[0] == ("gcloud queued-resources create ip2p --node-id=ip2p --zone=zone-a "
                      "--accelerator-type=v5litepod-32 --runtime-version=v2-alpha-tpuv5-lite "
                      "--spot")
  assert calls.count("sleep 60") == 2  # waited through two states
  assert cloud.run("status", "ip2p", "zone-a").stdout == "queued resource: ACTIVE\nREADY\n"

  failed = cloud.run("queue", "ip2p", "zone-a", "v5p-64", check=False,
                     QUEUE_STATES="WAITING_FOR_RESOURCES FAILED")
  assert failed.returncode == 1 and "queued resource FAILED" in failed.stderr


def _log(cloud, w: int) -> pathlib.Path:
  return cloud.worker(w) / "jip2p" / "train.log"


def _wait_for(path: pathlib.Path, text: str, count: int = 1) -> None:
  deadline = time.time() + 30
  while not (path.exists() and path.read_text().count(text) >= count):
    assert time.time() < deadline, f"{text!r} ×{count} never reached {path}"
    time.sleep(0.05)


def test_setup_brings_python_311_through_uv_and_train_appends_and_stop_reaches_it(cloud):
  cloud.run("setup", "ip2p", "zone-a")  # the image's Python is 3.10
  for w in (0, 1):
    home = cloud.worker(w)
    assert (home / "jip2p" / "launch" / "tpu_vm.sh").is_file()  # this checkout, copied
    assert (home / "calls").read_text().splitlines() == [
        "python3 -c import sys; sys.exit(sys.version_info < (3, 11))",
        "python3 -m pip install -q --user uv",
        "uv venv -q --python 3.11 .venv",
        "uv pip install -q --python .venv/bin/python -c launch/constraints.txt -e .[tpu]"]
  scp, ssh = cloud.calls()
  assert scp.startswith("gcloud tpu-vm scp ") and scp.endswith(
      ".tar.gz ip2p:jip2p.tar.gz --zone=zone-a --worker=all")
  assert ssh == "gcloud tpu-vm ssh ip2p --zone=zone-a --worker=all"

  cloud.run("train", "ip2p", "zone-a", "--config=configs/tiny.py", "--workdir=gs://b/run",
            JAX_COMPILATION_CACHE_DIR="gs://b/jax-cache")
  for w in (0, 1):
    _wait_for(_log(cloud, w), "jip2p-train --config=configs/tiny.py --workdir=gs://b/run "
                              "cache=gs://b/jax-cache")
  cloud.run("stop", "ip2p", "zone-a")
  for w in (0, 1):
    _wait_for(_log(cloud, w), "SIGTERM, saved")

  cloud.run("train", "ip2p", "zone-a", "--config=configs/tiny.py", "--workdir=gs://b/run")
  for w in (0, 1):  # the second start is appended; the cache defaults to the worker's home
    _wait_for(_log(cloud, w), "jip2p-train", count=3)
    text = _log(cloud, w).read_text()
    assert text.index("SIGTERM, saved") < text.index(f"cache={cloud.worker(w)}/.cache/jip2p-jax")
  cloud.run("stop", "ip2p", "zone-a")
  for w in (0, 1):
    _wait_for(_log(cloud, w), "SIGTERM, saved", count=2)


def test_setup_keeps_a_system_python_of_311(cloud):
  cloud.run("setup", "ip2p", "zone-a", IMAGE_PYTHON="3, 11, 9")
  assert (cloud.worker(0) / "calls").read_text().splitlines() == [
      "python3 -c import sys; sys.exit(sys.version_info < (3, 11))",
      "python3 -m venv .venv",
      "pip install -q --upgrade pip",
      "pip install -q -c launch/constraints.txt -e .[tpu]"]


@pytest.mark.parametrize("queued", [True, False])
def test_resume_deletes_and_recreates_a_preempted_slice(cloud, queued):
  if queued:
    cloud.run("queue", "ip2p", "zone-a", "v5p-64", SPOT="1")
    (cloud.root / "state" / "queued").write_text("SUSPENDED\n")  # preempted
  else:
    cloud.run("create", "ip2p", "zone-a", "v5p-64", SPOT="1")
  cloud.calls()
  cloud.run("resume", "ip2p", "zone-a", "v5p-64", "--config=configs/tiny.py",
            "--workdir=gs://b/run", SPOT="1")
  calls = [c for c in cloud.calls() if not c.startswith("gcloud queued-resources describe")]
  recreate = (["gcloud queued-resources delete ip2p --zone=zone-a --force --quiet",
               "gcloud queued-resources create ip2p --node-id=ip2p --zone=zone-a "
               "--accelerator-type=v5p-64 --runtime-version=v2-alpha-tpuv5 --spot"] if queued
              else ["gcloud tpu-vm delete ip2p --zone=zone-a --quiet",
                    "gcloud tpu-vm create ip2p --zone=zone-a --accelerator-type=v5p-64 "
                    "--version=v2-alpha-tpuv5 --spot"])
  assert calls[:2] == recreate
  assert [" ".join(c.split()[:3]) for c in calls[2:]] == [
      "gcloud tpu-vm scp", "gcloud tpu-vm ssh", "gcloud tpu-vm ssh"]  # setup, then train
  assert calls[-1] == "gcloud tpu-vm ssh ip2p --zone=zone-a --worker=all"
  for w in (0, 1):
    _wait_for(_log(cloud, w), "jip2p-train --config=configs/tiny.py --workdir=gs://b/run")
  cloud.run("stop", "ip2p", "zone-a")
  for w in (0, 1):
    _wait_for(_log(cloud, w), "SIGTERM, saved")
