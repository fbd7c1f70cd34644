"""The checkpoint manifest: every file with its size and sha256, written last.

A checkpoint directory (local or remote) without a valid `manifest.json` does not exist.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING

from trainer.durable import replace_file
from trainer.errors import CheckpointError, CorruptCheckpoint, UnsupportedCheckpoint
from trainer.run_dir import MANIFEST_NAME

if TYPE_CHECKING:
    from trainer.checkpoint.signing import Signer

FORMAT_VERSION = 1  # lineage fields were added in v1 with defaults: readers of v1 ignore what they do not know
FORMAT = f"spot-trainer/checkpoint/v{FORMAT_VERSION}"
_FORMAT_RE = re.compile(r"spot-trainer/checkpoint/v(\d{1,6})")
RUN_ID_RE = re.compile(r"[A-Za-z0-9_-]{1,64}")  # also a directory name under checkpoints/archived/
_CHUNK = 16 * 1024 * 1024
MAX_BYTES = 1 << 50  # 1 PiB: a manifest declaring more (one file or all of them) is not a checkpoint but a forgery


def sha256_file(path: str | os.PathLike) -> str:
    """Hex sha256 of a file, read in chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


@dataclass
class FileEntry:
    path: str  # relative, '/'-separated
    size: int
    sha256: str


@dataclass
class Parent:
    """The checkpoint a checkpoint descends from (resumed from, or the previous one of the same run)."""

    run_id: str | None  # None: written by a version without lineage
    step: int


@dataclass
class Manifest:
    step: int
    files: list[FileEntry]
    world_size: int = 1
    kind: str = "periodic"  # periodic | emergency | final | export
    created_at: float = field(default_factory=time.time)
    versions: dict = field(default_factory=dict)
    extra: dict = field(default_factory=dict)
    format: str = FORMAT
    # lineage (None in checkpoints of earlier versions): the run segment that wrote it, the commit number along
    # its lineage, and the checkpoint it descends from
    run_id: str | None = None
    seq: int | None = None
    parent: Parent | None = None
    # checkpoint.sign_key_env: {"alg": "hmac-sha256", "key_id", "value"} over every other field (signing.py)
    signature: dict | None = None
    unknown: dict = field(default_factory=dict)  # fields of a newer version: kept (written back), not used

    @property
    def total_bytes(self) -> int:
        return sum(f.size for f in self.files)

    @property
    def order(self) -> int:
        """Position along its lineage: the commit number, or the step for checkpoints without lineage."""
        return self.seq if self.seq is not None else self.step

    def _dict(self) -> dict:
        d = {**self.unknown, **asdict(self)}
        del d["unknown"]
        for key in ("run_id", "seq", "parent", "signature"):  # checkpoints without them stay byte-identical
            if d[key] is None:
                del d[key]
        return d

    def to_json(self) -> str:
        return json.dumps(self._dict(), indent=2, sort_keys=True) + "\n"

    def canonical(self) -> bytes:
        """What a signature covers: every field but the signature, as compact JSON with sorted keys."""
        d = self._dict()
        d.pop("signature", None)
        return json.dumps(d, sort_keys=True, separators=(",", ":")).encode()

    @classmethod
    def from_json(cls, text: str, where: str = "manifest.json") -> Manifest:
        """Parse and check every field (a manifest may come from a bucket someone else can write)."""
        try:
            d = json.loads(text)
        except (ValueError, RecursionError) as e:
            raise CorruptCheckpoint(f"{where}: not a valid manifest (not JSON: {e})") from None
        if not isinstance(d, dict):
            raise CorruptCheckpoint(f"{where}: not a valid manifest (not a JSON object)")
        fmt = d.get("format")
        version = _format_version(fmt)
        if version is None:
            raise CorruptCheckpoint(f"{where}: not a valid manifest (format {fmt!r})")
        if version > FORMAT_VERSION:
            raise UnsupportedCheckpoint(
                f"{where}: written in format v{version} by a newer spot-trainer; this version "
                f"reads v{FORMAT_VERSION}: upgrade spot-trainer to resume it (kept as it is)"
            )
        try:
            return cls._from_dict(d)
        except (ValueError, TypeError, KeyError) as e:
            raise CorruptCheckpoint(f"{where}: not a valid manifest ({e})") from None

    @classmethod
    def _from_dict(cls, d: dict) -> Manifest:
        known = {f.name for f in fields(cls)} - {"unknown"}
        files = d["files"]
        if not isinstance(files, list):
            raise TypeError("'files' is not a list")
        entries = []
        for f in files:
            if not isinstance(f, dict) or set(f) - {"path", "size", "sha256"}:
                raise TypeError(f"file entry {f!r} is not {{path, size, sha256}}")
            entries.append(FileEntry(_safe_rel(f["path"]), _count(f["size"], "size"), _sha256(f["sha256"])))
        if sum(e.size for e in entries) > MAX_BYTES:
            raise ValueError(f"its files declare {sum(e.size for e in entries)} bytes, more than any checkpoint")
        parent = d.get("parent")
        if parent is not None:
            if not isinstance(parent, dict):
                raise TypeError("'parent' is not an object")
            parent = Parent(_run_id(parent.get("run_id"), allow_none=True), _count(parent.get("step"), "parent step"))
        return cls(
            step=_count(d["step"], "step"),
            files=entries,
            world_size=_count(d.get("world_size", 1), "world_size"),
            kind=_text(d.get("kind", "periodic"), "kind"),
            created_at=_number(d.get("created_at", 0.0)),
            versions=_mapping(d.get("versions", {}), "versions"),
            extra=_mapping(d.get("extra", {}), "extra"),
            format=d["format"],
            run_id=_run_id(d.get("run_id"), allow_none=True),
            seq=None if d.get("seq") is None else _count(d["seq"], "seq"),
            parent=parent,
            signature=_signature(d.get("signature")),
            unknown={k: v for k, v in d.items() if k not in known},
        )

    @classmethod
    def load(cls, ckpt_dir: str | os.PathLike) -> Manifest:
        p = Path(ckpt_dir) / MANIFEST_NAME
        try:
            text = _read_text(p)
        except OSError as e:
            raise CheckpointError(f"{p}: cannot read manifest ({e.strerror})") from None
        return cls.from_json(text, where=str(p))


