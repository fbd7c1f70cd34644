"""`model.mirror`: a copy of the base model in the run's remote, so a fresh pod starts from the bucket, not the hub.

Layout: `<remote>/base-model/<fingerprint>/` holds the model dir's files (config.json, safetensors shards, tokenizer
files) and a `manifest.json` (every file's size and sha256, kind "base-model", signed with checkpoint.sign_key_env)
written last. The fingerprint is a function of the config alone (model.name_or_path; for the built-in model its
shape and train.seed), so a fresh pod that has no model dir can compute it, and another base model never matches.

Rank 0, before the data and the model are set up: if the model is not on this disk and the mirror exists, it is
downloaded into `<output_dir>/base-model/` (every file checked by sha256; any mismatch refuses the mirror with one
line and the run goes on the normal way: hub, local dir or built-in init; nothing is deleted remotely), while the
newest remote checkpoint is pulled at the same time in another thread. If the mirror does not exist yet, the model
is loaded as usual and uploaded in the background; a failure there is one warning.

`model.mirror_4bit` (QLoRA, 4-bit): the mirror holds the base model as bitsandbytes serializes it once quantized
(uint8 weights with their quantization state, the rest in the load dtype: about a third of the bytes of bf16), under
a fingerprint of its own that also names the quantization settings and the bitsandbytes version. The first pod
saves that copy right after loading (before LoRA touches the model; `.base-model-4bit/`, removed once uploaded) and
uploads it in the background; a fresh pod downloads it and loads it without quantizing again, to the same weights
bit for bit.

Only safetensors, JSON and text (tokenizer) files are mirrored or accepted from the bucket: nothing is unpickled,
no code is fetched (a model that needs trust_remote_code is not mirrored).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import re
import shutil
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path, PurePosixPath

from trainer import model as model_lib
from trainer.checkpoint.manifest import Manifest, build_manifest, sha256_file
from trainer.config.schema import Config
from trainer.durable import fsync_dir, write_file
from trainer.errors import CheckpointError, SpotTrainerError
from trainer.remote.calls import Budget
from trainer.remote.objects import Missing, one_line
from trainer.remote.store import RemoteStore
from trainer.run_dir import MANIFEST_NAME, RunDir

log = logging.getLogger(__name__)

MIRROR_ROOT = "base-model"
KIND = "base-model"
PULL_DIR = ".base-model-pull"  # a partial download; kept across restarts, files that verify are not fetched again
STAGE_4BIT = ".base-model-4bit"  # model.mirror_4bit: the quantized copy saved for the upload
STAGE_MARGIN = 4 << 30  # free bytes left after that copy (checkpoints still fit)
ALLOWED_SUFFIXES = (".safetensors", ".json", ".txt", ".model", ".jinja")  # no pickles (.bin/.pt), no code (.py)


def fingerprint(cfg: Config) -> str:
    """What ties a mirror to its base model, from the config only (a fresh pod has no model files to hash)."""
    ident: dict = {"name_or_path": cfg.model.name_or_path}
    if model_lib.is_builtin(cfg):  # its random init is a function of its shape and the seed
        ident["builtin"] = dataclasses.asdict(cfg.model.builtin)
        ident["seed"] = cfg.train.seed
    suffix = ""
    if cfg.model.mirror_4bit:  # another copy: the quantized weights, tied to how they were quantized
        q = cfg.quant
        ident["4bit"] = [q.quant_type, q.double_quant, *_resolved_dtypes(cfg), _version("bitsandbytes")]
        ident["4bit"].append(_version("transformers"))  # the copy's format is what its loader reads
        suffix = f"-{q.quant_type}"
    digest = hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()[:16]
    slug = re.sub(r"[^A-Za-z0-9._-]+", "-", cfg.model.name_or_path).strip("-.")[-48:] or "model"
    return f"{slug}-{digest}{suffix}"


def _version(package: str) -> str:
    """A package's major.minor (its quantization or its format could change between them), without importing it."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return ".".join(version(package).split(".")[:2])
    except PackageNotFoundError:
        return "none"


