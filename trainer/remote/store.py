"""Remote checkpoint storage: `s3://bucket/prefix` (boto3) or `file:///abs/path`, same layout as local (layout.py).

A remote checkpoint is committed when `checkpoints/step-XXXXXXXX/manifest.json` exists: it is uploaded last
and deleted first. Committed work is never overwritten or deleted for another lineage's sake: retention keeps the
newest of the current lineage and archives the others (archive.py); an upload over a different checkpoint of the
same step archives that one first. Pulls are in pull.py; deadlines and retries in calls.py.
"""

from __future__ import annotations

import hashlib
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

from trainer.checkpoint import lineage
from trainer.checkpoint.manifest import FileEntry, Manifest, sha256_file
from trainer.checkpoint.signing import Signer
from trainer.config.schema import S3Config
from trainer.errors import CheckpointError, ConfigError, CorruptCheckpoint, UnsupportedCheckpoint, UntrustedCheckpoint
from trainer.remote.archive import Archiver
from trainer.remote.calls import Budget, Calls
from trainer.remote.layout import Listing, ckpt_rel, manifest_rel, parse_listing
from trainer.remote.objects import ObjectStore
from trainer.remote.pull import Puller, same_checkpoint
from trainer.remote.uri import reject_credentials
from trainer.run_dir import CHECKPOINTS_DIR, MANIFEST_NAME, parse_step_dirname

log = logging.getLogger(__name__)


@dataclass
class UploadResult:
    remote: str  # URI of the uploaded directory
    step: int | None
    seconds: float
    bytes_uploaded: int  # bytes of files sent; files already in the store with the same sha256 are skipped
    bytes_total: int
    files_uploaded: int
    files_skipped: int


def open_store(uri: str, s3: S3Config | None = None, signer: Signer | None = None) -> RemoteStore:
    """A RemoteStore for `s3://bucket/prefix` or `file:///abs/path`; credentials come from boto3's chain, never from
    the URI. With a `signer` (checkpoint.sign_key_env) only checkpoints whose signature verifies are used."""
    s3 = s3 or S3Config()
    reject_credentials(uri, "remote URI")  # first: the messages below repeat the URI
    reject_credentials(s3.endpoint_url, "checkpoint.s3.endpoint_url")
    parsed = urlparse(uri)
    if parsed.scheme == "s3":
        if not parsed.netloc:
            raise ConfigError(f"checkpoint.remote {uri!r}: give a bucket, e.g. s3://my-bucket/runs/exp1")
        from trainer.remote.s3 import S3Objects  # boto3 is imported only for an s3:// remote

        objects: ObjectStore = S3Objects(uri, parsed.netloc, parsed.path.strip("/"), s3)
    elif parsed.scheme == "file":
        if parsed.netloc not in ("", "localhost") or not parsed.path.startswith("/"):
            raise ConfigError(f"checkpoint.remote {uri!r}: use an absolute path, e.g. file:///mnt/ckpts/exp1")
        from trainer.remote.files import FileObjects

        objects = FileObjects(Path(parsed.path))
    else:
        raise ConfigError(f"checkpoint.remote {uri!r}: must start with s3:// or file://")
    return RemoteStore(uri, objects, s3.deadline_s, s3.min_throughput_mb_s, signer=signer)


