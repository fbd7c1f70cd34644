"""Pulling one remote checkpoint into a local checkpoints dir: resumable, checked for room first, verified, committed
last.

The bytes land in `<dest>/.pull-step-XXXXXXXX/`, a name that stays the same across restarts and is never removed on
failure (the trainer's clean-up removes only `.tmp-step-*`): a pull that failed or was killed goes on where it
stopped, and files whose size and sha256 already match are not downloaded again. Only a complete, verified copy gets
its manifest and is renamed to `<dest>/step-XXXXXXXX`.

Nothing is downloaded before the manifest was checked: its signature (with checkpoint.sign_key_env), its declared
sizes against the objects' and against the free space here. Errors say what to do next: `InsufficientSpace`
(exit 69) when it does not fit; `UntrustedCheckpoint` when it is not signed with the key; `CorruptCheckpoint` for
a bad or missing remote object; `CheckpointError` naming the local path when this machine cannot write it (the
caller tries the previous checkpoint); `StorageUnavailable` when the remote kept failing until the deadline.
"""

from __future__ import annotations

import errno
import os
import shutil
from pathlib import Path

from trainer.checkpoint.manifest import FileEntry, Manifest, sha256_file
from trainer.durable import fsync_dir, write_file
from trainer.errors import CheckpointError, CorruptCheckpoint, UntrustedCheckpoint
from trainer.remote.calls import Budget, Calls
from trainer.remote.objects import InsufficientSpace, Missing, ObjectStore
from trainer.run_dir import CHECKPOINTS_DIR, MANIFEST_NAME, PULL_PREFIX, step_dirname

_BLOCK = 4096  # a file takes whole blocks on disk
_NO_SPACE = {errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC)}


def same_checkpoint(a: Manifest, b: Manifest) -> bool:
    """The same lineage entry (run id and step: a rewrite of one checkpoint), or the very same files."""
    return a.step == b.step and ((a.run_id is not None and a.run_id == b.run_id) or a.files == b.files)


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


def pull_dir(dest_root: Path, step: int) -> Path:
    """Where a pull of `step` into dest_root collects its files until it is complete."""
    return Path(dest_root) / f"{PULL_PREFIX}{step_dirname(step)}"


class Puller:
    """Downloads committed checkpoints of one remote store."""

    def __init__(self, uri: str, objects: ObjectStore, calls: Calls, signer=None):
        self.uri, self.objects, self.calls, self.signer = uri, objects, calls, signer

    def pull(self, step: int, dest_root: Path, manifest: Manifest | None = None, deadline: float | None = None) -> Path:
        """Download, verify and commit `step` as dest_root/step-XXXXXXXX (see the module docstring)."""
        dest_root = Path(dest_root)
        rel = f"{CHECKPOINTS_DIR}/{step_dirname(step)}"
        where = f"{self.uri}/{rel}"

        def attempt(budget: Budget) -> Path:
            raw = self.calls.call(self.objects.read, f"{rel}/{MANIFEST_NAME}", deadline=budget.at)
            if raw is None:
                raise CheckpointError(f"{where}/{MANIFEST_NAME}: missing (the checkpoint is not committed remotely)")
            found = Manifest.from_json(raw.decode("utf-8", "replace"), where=f"{where}/{MANIFEST_NAME}")
            if found.step != step:
                raise CorruptCheckpoint(f"{where}/{MANIFEST_NAME}: says step {found.step}")
            untrusted = self.signer.problem(found) if self.signer is not None else None
            if untrusted:
                raise UntrustedCheckpoint(f"{where}/{MANIFEST_NAME}: {untrusted}")
            if manifest is not None and found != manifest:
                raise CheckpointError(
                    f"{where}: changed remotely since it was listed (another writer, or it was "
                    f"archived and replaced); list the remote again"
                )
            work = pull_dir(dest_root, step)
            try:
                return self._fetch(where, rel, found, raw, dest_root, work, budget)
            except OSError as e:
                local = self._local_error(e, where, found, dest_root, work)
                if local is None:
                    raise
                raise local from None

        return self.calls.retry(f"download of {rel}", attempt, deadline)

    # ---------------------------------------------------------------- one attempt

    def _fetch(
        self, where: str, rel: str, m: Manifest, raw: bytes, dest_root: Path, work: Path, budget: Budget
    ) -> Path:
        final = dest_root / step_dirname(m.step)
        self._check_destination(final, m, where)
        work.mkdir(parents=True, exist_ok=True)
        _tidy(work, m)
        todo = [f for f in m.files if not _have(work / f.path, f)]
        self._check_sizes(where, rel, todo, budget)
        needed = sum(_on_disk(f.size) for f in todo) + _on_disk(len(raw))
        free = shutil.disk_usage(work).free
        if needed > free:
            raise _no_room(where, m.step, dest_root, needed, free, "needs")
        for f in todo:
            (work / f.path).parent.mkdir(parents=True, exist_ok=True)
        try:
            self.calls.transfer(
                lambda wait: self.objects.get_files([(f"{rel}/{f.path}", work / f.path) for f in todo], wait),
                [(f"{rel}/{f.path}", f.size) for f in todo],
                budget,
            )
        except Missing as e:
            raise CorruptCheckpoint(f"{self.uri}/{e.args[0]}: missing from the remote checkpoint") from None
        for f in todo:
            p = work / f.path
            if p.stat().st_size != f.size or sha256_file(p) != f.sha256:
                p.unlink()  # a bad copy is not kept for the next attempt
                raise CorruptCheckpoint(f"{where}/{f.path}: sha256 does not match the manifest (corrupt object)")
            with open(p, "rb") as fh:
                os.fsync(fh.fileno())
        write_file(work / MANIFEST_NAME, raw)  # last: the copy counts only when complete
        for d in sorted({(work / f.path).parent for f in m.files} | {work}, key=lambda p: -len(p.parts)):
            fsync_dir(d)
        if final.exists():  # an uncommitted leftover, or an older copy of this same checkpoint
            (final / MANIFEST_NAME).unlink(missing_ok=True)
            shutil.rmtree(final)
        os.replace(work, final)
        fsync_dir(dest_root)
        return final

    def _check_sizes(self, where: str, rel: str, todo: list[FileEntry], budget: Budget) -> None:
        """An object bigger or smaller than its manifest says is refused before it is downloaded: the free-space
        check trusts the declared sizes, so an object must not be able to bring more bytes than that."""
        if not todo:
            return
        present = self.calls.call(self.objects.list, f"{rel}/", deadline=budget.at)
        for f in todo:
            size = present.get(f"{rel}/{f.path}")
            if size is not None and size != f.size:  # a missing one is reported by the download
                raise CorruptCheckpoint(
                    f"{where}/{f.path}: {size} bytes remotely, its manifest says {f.size} (corrupt object)"
                )

    def _check_destination(self, final: Path, m: Manifest, where: str) -> None:
        """A committed local checkpoint of another lineage at the same step is never replaced by a pull."""
        if not (final / MANIFEST_NAME).exists():
            return
        try:
            local = Manifest.load(final)
        except CheckpointError as e:
            local, why = None, f"its manifest does not read ({e})"
        else:
            why = f"it is run {local.run_id or 'legacy'} step {local.step}, the remote one run {m.run_id or 'legacy'}"
        if local is None or not same_checkpoint(local, m):
            raise CheckpointError(
                f"{final}: holds another committed checkpoint ({why}); {where} not pulled over "
                f"it: archive or move it aside first, or pull into another --output-dir"
            )

    def _local_error(
        self, e: OSError, where: str, m: Manifest, dest_root: Path, work: Path
    ) -> CheckpointError | InsufficientSpace | None:
        """What a local write error means; None for errors of the remote side (retried)."""
        if e.errno in _NO_SPACE:
            have = sum(f.size for f in m.files if (work / f.path).is_file())
            free = shutil.disk_usage(dest_root).free
            return _no_room(where, m.step, dest_root, max(0, m.total_bytes - have), free, "ran out of space: it needs")
        path = e.filename
        final = dest_root / step_dirname(m.step)
        if isinstance(path, (str, bytes, os.PathLike)) and _inside(Path(os.fsdecode(path)), (work, final)):
            return CheckpointError(
                f"{os.fsdecode(path)}: cannot write it ({e.strerror or e}); {where} not pulled: "
                f"fix or remove that path, or pull into another --output-dir"
            )
        return None