def _resolved_dtypes(cfg: Config) -> list[str]:
    """model.dtype and quant.compute_dtype as this machine resolves them ("auto": bf16 on a GPU that has it, fp32
    on a CPU): a copy saved on one kind of machine keeps its dtypes, so another kind gets a copy of its own."""
    import torch

    kind = cfg.train.device if cfg.train.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(kind)
    return [
        str(model_lib.resolve_dtype(cfg.model.dtype, device)),
        str(model_lib.resolve_dtype(cfg.quant.compute_dtype, device)),
    ]


def mirror_rel(cfg: Config) -> str:
    return f"{MIRROR_ROOT}/{fingerprint(cfg)}"


def accepted(rel: str) -> bool:
    """A file of a model dir that may go to or come from the mirror: weights as safetensors, configs, tokenizer."""
    parts = PurePosixPath(rel).parts
    return not any(p.startswith(".") for p in parts) and rel.endswith(ALLOWED_SUFFIXES)


def local_model_dir(cfg: Config, run: RunDir) -> Path | None:
    """The base model's files on this disk (built-in init, local dir, hub cache), or None when they are not here."""
    if model_lib.is_builtin(cfg):
        return run.base_model if (run.base_model / "config.json").is_file() else None
    path = Path(cfg.model.name_or_path).expanduser()
    if path.is_dir():
        return path if (path / "config.json").is_file() else None
    try:  # a hub id: only the local cache is asked (local_files_only), never the network
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(cfg.model.name_or_path, local_files_only=True))
    except Exception:  # not cached, or not a hub id at all
        return None


def mirrored_copy(cfg: Config, run: RunDir) -> Path | None:
    """The verified mirror copy in this output dir for this base model, if a download completed."""
    dest = run.base_model
    try:
        m = Manifest.load(dest)
    except SpotTrainerError:
        return None
    return dest if m.kind == KIND and m.extra.get("fingerprint") == fingerprint(cfg) else None


def model_config_for_load(cfg: Config, run: RunDir) -> Config:
    """The config the tokenizer and model load from: the original, or (its files missing here) the mirror copy.
    Only the load is pointed there: checkpoints keep the configured model.name_or_path."""
    if model_lib.is_builtin(cfg) or local_model_dir(cfg, run) is not None:
        return cfg  # the built-in model loads from <output_dir>/base-model/ anyway, where the mirror lands
    copy = mirrored_copy(cfg, run)
    if copy is None:
        return cfg
    return dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, name_or_path=str(copy)))


def config_only_in_mirror(cfg: Config, run: RunDir) -> bool:
    """model.mirror on a fresh pod: the model's config.json is neither here nor known by name (plan/tables.py), so
    the memory pre-flight cannot read it before the mirror is downloaded; it is skipped with a warning then."""
    from trainer.plan.tables import known_model_config

    if not cfg.model.mirror or model_lib.is_builtin(cfg) or local_model_dir(cfg, run) is not None:
        return False
    if mirrored_copy(cfg, run) is not None or known_model_config(cfg.model.name_or_path) is not None:
        return False
    log.warning(
        "model.mirror: %s is not on this disk and not a known model: memory pre-flight skipped (its config.json "
        "comes from the bucket)",
        cfg.model.name_or_path,
    )
    return True


