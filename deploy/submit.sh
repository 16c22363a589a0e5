#!/usr/bin/env bash
# Submit `piplay train` to a running Ray cluster as a Ray job (wraps the Ray Jobs API, like `ray job submit`).
#
#   deploy/submit.sh --address http://HEAD:8265 --config configs/cluster/qwen3-4b.yaml [key=value ...] [--wait]
#
# Uploads this project (no venv, .git or runs) as the job's working directory, validates the config first,
# prints the job id and the commands to follow its logs. All options: deploy/submit.sh --help.
# PYTHON selects the interpreter (default: the project's .venv if present, else python3).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
if [[ -z "${PYTHON:-}" ]]; then
  if [[ -x "$root/.venv/bin/python" ]]; then PYTHON="$root/.venv/bin/python"; else PYTHON=python3; fi
fi
export PYTHONPATH="$root${PYTHONPATH:+:$PYTHONPATH}"
exec "$PYTHON" -m piplay_ray submit "$@"
