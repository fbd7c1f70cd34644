"""`final/`: the trained model as transformers/peft load it, written like a checkpoint.

Temp dir, every file fsynced, the manifest last, then renamed into place and the parent fsynced: `final/` is
either the whole new model or the previous one. A previous `final/` of another lineage is archived, not replaced.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path

from trainer.checkpoint.manifest import Manifest, build_manifest, write_manifest
from trainer.durable import fsync_dir, write_file
from trainer.errors import CheckpointError
from trainer.run_dir import ARCHIVED_DIR, FINAL_META, LEGACY_RUN, RunDir

log = logging.getLogger(__name__)


def write_final(
    run: RunDir, model, tokenizer, meta: dict, step: int, world_size: int, run_id: str | None, signer=None
) -> Path:
    """Save `model` (adapter or full weights) + tokenizer + `meta` (spot_trainer.json) as `final/`; its manifest is
    signed when a `signer` (checkpoint.sign_key_env) is given."""
    tmp, old = run.root / ".final.tmp", run.root / ".final.old"
    if old.exists() and not run.final.exists():  # killed between the two renames last time: put it back first
        os.replace(old, run.final)
        fsync_dir(run.root)
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    write_file(tmp / FINAL_META, json.dumps({**meta, "run_id": run_id}, indent=1).encode())
    for p in sorted(tmp.rglob("*")):  # transformers writes without fsync
        if p.is_file():
            with open(p, "rb+") as f:
                os.fsync(f.fileno())
    manifest = build_manifest(tmp, step, world_size=world_size, kind="final", run_id=run_id)
    write_manifest(tmp, signer.sign(manifest) if signer is not None else manifest)
    if run.final.exists():
        previous = _run_id_of(run.final)
        if (run.final / "manifest.json").is_file() and previous != run_id:
            dest = _archive_final(run, previous)
            log.warning("final/ of another lineage (run %s) moved to %s", previous or LEGACY_RUN, dest)
        else:  # this run's own earlier final/ (a run resumed past its end): replaced by the newer one
            shutil.rmtree(old, ignore_errors=True)
            os.replace(run.final, old)
    os.replace(tmp, run.final)
    fsync_dir(run.root)
    shutil.rmtree(old, ignore_errors=True)
    return run.final


def _run_id_of(final: Path) -> str | None:
    try:
        return Manifest.load(final).run_id
    except CheckpointError:
        return None


def _archive_final(run: RunDir, run_id: str | None) -> Path:
    where = run.checkpoints / ARCHIVED_DIR / (run_id or LEGACY_RUN)
    where.mkdir(parents=True, exist_ok=True)
    dest, n = where / "final", 1
    while dest.exists():
        dest, n = where / f"final.{n}", n + 1
    os.replace(run.final, dest)
    fsync_dir(where)
    return dest