class ModelMirror:
    """Rank 0's base-model mirror: download (with the checkpoint prefetch beside it) or background upload."""

    def __init__(
        self, cfg: Config, run: RunDir, remote: RemoteStore, say: Callable[[str], None], prefetch: bool = True
    ):
        self.cfg, self.run, self.remote, self.say, self.prefetch = cfg, run, remote, say, prefetch
        self.rel = mirror_rel(cfg)
        self.where = f"{remote.uri}/{self.rel}"
        self._prefetch: threading.Thread | None = None
        self._upload: threading.Thread | None = None
        self.fetched = False
        self._staged = False  # stage_4bit saved the 4-bit copy in this process
        self._raw = b""  # the mirror's manifest.json as read, written into the local copy last

    # ---------------------------------------------------------------- fresh pod: download

    def fetch(self, resume_mode: str) -> bool:
        """If the model is not on this disk: pull the newest checkpoint in a thread and the mirror here; True if the
        mirror copy is now in <output_dir>/base-model/ (False: the normal path loads the model)."""
        if local_model_dir(self.cfg, self.run) is not None or mirrored_copy(self.cfg, self.run) is not None:
            shutil.rmtree(self.run.root / PULL_DIR, ignore_errors=True)  # a refused download's leftovers
            return False
        if self.prefetch and resume_mode == "auto" and not self.run.committed_steps():
            self._prefetch = threading.Thread(target=self._prefetch_checkpoint, name="checkpoint-prefetch", daemon=True)
            self._prefetch.start()
        try:
            self.fetched = self._download()
        except (SpotTrainerError, OSError) as e:  # unreachable, refused, corrupt: the normal path
            log.warning("base model mirror %s not used (%s); loading the model the normal way", self.where, e)
            self.fetched = False
        return self.fetched

    def wait_prefetch(self) -> None:
        """Until the checkpoint pulled beside the mirror is committed here (or failed: resume then tries itself)."""
        if self._prefetch is not None:
            self._prefetch.join()
            self._prefetch = None

    def _prefetch_checkpoint(self) -> None:
        try:
            got = self.remote.pull_newest(self.run.checkpoints)
            if got is not None:
                self.say(f"pulled checkpoint step {got[0]} from {self.remote.uri} beside the base model")
        except Exception as e:  # resume() pulls (and reports) again, resuming what this one fetched
            log.info("checkpoint prefetch stopped (%s); the resume pulls it", one_line(e))

    def _read_manifest(self) -> Manifest | None:
        rel = f"{self.rel}/{MANIFEST_NAME}"
        raw = self.remote.calls.retry(
            f"read of {rel}", lambda b: self.remote.calls.call(self.remote.objects.read, rel, deadline=b.at), None
        )
        if raw is None:
            return None
        m = Manifest.from_json(raw.decode("utf-8", "replace"), where=f"{self.remote.uri}/{rel}")
        self._raw = raw
        problem = self._problem(m)
        if problem:
            raise CheckpointError(f"{self.remote.uri}/{rel}: {problem}")
        return m

    def _problem(self, m: Manifest) -> str | None:
        if m.kind != KIND or m.extra.get("fingerprint") != fingerprint(self.cfg):
            return f"not the mirror of {self.cfg.model.name_or_path} (kind {m.kind!r})"
        signer = self.remote.signer
        untrusted = signer.problem(m) if signer is not None else None
        if untrusted:
            return untrusted
        bad = [f.path for f in m.files if not accepted(f.path)]
        if bad:
            return f"lists {bad[0]!r}, not a safetensors/JSON/tokenizer file; refused"
        if not any(f.path == "config.json" for f in m.files):
            return "lists no config.json; refused"
        return None

    def _download(self) -> bool:
        m = self._read_manifest()
        if m is None:
            self.say(f"base model mirror {self.where}: not there yet; loading the model the normal way")
            return False
        work = self.run.root / PULL_DIR
        work.mkdir(parents=True, exist_ok=True)
        todo = [f for f in m.files if not _have(work / f.path, f)]
        needed, free = sum(f.size for f in todo), shutil.disk_usage(work).free
        if needed > free:
            raise CheckpointError(f"needs {needed} bytes, {free} free in {work}")
        calls, objects = self.remote.calls, self.remote.objects

        def attempt(b: Budget) -> None:
            present = calls.call(objects.list, f"{self.rel}/", deadline=b.at)
            for f in todo:
                size = present.get(f"{self.rel}/{f.path}")
                if size != f.size:  # refused before downloading: the free-space check trusted the sizes
                    raise CheckpointError(f"{self.where}/{f.path}: {size} bytes remotely, the manifest says {f.size}")
                (work / f.path).parent.mkdir(parents=True, exist_ok=True)
            try:
                calls.transfer(
                    lambda wait: objects.get_files([(f"{self.rel}/{f.path}", work / f.path) for f in todo], wait),
                    [(f"{self.rel}/{f.path}", f.size) for f in todo],
                    b,
                )
            except Missing as e:
                raise CheckpointError(f"{self.remote.uri}/{e.args[0]}: missing from the mirror") from None

        calls.retry(f"download of {self.rel}", attempt, None)
        with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:  # hashlib releases the GIL
            hashes = list(pool.map(lambda f: sha256_file(work / f.path), todo))
        for f, got in zip(todo, hashes, strict=True):
            p = work / f.path
            if p.stat().st_size != f.size or got != f.sha256:
                p.unlink()  # a bad copy is not kept; the bucket's object is left as it is
                raise CheckpointError(f"{self.where}/{f.path}: sha256 does not match the mirror's manifest; refused")
        problem = self._weights_problem(work)
        if problem:  # the bucket is not trusted: what the config.json says is checked too
            raise CheckpointError(f"{self.where}/config.json: {problem}; refused")
        write_file(work / MANIFEST_NAME, self._raw)  # last: the copy counts only when complete
        fsync_dir(work)
        dest = self.run.base_model
        if dest.exists():  # a copy of another base model (the fingerprint differs): local, replaced
            shutil.rmtree(dest)
        os.replace(work, dest)
        fsync_dir(self.run.root)
        self.say(f"base model from the mirror {self.where} ({m.total_bytes / 1e6:.1f} MB, sha256 verified)")
        return True

    def _weights_problem(self, copy: Path) -> str | None:
        """A downloaded copy whose weights are not what model.mirror_4bit says (quantized by bitsandbytes, 4-bit,
        with this config's quant_type and double_quant; or not quantized at all)."""
        try:
            q = json.loads((copy / "config.json").read_text()).get("quantization_config")
        except (OSError, ValueError, AttributeError):
            return "not a JSON object"
        if not self.cfg.model.mirror_4bit:
            return None if q is None else "the weights are stored quantized, not as the base model's"
        want = self.cfg.quant
        if not (
            isinstance(q, dict)
            and q.get("quant_method") == "bitsandbytes"
            and q.get("load_in_4bit") is True
            and q.get("bnb_4bit_quant_type") == want.quant_type
            and q.get("bnb_4bit_use_double_quant") == want.double_quant
        ):
            return f"not 4-bit bitsandbytes weights with quant_type {want.quant_type}, double_quant {want.double_quant}"
        return None

    # ---------------------------------------------------------------- first pod: upload

    def wants_4bit_copy(self) -> bool:
        """model.mirror_4bit on the first pod: the bucket has no 4-bit copy yet, so one is saved after the load.
        Advisory: never raises. A copy left on disk by an earlier process (killed before its upload, or made with
        other settings) is removed first: only what this process saves is uploaded."""
        for leftover in (self.run.root / STAGE_4BIT, self.run.root / f"{STAGE_4BIT}.tmp"):
            shutil.rmtree(leftover, ignore_errors=True)
        if not self.cfg.model.mirror_4bit or self.fetched or self.cfg.model.trust_remote_code:
            return False
        try:
            return self._read_manifest() is None
        except Exception as e:  # noqa: BLE001 (refused or unreachable: no copy is saved, nothing else changes)
            log.info("base model mirror %s: no 4-bit copy saved (%s)", self.where, one_line(e))
            return False

    def stage_4bit(self, model) -> None:
        """Save the just-loaded (quantized, not yet LoRA-wrapped) base model with its tokenizer files for the upload;
        a failure costs one warning and no mirror. Only with room for it and a margin left (the emergency
        checkpoint must still fit)."""
        stage, src = self.run.root / STAGE_4BIT, local_model_dir(self.cfg, self.run)
        tmp = self.run.root / f"{STAGE_4BIT}.tmp"  # rank 0 holds the run lock: one writer
        try:
            if src is None:
                raise CheckpointError(f"{self.cfg.model.name_or_path}: its files are not on this disk")
            need, free = model.get_memory_footprint(), shutil.disk_usage(self.run.root).free
            if free < need + STAGE_MARGIN:
                raise CheckpointError(f"needs {need / 1e9:.1f} GB and {free / 1e9:.1f} GB are free in {self.run.root}")
            shutil.rmtree(tmp, ignore_errors=True)
            model.save_pretrained(tmp)  # safetensors: uint8 weights and their quantization state
            for f in src.rglob("*"):  # the tokenizer and generation files, not the original weights or config
                rel = f.relative_to(src).as_posix()
                if f.is_file() and accepted(rel) and not _is_weights_or_config(rel) and not (tmp / rel).exists():
                    (tmp / rel).parent.mkdir(parents=True, exist_ok=True)
                    shutil.copy2(f, tmp / rel)
            os.replace(tmp, stage)
            self._staged = True
        except Exception as e:  # noqa: BLE001 (the run goes on without a mirror)
            shutil.rmtree(tmp, ignore_errors=True)
            log.warning("base model mirror %s: the 4-bit copy was not saved (%s)", self.where, one_line(e))

    def start_upload(self) -> None:
        """In the background, upload the model's files as the mirror unless it is there already (one warning if
        that fails; training never waits for it). With model.mirror_4bit: the copy stage_4bit() saved."""
        if self.fetched or self.cfg.model.trust_remote_code:
            if self.cfg.model.trust_remote_code:
                log.warning("model.mirror: a model that needs trust_remote_code is not mirrored (its code would be)")
            return
        if self.cfg.model.mirror_4bit:
            src = self.run.root / STAGE_4BIT if self._staged else None
        else:
            src = local_model_dir(self.cfg, self.run)
        if src is None:
            return
        self._upload = threading.Thread(target=self._upload_quietly, args=(src,), name="mirror-upload", daemon=True)
        self._upload.start()

    def wait_upload(self, timeout: float | None = None) -> None:
        if self._upload is not None:
            self._upload.join(timeout)

    def _upload_quietly(self, src: Path) -> None:
        try:
            try:
                if self._read_manifest() is not None:
                    return  # mirrored already
            except CheckpointError as e:  # refused here, and left as it is: nothing in the bucket is replaced
                log.warning("base model mirror not used and left as it is (%s); delete it to upload it again", e)
                return
            self.publish(src)
        except Exception as e:  # the run goes on without a mirror
            log.warning("base model mirror %s not uploaded (%s)", self.where, one_line(e))
        finally:
            if src.name == STAGE_4BIT:  # a local copy made for the upload only: uploaded or not, not kept
                shutil.rmtree(src, ignore_errors=True)

    def publish(self, src: Path) -> Manifest:
        """Upload src's model files under the mirror's prefix, the signed manifest last."""
        quantized = model_lib.is_quantized_dir(src)
        if quantized != self.cfg.model.mirror_4bit:  # e.g. a fresh pod's 4-bit copy, mirror_4bit off
            what = "quantized" if quantized else "not quantized"
            raise CheckpointError(f"{src}: its weights are {what}; not the copy model.mirror_4bit asks for")
        m = build_manifest(src, 0, kind=KIND, extra={"fingerprint": fingerprint(self.cfg)})
        skipped = [f.path for f in m.files if not accepted(f.path)]
        m.files = [f for f in m.files if accepted(f.path)]
        if not any(f.path.endswith(".safetensors") for f in m.files):
            raise CheckpointError(f"{src}: no safetensors weights; not mirrored")
        if skipped:
            log.info("model.mirror: not mirrored (not safetensors/JSON/tokenizer): %s", ", ".join(skipped[:5]))
        if self.remote.signer is not None:
            self.remote.signer.sign(m)
        result = self.remote.upload_listed(src, self.rel, m.files, m.to_json().encode())
        mb = result.bytes_uploaded / 1e6
        log.info("base model mirrored to %s (%.1f MB in %.1f s)", self.where, mb, result.seconds)
        return m


def _is_weights_or_config(rel: str) -> bool:
    name = PurePosixPath(rel).name
    return name == "config.json" or name.endswith((".safetensors", ".safetensors.index.json"))


def _have(p: Path, f) -> bool:
    return p.is_file() and p.stat().st_size == f.size and sha256_file(p) == f.sha256