def _format_version(fmt: object) -> int | None:
    m = _FORMAT_RE.fullmatch(fmt) if isinstance(fmt, str) else None
    return int(m.group(1)) if m else None


def _safe_rel(path: object) -> str:
    """A relative '/'-separated path inside the checkpoint: no absolute path, no '..', no empty part."""
    if not isinstance(path, str) or not path or "\\" in path or "\x00" in path:
        raise ValueError(f"file path {path!r} is not a relative path")
    p = PurePosixPath(path)
    if p.is_absolute() or any(part in ("", ".", "..") for part in path.split("/")):
        raise ValueError(f"file path {path!r} is unsafe")
    return path


def _count(value: object, what: str) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise ValueError(f"{what} {value!r} is not a non-negative integer")
    return value


def _number(value: object) -> float:
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        raise ValueError(f"created_at {value!r} is not a number")
    return float(value)


def _text(value: object, what: str) -> str:
    if not isinstance(value, str):
        raise ValueError(f"{what} {value!r} is not a string")
    return value


def _mapping(value: object, what: str) -> dict:
    if not isinstance(value, dict):
        raise ValueError(f"{what} is not an object")
    return value


def _signature(value: object) -> dict | None:
    if value is None:
        return None
    if not isinstance(value, dict) or set(value) != {"alg", "key_id", "value"}:
        raise ValueError("'signature' is not {alg, key_id, value}")
    if not all(isinstance(v, str) and len(v) <= 256 for v in value.values()):
        raise ValueError("'signature' fields are not short strings")
    return dict(value)


def _sha256(value: object) -> str:
    if not isinstance(value, str) or not re.fullmatch(r"[0-9a-f]{64}", value):
        raise ValueError(f"sha256 {value!r} is not 64 hex digits")
    return value


def _run_id(value: object, allow_none: bool = False) -> str | None:
    if value is None and allow_none:
        return None
    if not isinstance(value, str) or not RUN_ID_RE.fullmatch(value):
        raise ValueError(f"run_id {value!r} is not 1-64 letters, digits, '-' or '_'")
    return value


def new_run_id() -> str:
    """A fresh run id: new at every fresh start and at every branch (a resume from a checkpoint that was not the
    newest of its lineage)."""
    import uuid

    return uuid.uuid4().hex[:12]


def library_versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for name in ("spot-trainer", "torch", "transformers", "peft", "accelerate", "deepspeed", "bitsandbytes"):
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            pass
    return out


def list_files(ckpt_dir: Path) -> list[Path]:
    """Every regular file under the dir except the manifest, sorted."""
    return sorted(
        p
        for p in ckpt_dir.rglob("*")
        if p.is_file() and p.name != MANIFEST_NAME and not (p.parent == ckpt_dir and p.name.startswith("."))
    )


def _hash_all(paths: list[Path]) -> list[str]:
    """sha256 of several files at once (hashlib releases the GIL, so threads use several cores)."""
    if len(paths) <= 1:
        return [sha256_file(p) for p in paths]
    with ThreadPoolExecutor(max_workers=min(8, len(paths), os.cpu_count() or 1)) as pool:
        return list(pool.map(sha256_file, paths))


