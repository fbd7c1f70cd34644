"""Remote checkpoint storage: `s3://bucket/prefix` (boto3) or `file:///abs/path`, same layout as local.

A remote checkpoint is committed when `checkpoints/step-XXXXXXXX/manifest.json` exists: it is uploaded last
and deleted first. Every operation is bounded by a deadline; transient errors are retried until then.
"""

from __future__ import annotations

import hashlib
import logging
import os
import queue
import shutil
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Callable
from urllib.parse import urlparse

import boto3
import botocore.exceptions as bex
import tenacity
from boto3.s3.transfer import TransferConfig
from botocore.config import Config as BotoConfig
from s3transfer.manager import TransferManager

from .config import S3Config
from .errors import CheckpointError, ConfigError, SpotTrainerError, StorageError
from .manifest import MANIFEST_NAME, FileEntry, Manifest, fsync_dir, parse_step_dirname, sha256_file, step_dirname

log = logging.getLogger(__name__)
CHECKPOINTS = "checkpoints"
_POLL_S = 0.05


class StorageUnavailable(SpotTrainerError):
    """The store kept failing with retryable errors until the deadline, or the call was aborted."""


class _Missing(Exception):
    """An object that should exist does not (args[0]: its path relative to the store)."""


class _Timeout(Exception):
    """A call ran past its deadline (retryable until the operation's deadline stops it)."""


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
        return RemoteStore(uri, S3Objects(uri, parsed.netloc, parsed.path.strip("/"), s3), s3.deadline_s)
    if parsed.scheme == "file":
        if parsed.netloc not in ("", "localhost") or not parsed.path.startswith("/"):
            raise ConfigError(f"checkpoint.remote {uri!r}: use an absolute path, e.g. file:///mnt/ckpts/exp1")
        return RemoteStore(uri, FileObjects(Path(parsed.path)), s3.deadline_s)
    raise ConfigError(f"checkpoint.remote {uri!r}: must start with s3:// or file://")


# ---------------------------------------------------------------- error classes

_TRANSIENT_CODES = {"RequestTimeout", "SlowDown", "Throttling", "ThrottlingException", "RequestLimitExceeded",
                    "InternalError", "ServiceUnavailable", "OperationAborted",
                    "NoSuchUpload"}  # a multipart upload the server lost (restart): upload the file again
_AUTH_CODES = {"InvalidAccessKeyId", "SignatureDoesNotMatch", "AccessDenied", "AllAccessDisabled", "InvalidToken",
               "ExpiredToken", "TokenRefreshRequired", "InvalidSecurity", "AccountProblem", "Forbidden", "403"}
_REGION_CODES = {"PermanentRedirect", "AuthorizationHeaderMalformed", "IllegalLocationConstraintException"}


def _code(e: bex.ClientError) -> str:
    return str(e.response.get("Error", {}).get("Code", ""))


def _status(e: bex.ClientError) -> int:
    return int(e.response.get("ResponseMetadata", {}).get("HTTPStatusCode") or 0)


def _is_transient(e: BaseException) -> bool:
    if isinstance(e, bex.ClientError):
        return _status(e) >= 500 or _status(e) in (408, 429) or _code(e) in _TRANSIENT_CODES
    if isinstance(e, bex.SSLError) and "CERTIFICATE_VERIFY_FAILED" in str(e):
        return False
    if isinstance(e, (bex.ConnectionError, bex.HTTPClientError, bex.IncompleteReadError, _Timeout)):
        return True
    # OSError covers builtin ConnectionError/TimeoutError and file:// I/O errors; permission problems are fatal.
    return isinstance(e, OSError) and not isinstance(e, PermissionError)


def _one_line(e: BaseException) -> str:
    text = " ".join(str(e).split()) or type(e).__name__
    return text if len(text) <= 200 else text[:197] + "..."


# ---------------------------------------------------------------- backends: objects under a root


_SOURCES = {"env": "env", "shared-credentials-file": "profile", "config-file": "profile",
            "iam-role": "instance role", "container-role": "container role", "assume-role": "assume-role profile",
            "assume-role-with-web-identity": "web identity", "sso": "SSO", "custom-process": "credential_process"}


