"""The output directory contract: where a run keeps checkpoints, the final model, logs, heartbeat and caches.

Users script against these names (README "Output directory"); every module takes them from here. Standard
library only: the supervisor reads a run dir without importing torch.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

CHECKPOINTS_DIR = "checkpoints"
MANIFEST_NAME = "manifest.json"  # written last: a checkpoint dir without it does not exist
FINAL_DIR = "final"
METRICS_FILE = "metrics.jsonl"
EVENTS_FILE = "events.jsonl"
HEARTBEAT_FILE = "heartbeat"
CACHE_DIR = "cache"
BASE_MODEL_DIR = "base-model"  # the built-in model's random init
FINAL_META = "spot_trainer.json"  # in final/: method, step, base model and the config of the run
TMP_PREFIX = ".tmp-"  # a checkpoint being written: checkpoints/.tmp-step-XXXXXXXX/
PULL_PREFIX = ".pull-"  # a checkpoint being pulled from the remote (kept across restarts, resumed)
ARCHIVED_DIR = "archived"  # checkpoints/archived/<run-id>/step-XXXXXXXX: another lineage, moved aside
CORRUPT_DIR = "corrupt"  # checkpoints/corrupt/step-XXXXXXXX: verified damage, moved aside
LEGACY_RUN = "legacy"  # archived/ name for checkpoints written before lineage existed (no run id)
LOCK_FILE = ".lock"  # the output dir's owner: host, pid, start time
NODE_CHECK_FILE = ".node-check"  # rank 0's token: every node of a multi-node run must see it (a shared output dir)
NOTICES_FILE = "notices.json"  # cloud notices already acted on (a rebalance recommendation: one checkpoint each)
TRACKERS_FILE = "trackers.json"  # the experiment trackers' run ids, so a restarted process continues the same runs
TENSORBOARD_DIR = "tensorboard"  # TensorBoard event files (logging.report_to: tensorboard)
MLRUNS_DIR = "mlruns"  # MLflow's file store when no tracking URI is configured


def step_dirname(step: int) -> str:
    return f"step-{step:08d}"


def parse_step_dirname(name: str) -> int | None:
    """`step-00000120` -> 120; anything else -> None."""
    if not name.startswith("step-") or len(name) != 13 or not name[5:].isdigit():
        return None
    return int(name[5:])


def step_dirs(ckpt_root: str | os.PathLike) -> dict[int, Path]:
    """Step -> dir of every `step-XXXXXXXX` dir under a checkpoints root, committed or not."""
    root = Path(ckpt_root)
    if not root.is_dir():
        return {}
    return {s: p for p in root.iterdir() if (s := parse_step_dirname(p.name)) is not None}


def committed_steps(ckpt_root: str | os.PathLike) -> list[int]:
    """Steps whose dir under a checkpoints root has a manifest (committed; not verified), oldest first."""
    return sorted(s for s, p in step_dirs(ckpt_root).items() if (p / MANIFEST_NAME).is_file())


@dataclass(frozen=True)
class RunDir:
    """Paths inside one output dir."""

    root: Path

    def __init__(self, root: str | os.PathLike):
        object.__setattr__(self, "root", Path(root))

    @property
    def checkpoints(self) -> Path:
        return self.root / CHECKPOINTS_DIR

    def checkpoint(self, step: int) -> Path:
        return self.checkpoints / step_dirname(step)

    @property
    def final(self) -> Path:
        return self.root / FINAL_DIR

    @property
    def metrics(self) -> Path:
        return self.root / METRICS_FILE

    @property
    def events(self) -> Path:
        return self.root / EVENTS_FILE

    @property
    def heartbeat(self) -> Path:
        return self.root / HEARTBEAT_FILE

    @property
    def cache(self) -> Path:
        return self.root / CACHE_DIR

    @property
    def base_model(self) -> Path:
        return self.root / BASE_MODEL_DIR

    def committed_steps(self) -> list[int]:
        return committed_steps(self.checkpoints)

    def read_heartbeat(self) -> int | None:
        """The step rank 0 last wrote into the heartbeat file, or None."""
        return self.read_heartbeat_phase()[0]

    def read_heartbeat_phase(self) -> tuple[int | None, str | None]:
        """(step, phase) from the heartbeat file `<step> [<phase>]`; older versions wrote the step alone."""
        try:
            fields = self.heartbeat.read_text().split()
            return int(fields[0]), (fields[1] if len(fields) > 1 else None)
        except (OSError, ValueError, IndexError):
            return None, None

    def write_heartbeat(self, step: int, phase: str | None = None) -> None:
        """Replaced atomically, so the supervisor never reads it half written (not fsynced: it is rewritten often)."""
        from trainer.durable import replace_file

        replace_file(self.heartbeat, (f"{step} {phase}\n" if phase else f"{step}\n").encode(), fsync=False)