def build_manifest(
    ckpt_dir: str | os.PathLike, step: int, known: dict[str, tuple[int, str]] | None = None, **meta
) -> Manifest:
    """Every file in the dir into a Manifest (does not write it).

    `known` maps relative paths to (size, sha256) computed while they were written; those are not read back
    (their size is still checked against the disk). Every other file is hashed here.
    """
    ckpt_dir = Path(ckpt_dir)
    known = known or {}
    paths = list_files(ckpt_dir)
    rel = [p.relative_to(ckpt_dir).as_posix() for p in paths]
    sizes = [p.stat().st_size for p in paths]
    for r, size in zip(rel, sizes):
        if r in known and known[r][0] != size:
            raise CheckpointError(f"{ckpt_dir / r}: {size} bytes on disk, {known[r][0]} written; the disk lost data")
    todo = [p for p, r in zip(paths, rel) if r not in known]
    hashed = dict(zip(todo, _hash_all(todo)))
    entries = [
        FileEntry(path=r, size=size, sha256=known[r][1] if r in known else hashed[p])
        for p, r, size in zip(paths, rel, sizes)
    ]
    return Manifest(step=step, files=entries, versions=library_versions(), **meta)


def write_manifest(ckpt_dir: str | os.PathLike, manifest: Manifest) -> None:
    """Write manifest.json durably: temp file, fsync, rename, fsync the dir."""
    replace_file(Path(ckpt_dir) / MANIFEST_NAME, manifest.to_json().encode())


@dataclass
class Verdict:
    """What checking a checkpoint dir found. Only `corrupt` (verified damage) may move it aside; a read error or a
    newer format never does."""

    problems: list[str] = field(default_factory=list)
    corrupt: bool = False  # a file's size or sha256 differs from the manifest, a file is missing, a bad manifest
    unsupported: bool = False  # a newer version's format
    uncommitted: bool = False  # no manifest.json: an unfinished write, not a checkpoint
    untrusted: bool = False  # signing is on and its signature is missing or does not verify: skipped, kept
    manifest: Manifest | None = None

    @property
    def ok(self) -> bool:
        return not self.problems


READ_RETRIES = 3  # a read error (EIO, ESTALE on a network volume) is tried again before it is reported


def check(
    ckpt_dir: str | os.PathLike, deep: bool = True, retry_delay_s: float = 0.5, signer: Signer | None = None
) -> Verdict:
    """Check a checkpoint dir against its manifest; `deep` re-hashes every file; with a `signer`
    (checkpoint.sign_key_env) the manifest's signature must verify too."""
    ckpt_dir = Path(ckpt_dir)
    for attempt in range(READ_RETRIES):
        try:
            return _check(ckpt_dir, deep, signer)
        except OSError as e:  # not a verdict about the checkpoint: the disk could not be read now
            if attempt == READ_RETRIES - 1:
                return Verdict(
                    [f"{ckpt_dir}: cannot read ({e.strerror or e}); tried {READ_RETRIES} times, kept as it is"]
                )
            time.sleep(retry_delay_s * (attempt + 1))
    raise AssertionError("unreachable")


def _check(ckpt_dir: Path, deep: bool, signer: Signer | None) -> Verdict:
    if not (ckpt_dir / MANIFEST_NAME).is_file():
        return Verdict([f"{ckpt_dir}: no {MANIFEST_NAME} (not committed)"], uncommitted=True)
    try:
        m = Manifest.from_json(_read_text(ckpt_dir / MANIFEST_NAME), where=str(ckpt_dir / MANIFEST_NAME))
    except UnsupportedCheckpoint as e:
        return Verdict([str(e)], unsupported=True)
    except CorruptCheckpoint as e:
        return Verdict([str(e)], corrupt=True)
    untrusted = signer.problem(m) if signer is not None else None
    if untrusted:  # before any hashing: nothing it says is worth reading
        return Verdict([f"{ckpt_dir / MANIFEST_NAME}: {untrusted}"], untrusted=True, manifest=m)
    problems, to_hash = [], []
    for f in m.files:
        p = ckpt_dir / f.path
        if not p.is_file():
            problems.append(f"{p}: missing")
        elif p.stat().st_size != f.size:
            problems.append(f"{p}: size {p.stat().st_size} != {f.size} in manifest")
        elif deep:
            to_hash.append((p, f.sha256))
    for (p, want), got in zip(to_hash, _hash_all([p for p, _ in to_hash]), strict=True):
        if got != want:
            problems.append(f"{p}: sha256 does not match the manifest")
    return Verdict(problems, corrupt=bool(problems), manifest=m)


def _read_text(path: Path) -> str:
    data = path.read_bytes()  # OSError: a read error, retried by check()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        raise CorruptCheckpoint(f"{path}: not a valid manifest (not UTF-8 text)") from None


def verify(ckpt_dir: str | os.PathLike, deep: bool = True, signer: Signer | None = None) -> list[str]:
    """Problems with a checkpoint dir (empty list = valid). `deep` re-hashes every file; `signer`: see check()."""
    return check(ckpt_dir, deep, signer=signer).problems
