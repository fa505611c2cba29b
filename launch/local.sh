#!/usr/bin/env bash
# Local set-up and runs. The first call creates .venv and installs jip2p with the pinned packages
# of launch/constraints.txt (again whenever pyproject.toml or the pins change); then it runs:
#
#   bash launch/local.sh demo [DIR]    the main job on the embedded default (jip2p-demo): write
#                                      the procedural edit world, train configs/synthetic.py on it,
#                                      edit held-out scenes, report (DIR/report.md, default demo/)
#   bash launch/local.sh test [ARGS]   the test suite (PyTorch-side and TensorFlow-side tests run
#                                      in separate processes: the two must never share one)
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
    # Each group is its own process; pytest's exit code 5 ("no tests") never hides a failure.
    python -m pytest --side=torch "$@"
    python -m pytest --side=tf "$@"
    ;;
  demo)
    exec jip2p-demo --out "${1:-demo}" "${@:2}"
    ;;
  *) exec "$job" "$@" ;;
esac
