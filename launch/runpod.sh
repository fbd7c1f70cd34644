#!/usr/bin/env bash
# RunPod: use as the pod's start command, e.g. `bash /workspace/spot-trainer/launch/runpod.sh`.
#
# Same environment variables as entrypoint.sh (SPOT_CONFIG, SPOT_OUTPUT_DIR, SPOT_REMOTE, SPOT_S3_ENDPOINT,
# SPOT_SET, AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY), plus:
#   SPOT_GRACE_SECONDS  seconds between SIGTERM and SIGKILL when a spot pod is interrupted (default 5)
#
# RunPod interrupts a spot pod with SIGTERM and SIGKILLs it a few seconds later, and has no metadata
# service to poll: so the cloud watcher is off and the grace is short (the trainer finishes the step,
# commits locally, and uploads in the time left). The /workspace network volume survives the pod, so the
# output dir lives there by default; set SPOT_REMOTE too, for a pod that comes back on another machine.
set -euo pipefail

export SPOT_OUTPUT_DIR="${SPOT_OUTPUT_DIR:-/workspace/run}"
# Ours first: the user's SPOT_SET comes after and wins.
export SPOT_SET="preemption.watch=none preemption.grace_seconds=${SPOT_GRACE_SECONDS:-5} ${SPOT_SET:-}"

# exec, so SIGTERM reaches the supervisor (see entrypoint.sh).
exec "$(dirname "${BASH_SOURCE[0]}")/entrypoint.sh" "$@"