def _no_room(where: str, step: int, dest_root: Path, needed: int, free: int, verb: str) -> InsufficientSpace:
    others = [p for p in dest_root.glob(f"{PULL_PREFIX}step-*") if p.is_dir() and p != pull_dir(dest_root, step)]
    held = sum(_size(p) for p in others)
    hint = f"; unfinished pulls of other steps ({PULL_PREFIX}step-*) hold {human_bytes(held)}" if held else ""
    return InsufficientSpace(
        f"pulling {where} {verb} {human_bytes(needed)}, {human_bytes(free)} free on {_filesystem(dest_root)} "
        f"({dest_root}{hint}): free space or point --output-dir at a larger disk; nothing was deleted",
        needed=needed,
        free=free,
    )


def _inside(p: Path, roots: tuple[Path, ...]) -> bool:
    p = Path(os.path.abspath(p))
    return any(p == r or r in p.parents for r in (Path(os.path.abspath(x)) for x in roots))


def _on_disk(n: int) -> int:
    return -(-n // _BLOCK) * _BLOCK + _BLOCK  # whole blocks, and one for the inode's share


def _have(p: Path, f: FileEntry) -> bool:
    """Already pulled by an earlier attempt: same size and sha256."""
    return not p.is_symlink() and p.is_file() and p.stat().st_size == f.size and sha256_file(p) == f.sha256


def _tidy(work: Path, m: Manifest) -> None:
    """Remove from the pull dir what this manifest does not list (temp files of a killed transfer, the files of
    another checkpoint that was pulled there before, a directory where a file goes): it is scratch space."""
    files = {f.path for f in m.files}
    dirs = {str(parent) for f in m.files for parent in Path(f.path).parents if str(parent) != "."}
    for p in sorted(work.rglob("*"), key=lambda x: -len(x.parts)):
        r = p.relative_to(work).as_posix()
        if p.is_dir() and not p.is_symlink():
            if r not in dirs:
                shutil.rmtree(p)
        elif r not in files:
            p.unlink()


def _size(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def _filesystem(path: Path) -> str:
    """The device a path lives on, from /proc/self/mounts (the longest mount point above it)."""
    path = os.path.realpath(path)
    best, source = "", "its filesystem"
    try:
        with open("/proc/self/mounts") as f:
            for line in f:
                parts = line.split()
                if len(parts) >= 2:
                    mount = parts[1].replace("\\040", " ")
                    if (path == mount or path.startswith(mount.rstrip("/") + "/")) and len(mount) >= len(best):
                        best, source = mount, parts[0]
    except OSError:
        pass
    return source
