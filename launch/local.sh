#!/usr/bin/env bash
# Local runner: installs the project into ./.venv (idempotent) and runs one job.
#
#   bash launch/local.sh main  [--workdir=runs/default] [extra flags]   # the main job, embedded default
#   bash launch/local.sh test  [pytest args]                             # install + lint-imports + the test suite
#   bash launch/local.sh python -m unif2ace_jax.<module> [flags]         # any module, inside the venv
set -euo pipefail
cd "$(dirname "$0")/.."

VENV="${UNIF2ACE_VENV:-.venv}"
if [ ! -x "$VENV/bin/python" ]; then
  python3 -m venv "$VENV"
fi
# shellcheck disable=SC1091
. "$VENV/bin/activate"
job="${1:-main}"; shift || true
# The tests also check the weight converters against PyTorch/transformers (CPU torch 2.13.0).
extras="test"
[ "$job" = "test" ] && extras="test,convert"
stamp="$VENV/.installed-$(cat setup.py | sha1sum | cut -c1-12)-${extras/,/-}"
if [ ! -f "$stamp" ]; then
  python -m pip install -q --upgrade pip
  python -m pip install -q -e ".[$extras]"
  touch "$stamp"
fi

# Plain CPU runs: never let an installed libtpu probe for TPUs.
export JAX_PLATFORMS="${JAX_PLATFORMS:-cpu}"
export PYTHONUNBUFFERED=1

case "$job" in
  main)   exec python -m unif2ace_jax.main "$@" ;;
  test)   # The layering first (.importlinter), then the suite; either failing fails the job.
          lint-imports
          exec python -m pytest -q -n 2 --durations=15 "$@" ;;
  python) exec python "$@" ;;
  *) echo "local.sh: unknown job '$job' (expected: main, test, python)" >&2; exit 2 ;;
esac