class RemoteStore:
    """Committed checkpoints under a remote root; every operation retries transient errors until its deadline.

    Deadlines are absolute `time.monotonic()` values; None means now + checkpoint.s3.deadline_s, plus the time a
    transfer's size takes at checkpoint.s3.min_throughput_mb_s.
    """

    def __init__(
        self,
        uri: str,
        objects: ObjectStore,
        deadline_s: float,
        min_throughput_mb_s: float = 1.0,
        signer: Signer | None = None,
    ):
        self.uri, self.objects, self.signer = uri.rstrip("/"), objects, signer
        self.calls = Calls(self.uri, objects, deadline_s, min_throughput_mb_s)
        self._archiver = Archiver(self.uri, objects, self.calls)
        self._puller = Puller(self.uri, objects, self.calls, signer)
        self._warned: set[str] = set()

    def __repr__(self) -> str:
        return f"RemoteStore({self.uri!r})"

    @property
    def deadline_s(self) -> float:
        return self.calls.deadline_s

    def deadline(self, seconds: float | None = None) -> float:
        """The monotonic time `seconds` from now (default: checkpoint.s3.deadline_s)."""
        return self.calls.deadline(seconds)

    def check(self, write: bool = True, deadline: float | None = None) -> None:
        """Fail fast with StorageError on wrong credentials, a missing bucket or (write=True) no write access."""
        probe = f".spot-trainer-probe-{os.getpid()}"

        def attempt(b: Budget) -> None:
            self.calls.call(self.objects.list, probe, deadline=b.at)
            if write:
                self.calls.call(self.objects.write, probe, b"ok\n", sha256_bytes(b"ok\n"), deadline=b.at)
                self.calls.call(self.objects.delete, [probe], deadline=b.at)

        self.calls.retry("access check", attempt, deadline)

    # ---------------------------------------------------------------- what is there

    def committed_steps(self, deadline: float | None = None) -> list[int]:
        """Steps whose checkpoints/step-XXXXXXXX/manifest.json exists remotely (not read), oldest first."""
        return sorted(self._scan(deadline).committed)

    def committed(self, deadline: float | None = None) -> tuple[dict[int, Manifest], list[str]]:
        """(step -> validated manifest of every committed checkpoint, one line per checkpoint whose manifest is
        corrupt, in a newer format or (with a signer) not signed with its key: those are left out here, and nothing
        deletes or archives them)."""
        return self._manifests(self._scan(deadline).committed, deadline)

    def archived(self, deadline: float | None = None) -> dict[str, dict[int, Manifest]]:
        """run id ('legacy' for checkpoints without one) -> step -> manifest of the archived checkpoints."""
        return self._archiver.archived(self._scan(deadline), deadline)

    def get_manifest(self, step: int, deadline: float | None = None) -> Manifest | None:
        """The remote manifest of `step`; None if not committed; CheckpointError if unreadable."""
        rel = manifest_rel(ckpt_rel(step))
        raw = self.calls.retry(
            f"read of {rel}", lambda b: self.calls.call(self.objects.read, rel, deadline=b.at), deadline
        )
        return None if raw is None else Manifest.from_json(raw.decode("utf-8", "replace"), where=f"{self.uri}/{rel}")

    # ---------------------------------------------------------------- uploads

    def upload_checkpoint(
        self, local_dir: Path, deadline: float | None = None, stop: Callable[[], bool] | None = None
    ) -> UploadResult:
        """Upload a locally committed checkpoint: changed files (in parallel) first, manifest.json last.

        A different checkpoint committed remotely at that step is archived first (or moved to corrupt/ when its
        manifest does not read), unless it is an earlier write of this same checkpoint (same run id and step).
        `stop()`, checked between files, ends it early with UploadInterrupted: the manifest is not written then.
        """
        local_dir = Path(local_dir)
        step = parse_step_dirname(local_dir.name)
        if step is None:
            raise CheckpointError(f"{local_dir}: not a checkpoint directory (expected step-XXXXXXXX)")
        manifest = Manifest.load(local_dir)
        if manifest.step != step:
            raise CheckpointError(f"{local_dir}: manifest says step {manifest.step}; not uploaded")
        untrusted = self.signer.problem(manifest) if self.signer is not None else None
        if untrusted:  # never into the bucket under the run's name, where it could replace a good copy
            raise UntrustedCheckpoint(f"{local_dir / MANIFEST_NAME}: {untrusted}; not uploaded")
        raw = (local_dir / MANIFEST_NAME).read_bytes()
        result = self._upload(
            local_dir,
            ckpt_rel(step),
            manifest.files,
            raw,
            deadline,
            lambda remote, b: self._make_room(step, remote, manifest, b),
            stop,
        )
        result.step = step
        return result

    def upload_dir(
        self, local_dir: Path, remote_rel: str, deadline: float | None = None, stop: Callable[[], bool] | None = None
    ) -> UploadResult:
        """Upload a dir (e.g. final/) under remote_rel; its manifest.json, if any, lists the files and goes last.
        `stop()`, checked between files, ends it early with UploadInterrupted (a StorageUnavailable): the manifest
        is not written then, so nothing partial counts as committed."""
        local_dir = Path(local_dir)
        if (local_dir / MANIFEST_NAME).is_file():
            files, raw = Manifest.load(local_dir).files, (local_dir / MANIFEST_NAME).read_bytes()
        else:
            files = [
                FileEntry(p.relative_to(local_dir).as_posix(), p.stat().st_size, sha256_file(p))
                for p in sorted(local_dir.rglob("*"))
                if p.is_file()
            ]
            raw = None
        return self._upload(local_dir, remote_rel.strip("/"), files, raw, deadline, None, stop)

    def upload_listed(
        self,
        local_dir: Path,
        remote_rel: str,
        files: list[FileEntry],
        manifest_raw: bytes,
        deadline: float | None = None,
    ) -> UploadResult:
        """Upload the listed files of local_dir under remote_rel, then `manifest_raw` as its manifest.json (for a dir
        whose manifest is not in it, e.g. the base model mirror: model_mirror.py)."""
        return self._upload(Path(local_dir), remote_rel.strip("/"), files, manifest_raw, deadline, None)

    # ---------------------------------------------------------------- one checkpoint from several nodes

    def clear_step(self, step: int, run_id: str | None, deadline: float | None = None) -> bool:
        """Before the nodes upload their files of `step` (distributed.shared_output_dir=false): a checkpoint of
        another lineage committed there is set aside first (archived, or moved to corrupt/), so no file of a
        committed checkpoint is ever replaced under its manifest. True if this run's own checkpoint of `step` is
        committed there already (a save of a step it resumed from): then nothing is to be uploaded."""
        rel = ckpt_rel(step)
        ours = Manifest(step=step, files=[], run_id=run_id)

        def attempt(b: Budget) -> bool:
            raw = self.calls.call(self.objects.read, manifest_rel(rel), deadline=b.at)
            if raw is None:
                return False
            try:
                there = Manifest.from_json(raw.decode("utf-8", "replace"), where=f"{self.uri}/{manifest_rel(rel)}")
            except (CorruptCheckpoint, UnsupportedCheckpoint):
                there = None
            trusted = there is not None and (self.signer is None or not self.signer.problem(there))
            if trusted and run_id is not None and there.run_id == run_id:
                return True  # never uncommitted to be written again: it stays as it is
            self._make_room(step, raw, ours, b)
            return False

        return self.calls.retry(f"clearing {rel}", attempt, deadline)

    def upload_files(
        self, local_dir: Path, step: int, files: list[FileEntry], deadline: float | None = None
    ) -> UploadResult:
        """One node's files of `step`, without a manifest: they count only once rank 0 commits the checkpoint."""
        result = self._upload(Path(local_dir), ckpt_rel(step), files, None, deadline, None)
        result.step = step
        return result

    def commit_manifest(self, manifest: Manifest, deadline: float | None = None) -> None:
        """Rank 0 (own output dirs): every file the manifest lists is in the bucket at its size, then the manifest is
        written, last. A file missing or of another size is a CheckpointError: nothing is committed."""
        if self.signer is not None:
            self.signer.sign(manifest)
        rel = ckpt_rel(manifest.step)
        raw = manifest.to_json().encode()

        def attempt(b: Budget) -> None:
            if self.calls.call(self.objects.read, manifest_rel(rel), deadline=b.at) not in (None, raw):
                raise CheckpointError(
                    f"{self.uri}/{rel}: another writer committed this step meanwhile (two runs on one prefix?); "
                    f"step {manifest.step} not committed over it"
                )
            present = self.calls.call(self.objects.list, f"{rel}/", deadline=b.at)
            b.allow(manifest.total_bytes)  # file:// hashes what is there
            wrong = [
                f.path
                for f in manifest.files
                if present.get(f"{rel}/{f.path}") != f.size
                or self.calls.call(self.objects.sha256, f"{rel}/{f.path}", deadline=self.calls.sized(f.size, b))
                != f.sha256
            ]
            if wrong:
                raise CheckpointError(
                    f"{self.uri}/{rel}: {len(wrong)} files missing or not as uploaded ({', '.join(wrong[:3])}); "
                    f"step {manifest.step} not committed"
                )
            self.calls.call(self.objects.write, manifest_rel(rel), raw, sha256_bytes(raw), deadline=b.at)

        self.calls.retry(f"commit of {rel}", attempt, deadline)

    # ---------------------------------------------------------------- retention and moving aside

    def delete_checkpoint(self, step: int, deadline: float | None = None) -> None:
        """Uncommit (delete manifest.json) first, then delete the files."""
        rel = ckpt_rel(step)

        def attempt(b: Budget) -> None:
            self.calls.call(self.objects.delete, [manifest_rel(rel)], deadline=b.at)
            self.calls.call(
                self.objects.delete, sorted(self.calls.call(self.objects.list, f"{rel}/", deadline=b.at)), deadline=b.at
            )

        self.calls.retry(f"delete of {rel}", attempt, deadline)

    def prune(
        self, keep_last: int, head: int | None = None, protect=frozenset(), deadline: float | None = None
    ) -> tuple[list[int], list[int]]:
        """(deleted, archived): keep the newest `keep_last` of the lineage of `head` (default: the checkpoint
        committed last); never `head`, never a protected step. Checkpoints of other lineages are archived, never
        deleted; partial uploads (no manifest) older than the head are deleted."""
        if not keep_last:  # 0/None: keep everything, as local retention does
            return [], []
        listing = self._scan(deadline)
        manifests, problems = self._manifests(listing.committed, deadline)
        self._warn_once(problems)
        head = lineage.newest(manifests) if head is None else head
        if head not in manifests:
            if head is not None:
                log.warning("%s: remote retention skipped: step %s is not committed there", self.uri, head)
            return [], []
        protect = set(protect)
        delete, archive = lineage.retention(manifests, head, keep_last, protect)
        partial = [s for s in listing.dirs - listing.committed if s < head and s not in protect]
        archived = [s for s in archive if self._archive_listed(s, manifests[s], deadline)]
        deleted = [s for s in delete if self._delete_listed(s, manifests[s], deadline)]
        for s in partial:
            self.delete_checkpoint(s, deadline)
        return sorted(deleted + partial), archived

    def archive_checkpoint(self, step: int, manifest: Manifest, deadline: float | None = None) -> str:
        """Move the committed checkpoint `step` (whose manifest is `manifest`) to
        checkpoints/archived/<run id or 'legacy'>/step-XXXXXXXX/ (files first, manifest last, then the source is
        uncommitted and deleted); the archived dir's URI."""
        rel, first = ckpt_rel(step), None

        def attempt(b: Budget) -> str:
            nonlocal first
            if first is None:  # on a retry the source may already be uncommitted: keep what the first try read
                raw = self.calls.call(self.objects.read, manifest_rel(rel), deadline=b.at)
                if raw is None:
                    raise CheckpointError(f"{self.uri}/{rel}: not committed remotely; nothing to archive")
                found = Manifest.from_json(raw.decode("utf-8", "replace"), where=f"{self.uri}/{manifest_rel(rel)}")
                if found != manifest:
                    raise CheckpointError(
                        f"{self.uri}/{rel}: not the checkpoint that was listed (it changed since); "
                        f"not archived: list the remote again"
                    )
                first = raw
            return self._archiver.archive(step, manifest, first, b)

        dst = self.calls.retry(f"archive of {rel}", attempt, deadline)
        log.info(
            "remote checkpoint step %d (run %s) archived to %s/%s", step, manifest.run_id or "legacy", self.uri, dst
        )
        return f"{self.uri}/{dst}"

    def delete_archived(self, run_id: str | None = None, deadline: float | None = None) -> list[str]:
        """Delete the archived checkpoints (of one run id, or all; 'legacy' for those without one); their URIs.
        One in a newer version's format is kept."""
        return self._archiver.delete_archived(self._scan(deadline), run_id, deadline)

    # ---------------------------------------------------------------- pulls

    def pull(self, step: int, dest_root: Path, manifest: Manifest | None = None, deadline: float | None = None) -> Path:
        """Download, verify and commit `step` as dest_root/step-XXXXXXXX, resuming an earlier partial pull
        (trainer/remote/pull.py says which error means what)."""
        return self._puller.pull(step, dest_root, manifest, deadline)

    def pull_newest(
        self, dest_root: Path, newer_than: Manifest | None = None, deadline: float | None = None
    ) -> tuple[int, Path] | None:
        """Pull the checkpoint committed last (committed after `newer_than`), falling back with a warning to the
        previous one when one is unusable; None if there is none."""
        manifests, problems = self.committed(deadline)
        for p in problems:
            log.warning("remote checkpoint skipped: %s", p)
        floor = None if newer_than is None else _newness(newer_than.step, newer_than)
        steps = [s for s in _newest_first(manifests) if floor is None or _newness(s, manifests[s]) > floor]
        return self._pull_first(steps, manifests, dest_root, deadline)

    def pull_latest(
        self, dest_root: Path, newer_than: int | None = None, deadline: float | None = None
    ) -> tuple[int, Path] | None:
        """Compatible form of pull_newest for callers that know a step: candidates above `newer_than`."""
        manifests, problems = self.committed(deadline)
        for p in problems:
            log.warning("remote checkpoint skipped: %s", p)
        steps = [s for s in _newest_first(manifests) if newer_than is None or s > newer_than]
        return self._pull_first(steps, manifests, dest_root, deadline)

    def download_checkpoint(self, step: int, dest_root: Path, deadline: float | None = None) -> Path:
        """Compatible form of pull()."""
        return self.pull(step, dest_root, deadline=deadline)

    def refresh_credentials(self) -> bool:
        """Ask the credential chain again after the store refused them (bounded like any call); True if the backend
        now signs with different credentials."""
        try:
            return bool(self.calls.call(self.objects.refresh_credentials, deadline=self.deadline()))
        except Exception as e:  # the next upload attempt says what is wrong
            log.debug("%s: refreshing credentials failed: %s", self.uri, e)
            return False

    def abort(self) -> None:
        """Make running and later operations stop at once with StorageUnavailable (used at shutdown)."""
        self.calls.abort()

    def close(self) -> None:
        self.objects.close()

    # ---------------------------------------------------------------- internals

    def _pull_first(
        self, steps: list[int], manifests: dict[int, Manifest], dest_root: Path, deadline: float | None
    ) -> tuple[int, Path] | None:
        for step in steps:
            try:
                return step, self.pull(step, dest_root, manifests[step], deadline)
            except CheckpointError as e:  # corrupt remotely, or this machine cannot write it: the previous one
                log.warning("remote checkpoint step %d is unusable (%s); falling back to the previous one", step, e)
        return None

    def _scan(self, deadline: float | None) -> Listing:
        keys = self.calls.retry(
            "listing of checkpoints",
            lambda b: self.calls.call(self.objects.list, f"{CHECKPOINTS_DIR}/", deadline=b.at),
            deadline,
        )
        return parse_listing(keys)

    def _manifests(self, steps, deadline: float | None) -> tuple[dict[int, Manifest], list[str]]:
        out, problems = {}, []
        self.untrusted_steps: list[int] = []  # the last listing's checkpoints refused by the signer
        for step in sorted(steps):
            try:
                m = self.get_manifest(step, deadline)
            except CheckpointError as e:  # corrupt, or a newer format: reported, never touched
                problems.append(str(e))
                continue
            where = f"{self.uri}/{manifest_rel(ckpt_rel(step))}"
            untrusted = self.signer.problem(m) if m is not None and self.signer is not None else None
            if m is not None and m.step != step:
                problems.append(f"{where}: not a valid manifest (says step {m.step})")
            elif untrusted:
                problems.append(f"{where}: {untrusted}")
                self.untrusted_steps.append(step)
            elif m is not None:
                out[step] = m
        return out, problems

    def _warn_once(self, problems: list[str]) -> None:
        for p in problems:
            if p not in self._warned:
                self._warned.add(p)
                log.warning("remote checkpoint left as it is: %s", p)

    def _archive_listed(self, step: int, manifest: Manifest, deadline: float | None) -> bool:
        try:
            self.archive_checkpoint(step, manifest, deadline)
            return True
        except CheckpointError as e:  # changed since it was listed: the next retention looks again
            log.warning("remote retention: %s", e)
            return False

    def _delete_listed(self, step: int, manifest: Manifest, deadline: float | None) -> bool:
        """Delete `step` only if it is still the checkpoint that was listed."""
        try:
            if self.get_manifest(step, deadline) != manifest:
                return False
        except CheckpointError:
            return False
        self.delete_checkpoint(step, deadline)
        return True

    def _make_room(self, step: int, raw: bytes, local: Manifest, b: Budget) -> None:
        """Before uploading `local` at `step`: set aside the different checkpoint committed there with `raw`."""
        rel = ckpt_rel(step)
        try:
            remote = Manifest.from_json(raw.decode("utf-8", "replace"), where=f"{self.uri}/{manifest_rel(rel)}")
        except UnsupportedCheckpoint:
            raise CheckpointError(
                f"{self.uri}/{rel}: holds a checkpoint in a newer spot-trainer's format; step "
                f"{step} not uploaded over it: upgrade spot-trainer, or move it aside"
            ) from None
        except CorruptCheckpoint as e:
            dst = self._archiver.quarantine(step, raw, b)
            log.warning("%s; moved to %s/%s before uploading step %d", e, self.uri, dst, step)
            return
        untrusted = self.signer.problem(remote) if self.signer is not None else None
        if untrusted:  # not replaced in place, even if it claims to be this checkpoint: kept for a person to look at
            dst = self._archiver.quarantine(step, raw, b)
            log.warning(
                "%s/%s: %s; moved to %s/%s before uploading step %d", self.uri, rel, untrusted, self.uri, dst, step
            )
            return
        if same_checkpoint(remote, local):  # an earlier write of this checkpoint: uncommit, then replace its files
            self.calls.call(self.objects.delete, [manifest_rel(rel)], deadline=b.at)
            return
        dst = self._archiver.archive(step, remote, raw, b)
        log.info(
            "remote step %d held run %s's checkpoint; archived to %s/%s before uploading run %s's",
            step,
            remote.run_id or "legacy",
            self.uri,
            dst,
            local.run_id or "legacy",
        )

    def _upload(
        self,
        local_dir: Path,
        rel: str,
        files: list[FileEntry],
        manifest_raw: bytes | None,
        deadline: float | None,
        make_room,
        stop: Callable[[], bool] | None = None,
    ) -> UploadResult:
        start, sent = time.monotonic(), None
        man_rel = manifest_rel(rel)

        def attempt(b: Budget) -> None:
            nonlocal sent
            self.calls.check_stop(b)
            for f in files:  # the local copy may have been pruned or damaged since it was committed
                p = local_dir / f.path
                if not p.is_file() or p.stat().st_size != f.size:
                    raise CheckpointError(f"{p}: missing or not the size its manifest says; not uploaded")
            if manifest_raw is not None:
                remote = self.calls.call(self.objects.read, man_rel, deadline=b.at)
                if remote == manifest_raw:
                    sent = [] if sent is None else sent
                    return
                if remote is not None and make_room is not None:
                    make_room(remote, b)
                elif remote is not None:  # a different upload of this dir: uncommit before replacing its files
                    self.calls.call(self.objects.delete, [man_rel], deadline=b.at)
            present = self.calls.call(self.objects.list, f"{rel}/", deadline=b.at)
            b.allow(sum(f.size for f in files))  # file:// hashes what is there: as long as moving it
            todo = []
            for f in files:
                self.calls.check_stop(b)
                if (
                    present.get(f"{rel}/{f.path}") != f.size
                    or self.calls.call(self.objects.sha256, f"{rel}/{f.path}", deadline=self.calls.sized(f.size, b))
                    != f.sha256
                ):
                    todo.append(f)
            sent = todo if sent is None else sent
            try:
                self.calls.transfer(
                    lambda wait: self.objects.put_files(
                        [(local_dir / f.path, f"{rel}/{f.path}", f.sha256) for f in todo], wait
                    ),
                    [(f"{rel}/{f.path}", f.size) for f in todo],
                    b,
                )
            except OSError as e:
                if e.filename is None or not Path(os.path.abspath(os.fsdecode(e.filename))).is_relative_to(
                    os.path.abspath(local_dir)
                ):
                    raise  # the remote side (a mounted directory): retried if transient
                raise CheckpointError(
                    f"{os.fsdecode(e.filename)}: cannot read it ({e.strerror or e}); not uploaded"
                ) from None
            self.calls.check_stop(b)  # every file is there; without the manifest none of them counts
            if manifest_raw is not None:
                self.calls.call(self.objects.write, man_rel, manifest_raw, sha256_bytes(manifest_raw), deadline=b.at)

        self.calls.retry(f"upload of {rel}", attempt, deadline, stop)
        return UploadResult(
            remote=f"{self.uri}/{rel}",
            step=None,
            seconds=time.monotonic() - start,
            bytes_uploaded=sum(f.size for f in sent),
            bytes_total=sum(f.size for f in files),
            files_uploaded=len(sent),
            files_skipped=len(files) - len(sent),
        )


def _newness(step: int, m: Manifest) -> tuple:
    """Order of commit, as lineage.newest has it: time, then commit number, then step."""
    return m.created_at, m.order, step


def _newest_first(manifests: dict[int, Manifest]) -> list[int]:
    return sorted(manifests, key=lambda s: _newness(s, manifests[s]), reverse=True)


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()
