"""Remote checkpoint storage: `s3://bucket/prefix` (boto3) or `file:///abs/path`, same layout as local.

A remote checkpoint is committed when `checkpoints/step-XXXXXXXX/manifest.json` exists: it is uploaded last
and deleted first. Every operation is bounded by a deadline; transient errors are retried until then.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from urllib.parse import urlparse

import tenacity

from trainer.checkpoint.manifest import FileEntry, Manifest, sha256_file
from trainer.config.schema import S3Config
from trainer.errors import CheckpointError, ConfigError
from trainer.remote.objects import CallTimeout, Missing, ObjectStore, StorageUnavailable, one_line
from trainer.durable import fsync_dir, write_file
from trainer.run_dir import CHECKPOINTS_DIR, MANIFEST_NAME, parse_step_dirname, step_dirname

log = logging.getLogger(__name__)
_POLL_S = 0.05


@dataclass
class UploadResult:
    remote: str  # URI of the uploaded directory
    step: int | None
    seconds: float
    bytes_uploaded: int  # bytes of files sent; files already in the store with the same sha256 are skipped
    bytes_total: int
    files_uploaded: int
    files_skipped: int


def open_store(uri: str, s3: S3Config | None = None) -> "RemoteStore":
    """A RemoteStore for `s3://bucket/prefix` or `file:///abs/path`; credentials come from boto3's chain."""
    s3 = s3 or S3Config()
    parsed = urlparse(uri)
    if parsed.scheme == "s3":
        if not parsed.netloc:
            raise ConfigError(f"checkpoint.remote {uri!r}: give a bucket, e.g. s3://my-bucket/runs/exp1")
        from trainer.remote.s3 import S3Objects  # boto3 is imported only for an s3:// remote

        return RemoteStore(uri, S3Objects(uri, parsed.netloc, parsed.path.strip("/"), s3), s3.deadline_s)
    if parsed.scheme == "file":
        if parsed.netloc not in ("", "localhost") or not parsed.path.startswith("/"):
            raise ConfigError(f"checkpoint.remote {uri!r}: use an absolute path, e.g. file:///mnt/ckpts/exp1")
        from trainer.remote.files import FileObjects

        return RemoteStore(uri, FileObjects(Path(parsed.path)), s3.deadline_s)
    raise ConfigError(f"checkpoint.remote {uri!r}: must start with s3:// or file://")



# ---------------------------------------------------------------- checkpoints over objects


def _safe_rel(path: str, where: str) -> str:
    p = PurePosixPath(path)
    if p.is_absolute() or ".." in p.parts or not p.parts:
        raise CheckpointError(f"{where}: manifest lists an unsafe path {path!r}")
    return path


