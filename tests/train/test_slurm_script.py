"""launch/slurm_gpu.sbatch run by bash with stand-ins for ``srun`` and ``scontrol`` on PATH that
record their calls: the time-limit signal (USR1) makes the real jip2p-train save and exit, and
then the job is requeued; a finished or failed run is not.

The ``srun`` stand-in runs its command as task 0 of one and, like srun, passes SIGTERM on to it.
"""

from __future__ import annotations

import os
import pathlib
import signal
import stat
import subprocess
import sys

from jip2p.train import checkpointing
from tests.train.helpers import REPO, free_port, trainer_env, wait_for_step

SCRIPT = REPO / "launch" / "slurm_gpu.sbatch"

SRUN = """#!/usr/bin/env bash
echo "srun $* SRUN_CPUS_PER_TASK=$SRUN_CPUS_PER_TASK" >> "$CALLS"
while [[ $1 == --* ]]; do shift; done
SLURM_PROCID=0 "$@" &
task=$!
trap 'echo "srun: SIGTERM to the task" >> "$CALLS"; kill -TERM $task' TERM
status=0
wait $task || status=$?
while kill -0 $task 2>/dev/null; do status=0; wait $task || status=$?; done
echo "srun: task exited $status" >> "$CALLS"
exit $status
"""

SCONTROL = """#!/usr/bin/env bash
echo "scontrol $*" >> "$CALLS"
[ "$1 $2" = "show hostnames" ] && echo 127.0.0.1
exit 0
"""

# Records the process id it was given and its arguments, then exits with $FAKE_STATUS.
FAKE_TRAINER = """#!/usr/bin/env bash
echo "jip2p-train JAX_PROCESS_ID=$JAX_PROCESS_ID JAX_NUM_PROCESSES=$JAX_NUM_PROCESSES" \
  "JAX_LOCAL_DEVICE_IDS=$JAX_LOCAL_DEVICE_IDS $*" >> "$CALLS"
exit "$FAKE_STATUS"
"""


def _executable(path: pathlib.Path, text: str) -> None:
  path.write_text(text)
  path.chmod(path.stat().st_mode | stat.S_IEXEC)


def _job(tmp_path: pathlib.Path, trainer: str, env: dict[str, str]) -> dict[str, str]:
  """Stand-ins on PATH, ``$VENV/bin/jip2p-train`` = ``trainer``; the environment of the job."""
  bin_dir, venv_bin = tmp_path / "bin", tmp_path / "venv" / "bin"
  bin_dir.mkdir()
  venv_bin.mkdir(parents=True)
  _executable(bin_dir / "srun", SRUN)
  _executable(bin_dir / "scontrol", SCONTROL)
  _executable(venv_bin / "jip2p-train", trainer)
  return dict(env, PATH=f"{bin_dir}{os.pathsep}{env['PATH']}", VENV=str(tmp_path / "venv"),
              CALLS=str(tmp_path / "calls"), SLURM_JOB_ID="4242", SLURM_JOB_NODELIST="node1",
              SLURM_NNODES="1", SLURM_CPUS_PER_TASK="2", SLURM_GPUS_ON_NODE="1",
              COORDINATOR_PORT=str(free_port()))


def _calls(tmp_path: pathlib.Path) -> list[str]:
  return (tmp_path / "calls").read_text().splitlines()


def test_time_limit_signal_saves_then_requeues(micro_folder, compile_cache, tmp_path):
  workdir = str(tmp_path / "run")
  trainer = f"#!/usr/bin/env bash\nexec {sys.executable} -m jip2p.cli.train \"$@\"\n"
  env = _job(tmp_path, trainer, trainer_env(2, compile_cache))
  env["CONFIG"] = f"{REPO}/configs/tiny.py:steps=1000,batch=4,init={micro_folder}"
  env["WORKDIR"] = workdir
  job = subprocess.Popen(
      ["bash", str(SCRIPT), "--config.log_every_steps=1", "--config.checkpoint.every_steps=1000",
       "--config.eval.every_steps=0", "--config.export.at_end="],
      env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  wait_for_step(workdir, 2, job)
  job.send_signal(signal.SIGUSR1)  # SLURM's --signal=B:USR1@300, to the batch shell
  out, err = job.communicate(timeout=300)
  assert job.returncode == 0, err[-3000:]
  saved = checkpointing.Checkpointer(workdir, read_only=True).latest_step()
  assert f"preempted: saved step {saved}" in out and 2 <= saved < 1000
  calls = _calls(tmp_path)
  assert calls[0] == "scontrol show hostnames node1"
  assert calls[1].startswith("srun --kill-on-bad-exit=1 bash -c") and calls[1].endswith(
      "SRUN_CPUS_PER_TASK=2")
  assert calls[2:] == ["srun: SIGTERM to the task", "srun: task exited 0",
                       "scontrol requeue 4242"]
  assert "time limit near: saving, then requeueing job 4242" in err


def test_finished_or_failed_runs_are_not_requeued(tmp_path):
  env = _job(tmp_path, FAKE_TRAINER, dict(os.environ))
  env.update(CONFIG="configs/tiny.py", WORKDIR=str(tmp_path / "run"), FAKE_STATUS="0",
             SLURM_GPUS_ON_NODE="4")
  done = subprocess.run(["bash", str(SCRIPT), "--config.seed=3"], env=env, capture_output=True,
                        text=True, timeout=60)
  assert done.returncode == 0, done.stderr
  calls = _calls(tmp_path)
  # One task per node drives every GPU of its node.
  assert calls[2] == (f"jip2p-train JAX_PROCESS_ID=0 JAX_NUM_PROCESSES=1 "
                      f"JAX_LOCAL_DEVICE_IDS=0,1,2,3 --config=configs/tiny.py "
                      f"--workdir={tmp_path}/run --config.seed=3")
  assert calls[3:] == ["srun: task exited 0"]

  (tmp_path / "calls").unlink()
  env["FAKE_STATUS"] = "2"
  failed = subprocess.run(["bash", str(SCRIPT)], env=env, capture_output=True, text=True,
                          timeout=60)
  assert failed.returncode == 2
  assert not [c for c in _calls(tmp_path) if "requeue" in c]


def test_the_job_asks_for_the_notice_requeue_and_one_log():
  """The #SBATCH lines the requeue path relies on: USR1 to the batch shell before the limit,
  requeueable, and each start's output appended to the same file."""
  directives = [line.split(None, 1)[1] for line in SCRIPT.read_text().splitlines()
                if line.startswith("#SBATCH ")]
  assert {"--signal=B:USR1@300", "--requeue", "--open-mode=append",
          "--ntasks-per-node=1"} <= set(directives)
