#!/usr/bin/env bash
# The main job on the built-in default preset: a tiny Llama learns string tasks on CPU in ~2 minutes,
# with eval (loss and exact-match accuracy) before and after. Extra arguments go to `spot-trainer train`.
set -euo pipefail
cd "$(dirname "$0")/.."
py="$(bash scripts/setup_env.sh)"
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-$(nproc)}"
exec "$(dirname "$py")/spot-trainer" train --output-dir "${SPOT_OUTPUT_DIR:-runs/default}" "$@"