class RemoteStore:
    """Committed checkpoints under a remote root; every operation retries transient errors until its deadline.

    Deadlines are absolute `time.monotonic()` values; None means now + checkpoint.s3.deadline_s.
    """

    def __init__(self, uri: str, objects: ObjectStore, deadline_s: float):
        self.uri, self.objects, self.deadline_s = uri.rstrip("/"), objects, deadline_s
        self._abort = threading.Event()

    def __repr__(self) -> str:
        return f"RemoteStore({self.uri!r})"

    def deadline(self, seconds: float | None = None) -> float:
        """The monotonic time `seconds` from now (default: checkpoint.s3.deadline_s)."""
        return time.monotonic() + (self.deadline_s if seconds is None else seconds)

    def check(self, write: bool = True, deadline: float | None = None) -> None:
        """Fail fast with StorageError on wrong credentials, a missing bucket or (write=True) no write access."""
        probe = f".spot-trainer-probe-{os.getpid()}"

        def attempt(dl: float) -> None:
            self._call(self.objects.list, probe, deadline=dl)
            if write:
                self._call(self.objects.write, probe, b"ok\n", sha256_bytes(b"ok\n"), deadline=dl)
                self._call(self.objects.delete, [probe], deadline=dl)
        self._retry("access check", attempt, deadline)

    def committed_steps(self, deadline: float | None = None) -> list[int]:
        """Steps whose checkpoints/step-XXXXXXXX/manifest.json exists remotely, oldest first."""
        return sorted(self._scan(deadline)[0])

    def get_manifest(self, step: int, deadline: float | None = None) -> Manifest | None:
        """The remote manifest of `step`; None if not committed; CheckpointError if unreadable."""
        rel = f"{CHECKPOINTS_DIR}/{step_dirname(step)}/{MANIFEST_NAME}"
        raw = self._retry(f"read of {rel}", lambda dl: self._call(self.objects.read, rel, deadline=dl), deadline)
        return None if raw is None else Manifest.from_json(raw.decode("utf-8", "replace"), where=f"{self.uri}/{rel}")

    def upload_checkpoint(self, local_dir: Path, deadline: float | None = None) -> UploadResult:
        """Upload a locally committed checkpoint: changed files (in parallel) first, manifest.json last."""
        local_dir = Path(local_dir)
        step = parse_step_dirname(local_dir.name)
        if step is None:
            raise CheckpointError(f"{local_dir}: not a checkpoint directory (expected step-XXXXXXXX)")
        manifest = Manifest.load(local_dir)
        if manifest.step != step:
            raise CheckpointError(f"{local_dir}: manifest says step {manifest.step}; not uploaded")
        raw = (local_dir / MANIFEST_NAME).read_bytes()
        result = self._upload(local_dir, f"{CHECKPOINTS_DIR}/{local_dir.name}", manifest.files, raw, deadline)
        result.step = step
        return result

    def upload_dir(self, local_dir: Path, remote_rel: str, deadline: float | None = None) -> UploadResult:
        """Upload a directory (e.g. final/) under remote_rel; its manifest.json, if any, lists the files and goes last."""
        local_dir = Path(local_dir)
        if (local_dir / MANIFEST_NAME).is_file():
            files, raw = Manifest.load(local_dir).files, (local_dir / MANIFEST_NAME).read_bytes()
        else:
            files = [FileEntry(p.relative_to(local_dir).as_posix(), p.stat().st_size, sha256_file(p))
                     for p in sorted(local_dir.rglob("*")) if p.is_file()]
            raw = None
        return self._upload(local_dir, remote_rel.strip("/"), files, raw, deadline)

    def download_checkpoint(self, step: int, dest_root: Path, deadline: float | None = None) -> Path:
        """Download and verify `step` into dest_root/step-XXXXXXXX (replacing it); CheckpointError names a bad object."""
        name, dest_root = step_dirname(step), Path(dest_root)
        tmp, final = dest_root / f".tmp-{name}-{os.getpid()}", dest_root / name
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        try:
            raw = self._retry(f"download of {CHECKPOINTS_DIR}/{name}",
                              lambda dl: self._download(step, tmp, dl), deadline)
            write_file(tmp / MANIFEST_NAME, raw)  # last: the local copy is committed only when complete
            if final.exists():
                shutil.rmtree(final)
            os.replace(tmp, final)
            fsync_dir(dest_root)
            return final
        finally:
            shutil.rmtree(tmp, ignore_errors=True)

    def pull_latest(self, dest_root: Path, newer_than: int | None = None,
                    deadline: float | None = None) -> tuple[int, Path] | None:
        """Download the newest remote checkpoint newer than `newer_than`, skipping (with a warning) bad ones."""
        for step in reversed(self.committed_steps(deadline)):
            if newer_than is not None and step <= newer_than:
                break
            try:
                return step, self.download_checkpoint(step, dest_root, deadline)
            except CheckpointError as e:
                log.warning("remote checkpoint step %d is unusable (%s); falling back to the previous one", step, e)
        return None

    def delete_checkpoint(self, step: int, deadline: float | None = None) -> None:
        """Uncommit (delete manifest.json) first, then delete the files."""
        rel = f"{CHECKPOINTS_DIR}/{step_dirname(step)}"

        def attempt(dl: float) -> None:
            self._call(self.objects.delete, [f"{rel}/{MANIFEST_NAME}"], deadline=dl)
            self._call(self.objects.delete, sorted(self._call(self.objects.list, f"{rel}/", deadline=dl)), deadline=dl)
        self._retry(f"delete of {rel}", attempt, deadline)

    def prune(self, keep_last: int, deadline: float | None = None) -> list[int]:
        """Delete all but the newest `keep_last` committed checkpoints, and partial uploads older than the newest."""
        committed, dirs = self._scan(deadline)
        if not committed:
            return []
        keep = set(sorted(committed)[-max(1, keep_last):])
        doomed = sorted(s for s in dirs if s not in keep and s < max(committed))
        for step in doomed:
            self.delete_checkpoint(step, deadline)
        return doomed

    def abort(self) -> None:
        """Make running and later operations stop at once with StorageUnavailable (used at shutdown)."""
        self._abort.set()

    def close(self) -> None:
        self.objects.close()

    # ---------------------------------------------------------------- internals

    def _scan(self, deadline: float | None) -> tuple[set[int], set[int]]:
        """(committed steps, every step dir with any object) under checkpoints/."""
        keys = self._retry("listing of checkpoints",
                           lambda dl: self._call(self.objects.list, f"{CHECKPOINTS_DIR}/", deadline=dl), deadline)
        committed, dirs = set(), set()
        for key in keys:
            parts = key.split("/")
            step = parse_step_dirname(parts[1]) if len(parts) >= 3 else None
            if step is not None:
                dirs.add(step)
                if len(parts) == 3 and parts[2] == MANIFEST_NAME:
                    committed.add(step)
        return committed, dirs

    def _upload(self, local_dir: Path, rel: str, files: list[FileEntry], manifest_raw: bytes | None,
                deadline: float | None) -> UploadResult:
        start, sent = time.monotonic(), None
        man_rel = f"{rel}/{MANIFEST_NAME}"

        def attempt(dl: float) -> None:
            nonlocal sent
            for f in files:  # the local copy may have been pruned or damaged since it was committed
                p = local_dir / _safe_rel(f.path, str(local_dir))
                if not p.is_file() or p.stat().st_size != f.size:
                    raise CheckpointError(f"{p}: missing or not the size its manifest says; not uploaded")
            if manifest_raw is not None:
                remote = self._call(self.objects.read, man_rel, deadline=dl)
                if remote == manifest_raw:
                    sent = [] if sent is None else sent
                    return
                if remote is not None:  # a different upload of this step: uncommit before replacing its files
                    self._call(self.objects.delete, [man_rel], deadline=dl)
            present = self._call(self.objects.list, f"{rel}/", deadline=dl)
            todo = [f for f in files if present.get(f"{rel}/{f.path}") != f.size
                    or self._call(self.objects.sha256, f"{rel}/{f.path}", deadline=dl) != f.sha256]
            sent = todo if sent is None else sent
            self.objects.put_files([(local_dir / f.path, f"{rel}/{f.path}", f.sha256) for f in todo],
                                   lambda futures: self._wait(futures, dl))
            if manifest_raw is not None:
                self._call(self.objects.write, man_rel, manifest_raw, sha256_bytes(manifest_raw), deadline=dl)

        self._retry(f"upload of {rel}", attempt, deadline)
        return UploadResult(remote=f"{self.uri}/{rel}", step=None, seconds=time.monotonic() - start,
                            bytes_uploaded=sum(f.size for f in sent), bytes_total=sum(f.size for f in files),
                            files_uploaded=len(sent), files_skipped=len(files) - len(sent))

    def _download(self, step: int, tmp: Path, dl: float) -> bytes:
        rel = f"{CHECKPOINTS_DIR}/{step_dirname(step)}"
        where = f"{self.uri}/{rel}"
        raw = self._call(self.objects.read, f"{rel}/{MANIFEST_NAME}", deadline=dl)
        if raw is None:
            raise CheckpointError(f"{where}/{MANIFEST_NAME}: missing (the checkpoint is not committed remotely)")
        manifest = Manifest.from_json(raw.decode("utf-8", "replace"), where=f"{where}/{MANIFEST_NAME}")
        if manifest.step != step:
            raise CheckpointError(f"{where}/{MANIFEST_NAME}: says step {manifest.step}")
        todo = []
        for f in manifest.files:
            p = tmp / _safe_rel(f.path, where)
            if not (p.is_file() and p.stat().st_size == f.size and sha256_file(p) == f.sha256):  # kept from a retry
                p.parent.mkdir(parents=True, exist_ok=True)
                todo.append(f)
        try:
            self.objects.get_files([(f"{rel}/{f.path}", tmp / f.path) for f in todo], lambda fs: self._wait(fs, dl))
        except Missing as e:
            raise CheckpointError(f"{self.uri}/{e.args[0]}: missing from the remote checkpoint") from None
        for f in todo:
            p = tmp / f.path
            if p.stat().st_size != f.size or sha256_file(p) != f.sha256:
                raise CheckpointError(f"{where}/{f.path}: sha256 does not match the manifest (corrupt object)")
            with open(p, "rb") as fh:
                os.fsync(fh.fileno())
        return raw

    def _check(self, deadline: float) -> None:
        if self._abort.is_set():
            raise StorageUnavailable(f"{self.uri}: aborted (shutting down)")
        if time.monotonic() >= deadline:
            raise CallTimeout("no answer before the deadline")

    def _call(self, fn: Callable, *args, deadline: float):
        """Run one store call in a daemon thread, so a stalled socket cannot hold the caller past the deadline."""
        box: dict = {}
        done = threading.Event()

        def run() -> None:
            try:
                box["value"] = fn(*args)
            except BaseException as e:  # handed to the caller
                box["error"] = e
            finally:
                done.set()
        threading.Thread(target=run, name="storage-call", daemon=True).start()
        while not done.wait(_POLL_S):
            self._check(deadline)
        if "error" in box:
            raise box["error"]
        return box.get("value")

    def _wait(self, futures: list, deadline: float) -> None:
        """Wait for (rel, transfer future) pairs; the first failure, the deadline or abort cancels the rest."""
        pending = list(futures)
        try:
            while True:
                self._check(deadline)
                for item in [x for x in pending if x[1].done()]:
                    pending.remove(item)
                    try:
                        item[1].result()
                    except Exception as e:
                        if self.objects.is_missing(e):
                            raise Missing(item[0]) from None
                        raise
                if not pending:
                    return
                time.sleep(_POLL_S)
        finally:
            for _, f in pending:
                f.cancel()

    def _retry(self, what: str, attempt: Callable[[float], object], deadline: float | None):
        deadline = self.deadline() if deadline is None else deadline
        start = time.monotonic()

        def stop(rs: tenacity.RetryCallState) -> bool:
            return self._abort.is_set() or time.monotonic() + (rs.upcoming_sleep or 0) >= deadline

        def warn(rs: tenacity.RetryCallState) -> None:
            log.warning("%s: %s failed (%s); retrying in %.1fs", self.uri, what, one_line(rs.outcome.exception()),
                        rs.upcoming_sleep)
        try:
            for a in tenacity.Retrying(retry=tenacity.retry_if_exception(self.objects.is_transient), stop=stop,
                                       wait=tenacity.wait_random_exponential(multiplier=0.5, max=30),
                                       before_sleep=warn, sleep=self._abort.wait, reraise=True):
                with a:
                    return attempt(deadline)
        except Exception as e:
            fatal = self.objects.explain(e)
            if fatal is not None:
                raise fatal from None
            if self.objects.is_transient(e):
                raise StorageUnavailable(f"{self.uri}: {what} gave up after {time.monotonic() - start:.1f}s "
                                         f"of retries ({one_line(e)})") from None
            raise


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()
