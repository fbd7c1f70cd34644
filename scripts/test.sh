#!/usr/bin/env bash
# The test suite, from nothing: venv, dependencies (incl. the SeaweedFS S3 server), then pytest.
# GPU and benchmark tests are skipped here; extra arguments go to pytest (e.g. -m "not slow", -k resume).
set -euo pipefail
cd "$(dirname "$0")/.."
py="$(bash scripts/setup_env.sh)"
export OMP_NUM_THREADS=1 TOKENIZERS_PARALLELISM=false
# the venv's tools first: DeepSpeed builds CPU Adam with whichever ninja comes first, and two ninja versions
# sharing one build cache rebuild it each time they alternate
export PATH="$(cd "$(dirname "$py")" && pwd):$PATH"
# DeepSpeed's CPU Adam is compiled once and reused across runs
export TORCH_EXTENSIONS_DIR="${TORCH_EXTENSIONS_DIR:-$HOME/.cache/spot-trainer/torch_extensions}"
# a build killed half way leaves torch's build lock behind, and every later build waits on it forever; a build takes
# 1-2 minutes, so a lock older than 10 minutes is such a leftover
if [ -d "$TORCH_EXTENSIONS_DIR" ]; then find "$TORCH_EXTENSIONS_DIR" -maxdepth 2 -name lock -mmin +10 -delete; fi
# one test at a time by default; SPOT_TEST_WORKERS=2 runs two pytest-xdist workers (28 instead of ~40 minutes on
# 2 cores), where one timing test (a SIGTERM during the final upload, bound 25 s) was once 0.3 s over its bound
exec "$py" -m pytest -m "not gpu and not bench" -n "${SPOT_TEST_WORKERS:-0}" --dist worksteal "$@"
