#!/usr/bin/env bash
# Generic pod entrypoint: turns SPOT_* environment variables into `spot-trainer run ...` and execs it.
#
#   SPOT_CONFIG       config YAML path or preset name (default: the default preset)
#   SPOT_OUTPUT_DIR   output dir, on a volume that outlives the pod if there is one (default: /workspace/run)
#   SPOT_REMOTE       s3://bucket/prefix or file:///path        -> --set checkpoint.remote=...
#   SPOT_S3_ENDPOINT  S3-compatible endpoint (R2, B2, MinIO...)  -> --set checkpoint.s3.endpoint_url=...
#   SPOT_SET          more overrides, space-separated key=value, e.g. "train.max_steps=500 lora.r=32"
#   SPOT_PACKAGE      what to pip install if spot-trainer is missing (default: this repo, else spot-trainer)
#   SPOT_PYTHON       the Python to install into (default: python3)
#   AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY (and AWS_SESSION_TOKEN, AWS_DEFAULT_REGION): read by boto3 from
#                     the environment; this script never prints them.
# Arguments are appended to `spot-trainer run` after the ones above, so they win.
# Exit code is the supervisor's: 0 done, 2 config error, 75 preempted (start a pod again to resume), 1 failed.

# No `set -x`, ever: tracing would print every expanded command line into the pod's logs.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(dirname "$here")"
python="${SPOT_PYTHON:-$(command -v python3 || command -v python || true)}"

install_spot_trainer() {
  if [[ -z "$python" ]]; then
    echo "spot-trainer: no python3 on PATH; use an image with Python and PyTorch, or set SPOT_PYTHON" >&2
    exit 2
  fi
  local package="${SPOT_PACKAGE:-}"
  if [[ -z "$package" ]]; then
    if [[ -f "$repo/pyproject.toml" ]]; then package="$repo"; else package="spot-trainer"; fi
  fi
  # Pin the torch that the image already has: its CUDA build must not be swapped for a generic wheel.
  local constraints
  constraints="$(mktemp)"
  "$python" -c 'import torch; print("torch==" + torch.__version__)' >"$constraints" 2>/dev/null || : >"$constraints"
  echo "spot-trainer: installing $package" >&2
  "$python" -m pip install --quiet --constraint "$constraints" "$package"
  rm -f "$constraints"
}

# Byte-compile what a start imports (ours, torch, transformers, ...), once per install: packages installed without
# .pyc files (uv, PIP_NO_COMPILE, a read-only cache) would otherwise compile them again in every process's start-up,
# the first trainer's and each restart's. Best effort: an unwritable site-packages is skipped, never an error.
warm_bytecode() {
  local listing
  listing="$("$python" - 2>/dev/null <<'PY' || true
import importlib.util
import sys

sys.path = [p for p in sys.path if p not in ("", ".")]  # the installed packages, not a same-named dir here
for name in ("trainer", "torch", "transformers", "accelerate", "peft", "bitsandbytes", "safetensors", "tokenizers",
             "huggingface_hub", "datasets", "liger_kernel", "boto3", "botocore", "click", "yaml", "tenacity"):
    try:
        spec = importlib.util.find_spec(name)
    except (ImportError, ValueError):
        continue
    if spec is not None and spec.submodule_search_locations:
        print(list(spec.submodule_search_locations)[0])
PY
)"
  [[ -n "$listing" ]] || return 0
  local dirs
  mapfile -t dirs <<<"$listing"
  echo "spot-trainer: compiling bytecode of ${#dirs[@]} packages" >&2
  "$python" -m compileall -q -j 0 "${dirs[@]}" >/dev/null 2>&1 || true
}

args=(run)
if [[ -n "${SPOT_CONFIG:-}" ]]; then args+=("$SPOT_CONFIG"); fi
args+=(--output-dir "${SPOT_OUTPUT_DIR:-/workspace/run}")
if [[ -n "${SPOT_REMOTE:-}" ]]; then args+=(--set "checkpoint.remote=$SPOT_REMOTE"); fi
if [[ -n "${SPOT_S3_ENDPOINT:-}" ]]; then args+=(--set "checkpoint.s3.endpoint_url=$SPOT_S3_ENDPOINT"); fi
if [[ -n "${SPOT_SET:-}" ]]; then
  read -r -a extra <<<"$SPOT_SET"  # split on whitespace only: no glob expansion of the values
  for kv in "${extra[@]}"; do args+=(--set "$kv"); done
fi
args+=("$@")

if ! command -v spot-trainer >/dev/null 2>&1; then
  install_spot_trainer
  warm_bytecode
fi
if command -v spot-trainer >/dev/null 2>&1; then
  cmd=(spot-trainer)
else
  cmd=("$python" -m trainer)  # pip put the script somewhere off PATH (e.g. ~/.local/bin)
fi

echo "spot-trainer: ${cmd[*]} ${args[*]}" >&2
# exec: the supervisor replaces this shell (it is PID 1 in most pod images), so the platform's SIGTERM
# reaches it directly. A shell left in between does not forward SIGTERM to its child: the trainer would
# never hear about the preemption and would be SIGKILLed mid-step, losing everything since the last checkpoint.
exec "${cmd[@]}" "${args[@]}"