class _DaemonPool:
    """Executor for s3transfer with daemon threads: a transfer abandoned on a stalled socket (deadline, abort)
    must not hold the process at exit for read_timeout x max_attempts, as ThreadPoolExecutor's threads would."""

    def __init__(self, max_workers: int):
        self._jobs: queue.SimpleQueue = queue.SimpleQueue()
        self._threads = [threading.Thread(target=self._work, name="s3-transfer", daemon=True)
                         for _ in range(max_workers)]
        for t in self._threads:
            t.start()

    def _work(self) -> None:
        while (job := self._jobs.get()) is not None:
            future, fn, args, kwargs = job
            if future.set_running_or_notify_cancel():
                try:
                    future.set_result(fn(*args, **kwargs))
                except BaseException as e:  # handed to s3transfer through the future
                    future.set_exception(e)

    def submit(self, fn, *args, **kwargs) -> Future:
        future: Future = Future()
        self._jobs.put((future, fn, args, kwargs))
        return future

    def shutdown(self, wait: bool = True) -> None:
        for _ in self._threads:
            self._jobs.put(None)
        end = time.monotonic() + 1.0
        for t in self._threads if wait else ():
            t.join(timeout=max(0.0, end - time.monotonic()))  # bounded: a stalled one dies with the process


class S3Objects:
    """Objects under s3://bucket/prefix through one boto3 client and one transfer manager."""

    def __init__(self, uri: str, bucket: str, prefix: str, cfg: S3Config):
        self.uri, self.bucket, self.prefix = uri.rstrip("/"), bucket, prefix
        self.endpoint = cfg.endpoint_url or "AWS S3"
        self.profile = cfg.profile or os.environ.get("AWS_PROFILE") or "default"
        try:
            session = boto3.session.Session(profile_name=cfg.profile)
            creds = session.get_credentials()
        except bex.ProfileNotFound:
            raise StorageError(f"{self.uri}: AWS profile {cfg.profile!r} not found in ~/.aws/config or "
                               f"~/.aws/credentials; fix checkpoint.s3.profile") from None
        except bex.BotoCoreError as e:
            raise StorageError(f"{self.uri}: cannot load AWS credentials ({type(e).__name__}); check the "
                               f"AWS_* environment variables and ~/.aws/config") from None
        if creds is None:
            raise StorageError(f"{self.uri}: no AWS credentials found; set AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, "
                               f"a profile (checkpoint.s3.profile or AWS_PROFILE) or an instance role")
        self.source = _SOURCES.get(creds.method, creds.method)
        style = cfg.addressing_style
        if style == "auto":  # every S3-compatible store takes path-style; AWS prefers virtual-hosted
            style = "path" if cfg.endpoint_url else "auto"
        # New boto3 sends CRC trailers (aws-chunked) that GCS, B2 and older MinIO reject; we verify sha256 ourselves.
        compat = {} if cfg.endpoint_url is None else {"request_checksum_calculation": "when_required",
                                                      "response_checksum_validation": "when_required"}
        conf = BotoConfig(connect_timeout=cfg.connect_timeout_s, read_timeout=cfg.read_timeout_s,
                          retries={"mode": "standard", "total_max_attempts": cfg.max_attempts},
                          s3={"addressing_style": style}, max_pool_connections=cfg.max_concurrency + 4,
                          tcp_keepalive=True, user_agent_extra="spot-trainer", **compat)
        self.client = session.client("s3", endpoint_url=cfg.endpoint_url, region_name=cfg.region, config=conf)
        part = cfg.part_size_mb * 1024 * 1024
        self.transfers = TransferManager(self.client, TransferConfig(
            multipart_threshold=part, multipart_chunksize=part, max_concurrency=cfg.max_concurrency),
            executor_cls=_DaemonPool)

    def _key(self, rel: str) -> str:
        return f"{self.prefix}/{rel}" if self.prefix else rel

    def list(self, rel_prefix: str) -> dict[str, int]:
        """Relative path -> size of every object under rel_prefix."""
        strip, out = len(self._key("")), {}
        for page in self.client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket,
                                                                          Prefix=self._key(rel_prefix)):
            out.update({o["Key"][strip:]: o["Size"] for o in page.get("Contents", [])})
        return out

    def sha256(self, rel: str) -> str | None:
        try:
            return self.client.head_object(Bucket=self.bucket, Key=self._key(rel))["Metadata"].get("sha256")
        except bex.ClientError as e:
            if _status(e) == 404 and _code(e) != "NoSuchBucket":
                return None
            raise

    def read(self, rel: str) -> bytes | None:
        try:
            return self.client.get_object(Bucket=self.bucket, Key=self._key(rel))["Body"].read()
        except bex.ClientError as e:
            if _code(e) in ("NoSuchKey", "404"):
                return None
            raise

    def write(self, rel: str, data: bytes, sha256: str) -> None:
        self.client.put_object(Bucket=self.bucket, Key=self._key(rel), Body=data, Metadata={"sha256": sha256})

    def delete(self, rels: list[str]) -> None:
        for rel in rels:  # one by one: GCS has no multi-object delete
            self.client.delete_object(Bucket=self.bucket, Key=self._key(rel))

    def put_files(self, items: list[tuple[Path, str, str]], wait: Callable) -> None:
        """Upload (local path, rel, sha256) items in parallel (multipart above part_size_mb)."""
        wait([(rel, self.transfers.upload(str(path), self.bucket, self._key(rel),
                                          extra_args={"Metadata": {"sha256": sha}})) for path, rel, sha in items])

    def get_files(self, items: list[tuple[str, Path]], wait: Callable) -> None:
        wait([(rel, self.transfers.download(self.bucket, self._key(rel), str(path))) for rel, path in items])

    def is_missing(self, e: BaseException) -> bool:
        return isinstance(e, bex.ClientError) and _status(e) == 404 and _code(e) != "NoSuchBucket"

    def explain(self, e: BaseException) -> StorageError | None:
        """A one-line StorageError for errors that retrying cannot fix; None for the others."""
        if isinstance(e, bex.NoCredentialsError):
            return StorageError(f"{self.uri}: no AWS credentials found; set AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, "
                                f"a profile or an instance role")
        if isinstance(e, bex.SSLError) and not _is_transient(e):
            return StorageError(f"{self.uri}: TLS certificate of {self.endpoint} not trusted; set AWS_CA_BUNDLE")
        if not isinstance(e, bex.ClientError) or _is_transient(e):
            return None
        code, status = _code(e), _status(e)
        if code in _AUTH_CODES or status == 403:
            hints = {"env": "check AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY",
                     "profile": f"check the keys of profile '{self.profile}' in ~/.aws/credentials",
                     "instance role": "check the IAM role attached to this instance"}
            hint = hints.get(self.source, f"check the {self.source} credentials")
            if code == "AccessDenied":
                hint = "allow s3:ListBucket, s3:GetObject, s3:PutObject and s3:DeleteObject on this bucket and prefix"
            elif code in ("ExpiredToken", "InvalidToken"):
                hint = "refresh the credentials (AWS_SESSION_TOKEN or the profile's session)"
            return StorageError(f"{self.uri}: access denied with the credentials from {self.source} ({code or status});"
                                f" {hint}")
        if code in ("NoSuchBucket", "InvalidBucketName"):
            return StorageError(f"{self.uri}: bucket '{self.bucket}' does not exist at {self.endpoint} ({code}); "
                                f"create it or fix checkpoint.remote / checkpoint.s3.endpoint_url")
        if code in _REGION_CODES:
            return StorageError(f"{self.uri}: the bucket is in another region ({code}); set checkpoint.s3.region")
        if code == "RequestTimeTooSkewed":
            return StorageError(f"{self.uri}: this machine's clock is off ({code}); sync it (NTP) and restart")
        return StorageError(f"{self.uri}: {code or status} ({_one_line(e)}); not retried")

    def close(self) -> None:
        # shutdown() waits for every transfer to end, so a stalled one would block it: bound the wait.
        closer = threading.Thread(target=self.transfers.shutdown, args=(True,), name="s3-close", daemon=True)
        closer.start()
        closer.join(timeout=2.0)


