"""Local checkpoints: written into a temp dir, manifest last, renamed into place; retention; resume lookup.

Every rank writes its own files into the shared temp dir and drops a `.rank-XXXXX.done` marker; rank 0 waits
for all markers, writes `manifest.json` and renames the dir. No collective runs here, so the write can happen
in a background thread while training goes on.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import queue
import shutil
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
from safetensors.torch import load_file

from .errors import CheckpointError, SpotTrainerError
from .manifest import MANIFEST_NAME, build_manifest, fsync_dir, parse_step_dirname, step_dirname, verify, \
    write_manifest
from .st_io import write_bytes, write_safetensors

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
    """The `checkpoints/` dir of an output dir."""

    def __init__(self, output_dir: str | os.PathLike):
        self.root = Path(output_dir) / "checkpoints"

    def path(self, step: int) -> Path:
        return self.root / step_dirname(step)

    def tmp_path(self, step: int) -> Path:
        return self.root / f".tmp-{step_dirname(step)}"

    def committed_steps(self) -> list[int]:
        """Steps whose dir has a manifest (not verified)."""
        if not self.root.is_dir():
            return []
        steps = [parse_step_dirname(p.name) for p in self.root.iterdir() if (p / MANIFEST_NAME).is_file()]
        return sorted(s for s in steps if s is not None)

    def latest_valid(self, deep: bool = True, warn: Callable[[str], None] = log.warning,
                     discard_broken: bool = False) -> tuple[int, Path] | None:
        """The newest checkpoint whose manifest verifies; newer broken ones are skipped with a warning.

        discard_broken (rank 0 of a resuming run): also delete them, so the run writes that step again instead
        of keeping a broken copy that looks committed (which would be uploaded, and counted by retention).
        """
        if not self.root.is_dir():
            return None
        candidates = sorted((s for s in (parse_step_dirname(p.name) for p in self.root.iterdir()) if s is not None),
                            reverse=True)
        for step in candidates:
            problems = verify(self.path(step), deep=deep)
            if not problems:
                return step, self.path(step)
            warn(f"skipping checkpoint {self.path(step)}: {problems[0]}"
                 + (f" (+{len(problems) - 1} more problems)" if len(problems) > 1 else "")
                 + ("; deleted" if discard_broken else ""))
            if discard_broken:
                self.discard(step)
        return None

    def discard(self, step: int) -> None:
        """Delete one checkpoint dir, uncommitting it first (manifest), so a crash mid-delete never leaves a
        half checkpoint that looks whole."""
        (self.path(step) / MANIFEST_NAME).unlink(missing_ok=True)
        shutil.rmtree(self.path(step), ignore_errors=True)

    def clean_stale(self) -> None:
        """Remove temp dirs left by a process that died mid-write (they never counted)."""
        if self.root.is_dir():
            for p in self.root.glob(".tmp-step-*"):
                shutil.rmtree(p, ignore_errors=True)

    def prune(self, keep_last: int | None, protect: set[int] = frozenset()) -> list[int]:
        """Delete committed checkpoints beyond the newest `keep_last`; never the newest one."""
        if not keep_last:
            return []
        steps = self.committed_steps()
        doomed = [s for s in steps[:-max(keep_last, 1)] if s not in protect]
        for s in doomed:
            self.discard(s)
        return doomed

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
        jobs = [(name, lambda n=name, t=tensors: write_safetensors(tmp / n, t)) for name, tensors in snap.tensors.items()]
        jobs += [(name, lambda n=name, o=obj: write_bytes(tmp / n, json.dumps(o, indent=1, sort_keys=True).encode()))
                 for name, obj in snap.json.items()]
        jobs += [(name, lambda n=name, x=text: write_bytes(tmp / n, x.encode())) for name, text in snap.text.items()]
        # big files first, so the longest write starts at once
        jobs.sort(key=lambda j: -sum(t.numel() * t.element_size() for t in snap.tensors.get(j[0], {}).values()))
        with ThreadPoolExecutor(max_workers=max(1, min(4, len(jobs)))) as pool:
            futures = [(name, pool.submit(fn)) for name, fn in jobs]
            written = {name: f.result() for name, f in futures}
        marker = tmp / f".rank-{snap.rank:05d}.done"
        write_bytes(marker, json.dumps({"pid": os.getpid(), "files": written}).encode())
        return tmp

    def commit(self, snap: Snapshot, timeout: float = 600.0) -> Path:
        """Rank 0: wait for every rank's marker, write the manifest last, rename into place."""
        tmp = self.tmp_path(snap.step)
        deadline = time.monotonic() + timeout
        markers = [tmp / f".rank-{r:05d}.done" for r in range(snap.world_size)]
        while not all(m.exists() for m in markers):
            for r in range(snap.world_size):
                failed = tmp / f".rank-{r:05d}.failed"
                if failed.exists():
                    raise CheckpointError(f"rank {r} could not write its files for step {snap.step}: "
                                          f"{failed.read_text(errors='replace').strip()}")
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
        manifest = build_manifest(tmp, snap.step, known=known, world_size=snap.world_size, kind=snap.kind,
                                  extra=snap.extra)
        write_manifest(tmp, manifest)
        final = self.path(snap.step)
        if final.exists():  # a broken leftover of the same step (a valid one is never rewritten)
            shutil.rmtree(final)
        os.replace(tmp, final)
        fsync_dir(self.root)
        # temp dirs of earlier steps are abandoned writes (a rank failed there); every rank finished with them
        # before it wrote this step, so they can go
        for p in self.root.glob(".tmp-step-*"):
            step = parse_step_dirname(p.name.removeprefix(".tmp-"))
            if step is not None and step < snap.step:
                shutil.rmtree(p, ignore_errors=True)
        return final

    def abandon(self, snap: Snapshot, timeout: float = 60.0) -> None:
        """Rank 0, after a failed write: wait (bounded) until every rank is done or failed, then free the space."""
        tmp = self.tmp_path(snap.step)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and not all(
                (tmp / f".rank-{r:05d}.done").exists() or (tmp / f".rank-{r:05d}.failed").exists()
                for r in range(snap.world_size)):
            time.sleep(0.05)
        shutil.rmtree(tmp, ignore_errors=True)


