#!/usr/bin/env bash
# Vast.ai: use as the instance's entrypoint/args ("docker ENTRYPOINT" launch mode), e.g.
# `bash /workspace/spot-trainer/launch/vast.sh`.
#
# Same environment variables as entrypoint.sh (SPOT_CONFIG, SPOT_OUTPUT_DIR, SPOT_REMOTE, SPOT_S3_ENDPOINT,
# SPOT_SET, AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY), plus:
#   SPOT_GRACE_SECONDS  seconds between SIGTERM and SIGKILL when the instance is stopped (default 8;
#                       `docker stop` waits 10 s)
#
# An outbid interruptible instance is stopped like `docker stop` (SIGTERM, then SIGKILL) and keeps its disk,
# so local checkpoints are usually there when it starts again; SPOT_REMOTE covers moving to another machine.
# There is no metadata service to poll, so the cloud watcher is off. In the ssh/jupyter launch modes this
# script is not PID 1 and the stop signal may never reach it: prefer the entrypoint launch mode.
set -euo pipefail

export SPOT_OUTPUT_DIR="${SPOT_OUTPUT_DIR:-/workspace/run}"
# Ours first: the user's SPOT_SET comes after and wins.
export SPOT_SET="preemption.watch=none preemption.grace_seconds=${SPOT_GRACE_SECONDS:-8} ${SPOT_SET:-}"

# exec, so SIGTERM reaches the supervisor (see entrypoint.sh).
exec "$(dirname "${BASH_SOURCE[0]}")/entrypoint.sh" "$@"
