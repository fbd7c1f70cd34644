#!/usr/bin/env bash
# Creates ./.venv (once) with torch and spot-trainer installed; prints the python to use.
# torch: kept if the interpreter already has one (GPU images do); else torch==2.13.0 (our CPU dev/CI pin).
set -euo pipefail
cd "$(dirname "$0")/.."
venv="${SPOT_VENV:-.venv}"
if [ ! -x "$venv/bin/python" ]; then
  python3 -m venv "$venv" >&2
fi
py="$venv/bin/python"
if ! "$py" -c "import torch" 2>/dev/null; then
  echo "installing torch==2.13.0 into $venv ..." >&2
  "$py" -m pip install -q --disable-pip-version-check "torch==2.13.0" >&2
fi
stamp="$venv/.spot-trainer-installed"
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
  echo "installing spot-trainer and its dependencies into $venv ..." >&2
  "$py" -m pip install -q --disable-pip-version-check -e ".[test,trackers]" >&2
  touch "$stamp"
fi
# SkyPilot, for tests/unit/test_skypilot.py (it parses launch/skypilot.yaml), in a venv of its own: it needs
# click<8.2 and uvicorn<0.36, and would downgrade ours. Users install it where they run `sky`, not on the pod.
sky_pin="skypilot==0.14.1"
sky_venv="${SPOT_SKY_VENV:-.venv-sky}"
sky_stamp="$sky_venv/.installed-$sky_pin"
if [ ! -f "$sky_stamp" ]; then
  echo "installing $sky_pin into $sky_venv ..." >&2
  if [ ! -x "$sky_venv/bin/python" ]; then python3 -m venv "$sky_venv" >&2; fi
  "$sky_venv/bin/python" -m pip install -q --disable-pip-version-check "$sky_pin" >&2
  touch "$sky_stamp"
fi
echo "$py"