def out_of_space(err: BaseException) -> bool:
    """A write failed because the disk (or quota) is full, here or on another rank."""
    if isinstance(err, OSError) and err.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    if isinstance(err, CheckpointError):
        return "No space left" in str(err) or "quota exceeded" in str(err).lower()
    return isinstance(err.__cause__, BaseException) and out_of_space(err.__cause__)


class CheckpointWriter:
    """Writes snapshots in a background thread, one at a time, in order; rank 0 also commits.

    A periodic checkpoint that fails because the disk is full is abandoned (its temp dir deleted) and reported
    through `on_failed`; training goes on and the next one is tried at its time. Any other failure, and any
    failure of a synchronous write, reaches the training thread.
    """

    def __init__(self, store: CheckpointStore, rank: int, on_commit: Callable[[Snapshot, Path, float], None],
                 on_failed: Callable[[Snapshot, BaseException], None] | None = None):
        self.store, self.rank, self.on_commit, self.on_failed = store, rank, on_commit, on_failed
        self._q: queue.Queue = queue.Queue()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="checkpoint-writer", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while True:
            item = self._q.get()
            try:
                if item is None:
                    return
                self._write(item)
            except BaseException as e:  # surfaced to the training thread at the next submit/wait
                if self.on_failed is not None and out_of_space(e):
                    self._failed(item, e)
                else:
                    self._error = e
            finally:
                self._q.task_done()

    def _write(self, snap: Snapshot) -> None:
        t0 = time.monotonic()
        self.store.write_rank_files(snap)
        if self.rank == 0:
            path = self.store.commit(snap)
            self.on_commit(snap, path, time.monotonic() - t0)

    def _failed(self, snap: Snapshot, err: BaseException) -> None:
        try:
            if self.rank == 0:
                self.store.abandon(snap)
            self.on_failed(snap, err)
        except BaseException as e:
            self._error = e

    def _raise(self) -> None:
        if self._error is not None:
            err, self._error = self._error, None
            if isinstance(err, SpotTrainerError):  # e.g. a StorageError from handing it to the uploader
                raise err
            raise CheckpointError(f"writing a checkpoint failed: {err}") from err

    def submit(self, snap: Snapshot) -> None:
        self._raise()
        self._q.put(snap)

    def write_now(self, snap: Snapshot) -> None:
        """Synchronous write (emergency and final checkpoints): waits for earlier ones first."""
        self.wait()
        self._write(snap)

    def wait(self) -> None:
        self._q.join()
        self._raise()

    def close(self) -> None:
        self._q.put(None)
        self._thread.join(timeout=600)
