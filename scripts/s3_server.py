"""Moved to tests/harness/s3_server.py; this stub keeps `from s3_server import SeaweedServer` working for
scripts/bench_upload_stall.py, which puts scripts/ on sys.path. Delete it once that script imports
tests.harness.s3_server itself."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repo root, for tests.harness

from tests.harness.s3_server import *  # noqa: E402,F403