class FileObjects:
    """Objects as files under a directory (a mounted bucket, NFS, or another disk): same contract as S3."""

    def __init__(self, root: Path):
        self.root = root

    def list(self, rel_prefix: str) -> dict[str, int]:
        base = self.root / rel_prefix
        if not base.is_dir():
            return {}
        return {p.relative_to(self.root).as_posix(): p.stat().st_size for p in base.rglob("*")
                if p.is_file() and not p.name.startswith(".tmp-")}

    def sha256(self, rel: str) -> str | None:
        p = self.root / rel
        return sha256_file(p) if p.is_file() else None

    def read(self, rel: str) -> bytes | None:
        p = self.root / rel
        return p.read_bytes() if p.is_file() else None

    def write(self, rel: str, data: bytes, sha256: str) -> None:
        dest = self.root / rel
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = dest.with_name(f".tmp-{dest.name}-{os.getpid()}-{threading.get_ident()}")
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, dest)  # a reader sees the whole object or none of it, as with S3
        fsync_dir(dest.parent)

    def delete(self, rels: list[str]) -> None:
        for rel in rels:
            (self.root / rel).unlink(missing_ok=True)
        for d in sorted({(self.root / rel).parent for rel in rels}, key=lambda p: -len(p.parts)):
            while d != self.root and d.is_dir() and not any(d.iterdir()):
                d.rmdir()
                d = d.parent

    def put_files(self, items: list[tuple[Path, str, str]], wait: Callable) -> None:
        for path, rel, _ in items:
            wait([])  # deadline and abort checks between files
            dest = self.root / rel
            dest.parent.mkdir(parents=True, exist_ok=True)
            tmp = dest.with_name(f".tmp-{dest.name}-{os.getpid()}-{threading.get_ident()}")
            shutil.copyfile(path, tmp)
            with open(tmp, "rb+") as f:
                os.fsync(f.fileno())
            os.replace(tmp, dest)
            fsync_dir(dest.parent)

    def get_files(self, items: list[tuple[str, Path]], wait: Callable) -> None:
        for rel, path in items:
            wait([])
            if not (self.root / rel).is_file():
                raise _Missing(rel)
            shutil.copyfile(self.root / rel, path)

    def is_missing(self, e: BaseException) -> bool:
        return isinstance(e, FileNotFoundError)

    def explain(self, e: BaseException) -> StorageError | None:
        if isinstance(e, PermissionError):
            return StorageError(f"file://{self.root}: permission denied ({e.filename}); fix the directory's "
                                f"permissions or checkpoint.remote")
        return None

    def close(self) -> None:
        pass


