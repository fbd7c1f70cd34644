"""The checkpoint manifest: every file with its size and sha256, written last.

A checkpoint directory (local or remote) without a valid `manifest.json` does not exist.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path

from trainer.durable import replace_file
from trainer.errors import CheckpointError
from trainer.run_dir import MANIFEST_NAME

FORMAT = "spot-trainer/checkpoint/v1"
_CHUNK = 16 * 1024 * 1024


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
class Manifest:
    step: int
    files: list[FileEntry]
    world_size: int = 1
    kind: str = "periodic"  # periodic | emergency | final
    created_at: float = field(default_factory=time.time)
    versions: dict = field(default_factory=dict)
    extra: dict = field(default_factory=dict)
    format: str = FORMAT

    @property
    def total_bytes(self) -> int:
        return sum(f.size for f in self.files)

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2, sort_keys=True) + "\n"

    @classmethod
    def from_json(cls, text: str, where: str = "manifest.json") -> "Manifest":
        try:
            d = json.loads(text)
            if d.get("format") != FORMAT:
                raise ValueError(f"unknown format {d.get('format')!r}")
            files = [FileEntry(**f) for f in d.pop("files")]
            return cls(files=files, **d)
        except (ValueError, TypeError, KeyError, AttributeError, RecursionError) as e:
            raise CheckpointError(f"{where}: not a valid manifest ({e})") from None

    @classmethod
    def load(cls, ckpt_dir: str | os.PathLike) -> "Manifest":
        p = Path(ckpt_dir) / MANIFEST_NAME
        try:
            text = p.read_bytes().decode("utf-8")
        except OSError as e:
            raise CheckpointError(f"{p}: cannot read manifest ({e.strerror})") from None
        except UnicodeDecodeError:
            raise CheckpointError(f"{p}: not a valid manifest (not UTF-8 text)") from None
        return cls.from_json(text, where=str(p))


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
    return sorted(p for p in ckpt_dir.rglob("*") if p.is_file() and p.name != MANIFEST_NAME
                  and not (p.parent == ckpt_dir and p.name.startswith(".")))


def _hash_all(paths: list[Path]) -> list[str]:
    """sha256 of several files at once (hashlib releases the GIL, so threads use several cores)."""
    if len(paths) <= 1:
        return [sha256_file(p) for p in paths]
    with ThreadPoolExecutor(max_workers=min(8, len(paths), os.cpu_count() or 1)) as pool:
        return list(pool.map(sha256_file, paths))


def build_manifest(ckpt_dir: str | os.PathLike, step: int, known: dict[str, tuple[int, str]] | None = None,
                   **meta) -> Manifest:
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
    entries = [FileEntry(path=r, size=size, sha256=known[r][1] if r in known else hashed[p])
               for p, r, size in zip(paths, rel, sizes)]
    return Manifest(step=step, files=entries, versions=library_versions(), **meta)


def write_manifest(ckpt_dir: str | os.PathLike, manifest: Manifest) -> None:
    """Write manifest.json durably: temp file, fsync, rename, fsync the dir."""
    replace_file(Path(ckpt_dir) / MANIFEST_NAME, manifest.to_json().encode())


def verify(ckpt_dir: str | os.PathLike, deep: bool = True) -> list[str]:
    """Problems with a checkpoint dir (empty list = valid). `deep` re-hashes every file."""
    ckpt_dir = Path(ckpt_dir)
    try:
        m = Manifest.load(ckpt_dir)
    except CheckpointError as e:
        return [str(e)]
    problems, to_hash = [], []
    for f in m.files:
        p = ckpt_dir / f.path
        if not p.is_file():
            problems.append(f"{p}: missing")
        elif p.stat().st_size != f.size:
            problems.append(f"{p}: size {p.stat().st_size} != {f.size} in manifest")
        elif deep:
            to_hash.append((p, f.sha256))
    for (p, want), got in zip(to_hash, _hash_all([p for p, _ in to_hash])):
        if got != want:
            problems.append(f"{p}: sha256 does not match the manifest")
    return problems
