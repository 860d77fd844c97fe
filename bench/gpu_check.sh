#!/usr/bin/env bash
# One GPU check of the engine (bench/gpu_check.py): forward speed and parity of GLIP-T(C) and
# GLIP-L, pseudo-label stage vs a bare loop, one train-student step each. Needs only this
# checkout and ../shared/data (or GLIP_SHARED_DIR=/path/to/shared). At most 8 minutes on one GPU;
# `--smoke` runs the same steps on the CPU with the tiny variant. `--hf-teacher hf:DIR` (repeatable)
# adds images/s and parity rows for a saved Grounding DINO / OWLv2 folder.
#
#   bash bench/gpu_check.sh [--smoke] [--json FILE] [--hf-teacher hf:DIR ...]
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
python="${PYTHON:-}"
if [[ -z "$python" ]]; then
    if [[ -x "$repo/.venv/bin/python" ]]; then python="$repo/.venv/bin/python"; else python="$(command -v python3)"; fi
fi
export PYTHONPATH="$repo${PYTHONPATH:+:$PYTHONPATH}"
export RAY_AUTH_MODE="${RAY_AUTH_MODE:-disabled}" RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 RAY_USAGE_STATS_ENABLED=0 HF_HUB_OFFLINE=1
limit="${GPU_CHECK_TIMEOUT_S:-480}"
exec timeout --signal=TERM --kill-after=20 "$limit" "$python" "$repo/bench/gpu_check.py" "$@"