# ---------------------------------------------------------------- checkpoints over objects


def _safe_rel(path: str, where: str) -> str:
    p = PurePosixPath(path)
    if p.is_absolute() or ".." in p.parts or not p.parts:
        raise CheckpointError(f"{where}: manifest lists an unsafe path {path!r}")
    return path


def _write_durable(path: Path, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


class RemoteStore:
    """Committed checkpoints under a remote root; every operation retries transient errors until its deadline.

    Deadlines are absolute `time.monotonic()` values; None means now + checkpoint.s3.deadline_s.
    """

    def __init__(self, uri: str, objects: S3Objects | FileObjects, deadline_s: float):
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
        rel = f"{CHECKPOINTS}/{step_dirname(step)}/{MANIFEST_NAME}"
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
        result = self._upload(local_dir, f"{CHECKPOINTS}/{local_dir.name}", manifest.files, raw, deadline)
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
            raw = self._retry(f"download of {CHECKPOINTS}/{name}",
                              lambda dl: self._download(step, tmp, dl), deadline)
            _write_durable(tmp / MANIFEST_NAME, raw)  # last: the local copy is committed only when complete
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
        rel = f"{CHECKPOINTS}/{step_dirname(step)}"

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
                           lambda dl: self._call(self.objects.list, f"{CHECKPOINTS}/", deadline=dl), deadline)
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
        rel = f"{CHECKPOINTS}/{step_dirname(step)}"
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
        except _Missing as e:
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
            raise _Timeout("no answer before the deadline")

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
                            raise _Missing(item[0]) from None
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
            log.warning("%s: %s failed (%s); retrying in %.1fs", self.uri, what, _one_line(rs.outcome.exception()),
                        rs.upcoming_sleep)
        try:
            for a in tenacity.Retrying(retry=tenacity.retry_if_exception(_is_transient), stop=stop,
                                       wait=tenacity.wait_random_exponential(multiplier=0.5, max=30),
                                       before_sleep=warn, sleep=self._abort.wait, reraise=True):
                with a:
                    return attempt(deadline)
        except Exception as e:
            fatal = self.objects.explain(e)
            if fatal is not None:
                raise fatal from None
            if _is_transient(e):
                raise StorageUnavailable(f"{self.uri}: {what} gave up after {time.monotonic() - start:.1f}s "
                                         f"of retries ({_one_line(e)})") from None
            raise


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()
