"""Local checkpoints: written into a temp dir, manifest last, renamed into place; retention; resume lookup.

Every rank writes its own files into the shared temp dir and drops a `.rank-XXXXX.done` marker; rank 0 waits
for all markers, writes `manifest.json` and renames the dir. No collective runs here, so the write can happen
in a background thread while training goes on.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file

from trainer.checkpoint import lineage
from trainer.checkpoint.lineage import Lineage
from trainer.checkpoint.manifest import Manifest, Verdict, build_manifest, check, write_manifest
from trainer.checkpoint.signing import Signer
from trainer.checkpoint.stream import write_safetensors
from trainer.durable import fsync_dir, write_file
from trainer.errors import CheckpointError
from trainer.run_dir import (
    ARCHIVED_DIR,
    CHECKPOINTS_DIR,
    CORRUPT_DIR,
    LEGACY_RUN,
    MANIFEST_NAME,
    PULL_PREFIX,
    TMP_PREFIX,
    committed_steps,
    parse_step_dirname,
    step_dirname,
)

log = logging.getLogger(__name__)


@dataclass
class Snapshot:
    """What one rank writes for one checkpoint: tensors, JSON objects and text, by file name."""

    step: int
    rank: int
    world_size: int
    kind: str = "periodic"
    tensors: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict)
    json: dict[str, object] = field(default_factory=dict)
    text: dict[str, str] = field(default_factory=dict)
    extra: dict = field(default_factory=dict)
    lineage: Lineage | None = None  # rank 0: what the manifest records about the run this checkpoint belongs to
    created: float = field(default_factory=time.monotonic)


def read_tensors(ckpt: Path, name: str) -> dict[str, torch.Tensor]:
    try:
        return load_file(str(ckpt / name))
    except Exception as e:  # safetensors raises its own error types for damaged files
        raise CheckpointError(f"{ckpt / name}: cannot read ({e})") from None


def read_json(ckpt: Path, name: str):
    try:
        return json.loads((ckpt / name).read_text())
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{ckpt / name}: cannot read ({e})") from None


class CheckpointStore:
    """The `checkpoints/` dir of an output dir. With a `signer` (checkpoint.sign_key_env) it signs what it commits
    and trusts only checkpoints whose signature verifies: the others are skipped, never moved or deleted."""

    def __init__(self, output_dir: str | os.PathLike, signer: Signer | None = None):
        self.root = Path(output_dir) / CHECKPOINTS_DIR
        self.signer = signer
        self.ranks_here: range | None = None  # own output dirs: the ranks whose files land here (else all)

    def path(self, step: int) -> Path:
        return self.root / step_dirname(step)

    def tmp_path(self, step: int) -> Path:
        return self.root / f"{TMP_PREFIX}{step_dirname(step)}"

    def committed_steps(self) -> list[int]:
        """Steps whose dir has a manifest (not verified)."""
        return committed_steps(self.root)

    def manifests(self) -> tuple[dict[int, Manifest], dict[int, Verdict]]:
        """(step -> manifest of each committed checkpoint whose manifest reads (and, with a signer, verifies),
        step -> verdict of the others)."""
        good, bad = {}, {}
        for step in self.committed_steps():
            try:
                m = Manifest.load(self.path(step))
            except CheckpointError:
                bad[step] = check(self.path(step), deep=False)  # corrupt, a newer format, or a read error
                continue
            problem = self.signer.problem(m) if self.signer is not None else None
            if problem:  # left out of the choice, retention and lineage: kept exactly where it is
                bad[step] = Verdict([f"{self.path(step) / MANIFEST_NAME}: {problem}"], untrusted=True, manifest=m)
            else:
                good[step] = m
        return good, bad

    def latest_valid(
        self, deep: bool = True, warn: Callable[[str], None] = log.warning, quarantine: bool = False
    ) -> tuple[int, Path] | None:
        """The newest checkpoint (committed last) that verifies; others on the way are skipped with a warning.

        quarantine (rank 0 of a resuming run): a checkpoint with verified damage moves to checkpoints/corrupt/, so
        the run writes that step again instead of keeping a broken copy that looks committed. A read error or a
        newer format is never a reason to move or delete anything: those stay where they are.
        """
        good, bad = self.manifests()
        for step, verdict in sorted(bad.items()):
            self._skipped(step, verdict, warn, quarantine)
        for step in lineage.recency(good):
            verdict = check(self.path(step), deep=deep, signer=self.signer)
            if verdict.ok:
                return step, self.path(step)
            self._skipped(step, verdict, warn, quarantine)
        return None

    def _skipped(self, step: int, verdict: Verdict, warn: Callable[[str], None], quarantine: bool) -> None:
        moved = ""
        if verdict.corrupt and quarantine:
            moved = f"; moved to {self.quarantine(step)}"
        more = f" (+{len(verdict.problems) - 1} more problems)" if len(verdict.problems) > 1 else ""
        warn(f"skipping checkpoint {self.path(step)}: {verdict.problems[0]}{more}{moved}")

    def quarantine(self, step: int) -> Path:
        """Move a checkpoint with verified damage to checkpoints/corrupt/ (kept for a person to look at)."""
        return self._move_aside(step, self.root / CORRUPT_DIR)

    def archive(self, step: int, run_id: str | None = None) -> Path:
        """Move a committed checkpoint of another lineage to checkpoints/archived/<run-id>/ (never deleted)."""
        if run_id is None:
            try:
                run_id = Manifest.load(self.path(step)).run_id
            except CheckpointError:
                pass
        return self._move_aside(step, self.root / ARCHIVED_DIR / (run_id or LEGACY_RUN))

    def _move_aside(self, step: int, where: Path) -> Path:
        where.mkdir(parents=True, exist_ok=True)
        dest, n = where / step_dirname(step), 1
        while dest.exists():  # the same step moved aside before: keep both
            dest, n = where / f"{step_dirname(step)}.{n}", n + 1
        os.replace(self.path(step), dest)
        fsync_dir(where)
        fsync_dir(self.root)
        return dest

    def archived(self) -> dict[str, dict[str, Path]]:
        """run id -> dir name -> path of every archived checkpoint."""
        root = self.root / ARCHIVED_DIR
        if not root.is_dir():
            return {}
        return {
            r.name: {d.name: d for d in sorted(r.iterdir()) if d.is_dir()} for r in sorted(root.iterdir()) if r.is_dir()
        }

    def corrupt(self) -> list[Path]:
        root = self.root / CORRUPT_DIR
        return sorted(d for d in root.iterdir() if d.is_dir()) if root.is_dir() else []

    def discard(self, step: int) -> None:
        """Delete one checkpoint dir, uncommitting it first (manifest), so a crash mid-delete never leaves a
        half checkpoint that looks whole."""
        (self.path(step) / MANIFEST_NAME).unlink(missing_ok=True)
        shutil.rmtree(self.path(step), ignore_errors=True)

    def clean_stale(self, pulls: bool = False) -> None:
        """Remove temp dirs left by a process that died mid-write (they never counted); with `pulls`, also the
        partial downloads kept for a retry (once the run has resumed, they are of no use)."""
        if self.root.is_dir():
            for pattern in (f"{TMP_PREFIX}step-*", f"{PULL_PREFIX}step-*") if pulls else (f"{TMP_PREFIX}step-*",):
                for p in self.root.glob(pattern):
                    shutil.rmtree(p, ignore_errors=True)

    def prune(
        self, keep_last: int | None, head: int | None = None, protect: set[int] = frozenset()
    ) -> tuple[list[int], list[int]]:
        """(deleted, archived): keep the newest `keep_last` of the lineage of `head` (default: the checkpoint
        committed last), never `head` itself nor a protected step; checkpoints of other lineages are archived."""
        if not keep_last:
            return [], []
        good, _ = self.manifests()  # unreadable ones are never touched here
        head = lineage.newest(good) if head is None or head not in good else head
        if head is None:
            return [], []
        delete, archive = lineage.retention(good, head, keep_last, protect)
        for s in archive:
            self.archive(s, good[s].run_id)
        for s in delete:
            self.discard(s)
        return delete, archive

    # ------------------------------------------------------------ writing

    def write_rank_files(self, snap: Snapshot) -> Path:
        """This rank's files into the temp dir, hashed while written and fsynced, then its done marker.

        Files are written in parallel threads (the bytes go from the snapshot's tensors to the file without an
        intermediate buffer); the marker carries their sizes and sha256, so rank 0 commits without reading
        them back.
        """
        tmp = self.tmp_path(snap.step)
        try:
            return self._write_rank_files(snap, tmp)
        except BaseException as e:
            try:  # tell rank 0 at once instead of letting it wait for a done marker that never comes
                (tmp / f".rank-{snap.rank:05d}.failed").write_text(f"{type(e).__name__}: {e}"[:500])
            except OSError:
                pass
            raise

    def _write_rank_files(self, snap: Snapshot, tmp: Path) -> Path:
        tmp.mkdir(parents=True, exist_ok=True)
        jobs = [
            (name, lambda n=name, t=tensors: write_safetensors(tmp / n, t)) for name, tensors in snap.tensors.items()
        ]
        jobs += [
            (name, lambda n=name, o=obj: write_file(tmp / n, json.dumps(o, indent=1, sort_keys=True).encode()))
            for name, obj in snap.json.items()
        ]
        jobs += [(name, lambda n=name, x=text: write_file(tmp / n, x.encode())) for name, text in snap.text.items()]
        # big files first, so the longest write starts at once
        jobs.sort(key=lambda j: -sum(t.numel() * t.element_size() for t in snap.tensors.get(j[0], {}).values()))
        with ThreadPoolExecutor(max_workers=max(1, min(4, len(jobs)))) as pool:
            futures = [(name, pool.submit(fn)) for name, fn in jobs]
            written = {name: f.result() for name, f in futures}
        marker = tmp / f".rank-{snap.rank:05d}.done"
        write_file(marker, json.dumps({"pid": os.getpid(), "files": written}).encode())
        return tmp

    def wait_for_ranks(self, snap: Snapshot, ranks: range, timeout: float) -> dict[str, tuple[int, str]]:
        """Until each of `ranks` dropped its done marker for `snap` (a `.failed` one, or `timeout`: CheckpointError);
        the markers are consumed and their files' (size, sha256), hashed while written, returned."""
        tmp = self.tmp_path(snap.step)
        deadline = time.monotonic() + timeout
        markers = [tmp / f".rank-{r:05d}.done" for r in ranks]
        while not all(m.exists() for m in markers):
            for r in ranks:
                failed = tmp / f".rank-{r:05d}.failed"
                if failed.exists():
                    raise CheckpointError(
                        f"rank {r} could not write its files for step {snap.step}: "
                        f"{failed.read_text(errors='replace').strip()}"
                    )
            if time.monotonic() > deadline:
                raise CheckpointError(f"{tmp}: not every rank wrote its files within {timeout:.0f} s")
            time.sleep(0.005)
        known: dict[str, tuple[int, str]] = {}
        for m in markers:
            try:  # written durably before it appeared; a marker without hashes just means hashing here
                known.update({k: tuple(v) for k, v in json.loads(m.read_text()).get("files", {}).items()})
            except (OSError, ValueError, AttributeError):
                pass
            m.unlink()
        return known

    def commit(self, snap: Snapshot, timeout: float = 600.0) -> Path:
        """Rank 0: wait for every rank's marker, write the manifest last, rename into place."""
        tmp = self.tmp_path(snap.step)
        known = self.wait_for_ranks(snap, range(snap.world_size), timeout)
        lin = snap.lineage
        manifest = build_manifest(
            tmp,
            snap.step,
            known=known,
            world_size=snap.world_size,
            kind=snap.kind,
            extra=snap.extra,
            run_id=lin.run_id if lin else None,
            seq=lin.seq if lin else None,
            parent=lin.parent if lin else None,
        )
        if self.signer is not None:
            self.signer.sign(manifest)
        write_manifest(tmp, manifest)
        final = self.path(snap.step)
        if (final / MANIFEST_NAME).exists():  # a committed checkpoint of the same step from another lineage
            log.warning("checkpoint %s exists from another lineage; moved to %s", final, self.archive(snap.step))
        elif final.exists():  # an uncommitted leftover: it never counted
            shutil.rmtree(final)
        os.replace(tmp, final)
        fsync_dir(self.root)
        # temp dirs of earlier steps are abandoned writes (a rank failed there); every rank finished with them
        # before it wrote this step, so they can go
        for p in self.root.glob(f"{TMP_PREFIX}step-*"):
            step = parse_step_dirname(p.name.removeprefix(TMP_PREFIX))
            if step is not None and step < snap.step:
                shutil.rmtree(p, ignore_errors=True)
        return final

    def abandon(self, snap: Snapshot, timeout: float = 60.0) -> None:
        """Rank 0, after a failed write: wait (bounded) until every rank is done or failed, then free the space."""
        tmp = self.tmp_path(snap.step)
        deadline = time.monotonic() + timeout
        ranks = self.ranks_here if self.ranks_here is not None else range(snap.world_size)
        while time.monotonic() < deadline and not all(
            (tmp / f".rank-{r:05d}.done").exists() or (tmp / f".rank-{r:05d}.failed").exists() for r in ranks
        ):
            time.sleep(0.05)
        shutil.rmtree(tmp, ignore_errors=True)
