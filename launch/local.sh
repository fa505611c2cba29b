#!/usr/bin/env bash
# Local set-up and runs. The first call creates .venv and installs jip2p with the pinned packages
# of launch/constraints.txt (again whenever pyproject.toml or the pins change); then it runs:
#
#   bash launch/local.sh demo [DIR]    the main job on the embedded default (jip2p-demo): write
#                                      the procedural edit world, train configs/synthetic.py on it,
#                                      edit held-out scenes, report (DIR/report.md, default demo/)
#   bash launch/local.sh test [ARGS]   the test suite: the PyTorch-side and the TensorFlow-side
#                                      tests in separate processes run at once (the two must
#                                      never share one), always both, then the tests marked
#                                      `alone` by themselves; a line each, and exit status 1 if
#                                      any failed
#   bash launch/local.sh CMD [ARGS]    any jip2p console script, e.g. jip2p-edit --help
set -euo pipefail
cd "$(dirname "$0")/.."
venv=${JIP2P_VENV:-.venv}
stamp="$venv/.jip2p-installed"
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ] || [ launch/constraints.txt -nt "$stamp" ]; then
  echo "jip2p: installing into $venv (first run: several minutes)" >&2
  python3 -m venv "$venv"
  "$venv/bin/python" -m pip install -q --upgrade pip
  "$venv/bin/python" -m pip install -q -c launch/constraints.txt -e ".[test]"
  touch "$stamp"
fi
export PATH="$PWD/$venv/bin:$PATH"
job=${1:-demo}
[ $# -gt 0 ] && shift
case "$job" in
  test)
    # The web editor's browser test drives Debian's Chromium through Playwright (no browser
    # download); install it once.
    if ! command -v chromium >/dev/null; then
      echo "jip2p: installing Debian's chromium for the browser test" >&2
      sudo_=""; [ "$(id -u)" -ne 0 ] && sudo_="sudo"
      $sudo_ apt-get update -qq && $sudo_ apt-get install -y -qq chromium >/dev/null
    fi
    # Each side is its own process, and both run whatever the first one does, at the same time
    # (on CI's 2 cores the suite takes about two thirds of the time it takes one side after the
    # other): the TensorFlow side's output is kept in a file and printed when it ends. pytest's
    # exit status 5 means no test of that side was selected (ARGS naming the other side's
    # files); it fails the command only when neither side ran a test. Tests marked `alone`
    # (the real-shape SDXL UNet parity: 11 GiB in a child process) need the machine's memory to
    # themselves and run last, after both sides.
    tf_log=$(mktemp)
    trap 'rm -f "$tf_log"' EXIT
    python -m pytest --side=tf "$@" >"$tf_log" 2>&1 &
    tf_pid=$!
    torch_status=0
    python -m pytest --side=torch "$@" || torch_status=$?
    tf_status=0
    wait "$tf_pid" || tf_status=$?
    echo "jip2p: the TensorFlow-side tests' output:" >&2
    cat "$tf_log"
    alone_status=0
    python -m pytest --side=torch -m alone "$@" || alone_status=$?
    report=""; failed=0; ran=0
    for side in PyTorch-side:$torch_status TensorFlow-side:$tf_status run-alone:$alone_status; do
      status=${side#*:}
      case $status in
        0) result="passed"; ran=1 ;;
        5) result="no tests selected" ;;
        *) result="FAILED (pytest exit status $status)"; failed=1; ran=1 ;;
      esac
      report+="jip2p: ${side%%:*} tests: $result"$'\n'
    done
    printf '%s' "$report" >&2
    [ "$failed" = 0 ] && [ "$ran" = 1 ] || exit 1
    ;;
  demo)
    exec jip2p-demo --out "${1:-demo}" "${@:2}"
    ;;
  *) exec "$job" "$@" ;;
esac
