"""Where things are under a remote root: the layout of a local output dir (trainer/run_dir.py).

checkpoints/step-XXXXXXXX/<files>, manifest.json last       a committed checkpoint of the current lineage
checkpoints/archived/<run id|legacy>/step-XXXXXXXX[.N]/      another lineage's, moved aside (never deleted)
checkpoints/corrupt/step-XXXXXXXX-<sha>/                     a manifest that does not read, moved aside
final/                                                       the final model
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

from trainer.run_dir import ARCHIVED_DIR, CHECKPOINTS_DIR, CORRUPT_DIR, MANIFEST_NAME, parse_step_dirname, step_dirname


def ckpt_rel(step: int) -> str:
    return f"{CHECKPOINTS_DIR}/{step_dirname(step)}"


def manifest_rel(dir_rel: str) -> str:
    return f"{dir_rel}/{MANIFEST_NAME}"


def archived_rel(run_key: str, name: str) -> str:
    return f"{CHECKPOINTS_DIR}/{ARCHIVED_DIR}/{run_key}/{name}"


def corrupt_rel(step: int, manifest_raw: bytes) -> str:
    return f"{CHECKPOINTS_DIR}/{CORRUPT_DIR}/{step_dirname(step)}-{hashlib.sha256(manifest_raw).hexdigest()[:8]}"


def archived_step(name: str) -> int | None:
    """`step-00000120` or `step-00000120.2` (a second archived copy of that step) -> 120."""
    return parse_step_dirname(name.split(".", 1)[0])


@dataclass
class Listing:
    """What one listing of checkpoints/ found (manifests not read yet)."""

    committed: set[int] = field(default_factory=set)  # step dirs with a manifest.json
    dirs: set[int] = field(default_factory=set)  # step dirs with any object (committed or a partial upload)
    archived: dict[str, dict[str, bool]] = field(default_factory=dict)  # run key -> dir name -> has a manifest


def parse_listing(keys) -> Listing:
    """Sort the keys under checkpoints/ into current, archived and (ignored) corrupt checkpoints."""
    out = Listing()
    for key in keys:
        parts = key.split("/")
        if len(parts) >= 5 and parts[1] == ARCHIVED_DIR and archived_step(parts[3]) is not None:
            has = out.archived.setdefault(parts[2], {}).get(parts[3], False)
            out.archived[parts[2]][parts[3]] = has or (len(parts) == 5 and parts[4] == MANIFEST_NAME)
            continue
        step = parse_step_dirname(parts[1]) if len(parts) >= 3 else None
        if step is not None:  # archived/ and corrupt/ never parse as a step dir
            out.dirs.add(step)
            if len(parts) == 3 and parts[2] == MANIFEST_NAME:
                out.committed.add(step)
    return out
