"""Export `final/`: the adapter as it is, or merged into the base model's own weights, to a dir or the remote."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import torch

from trainer.checkpoint.manifest import Manifest, build_manifest, verify, write_manifest
from trainer.config.loader import config_from_dict
from trainer.errors import CheckpointError, ConfigError
from trainer.run_dir import FINAL_META, RunDir

_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def read_final(output_dir: Path) -> tuple[Path, dict]:
    final = RunDir(output_dir).final
    problems = verify(final)
    if problems:
        raise ConfigError(f"{final}: no finished run to export ({problems[0]}); train to the end first")
    return final, json.loads((final / FINAL_META).read_text())


def _base_dtype(base_path: str) -> torch.dtype:
    """The dtype the base weights were published in (config.json), so merging keeps it."""
    try:
        cfg = json.loads((Path(base_path) / "config.json").read_text())
    except (OSError, ValueError):
        return torch.bfloat16
    return _DTYPES.get(cfg.get("torch_dtype") or cfg.get("dtype") or "", torch.float32)


def merge_adapter(final: Path, meta: dict, dest: Path) -> Path:
    """Base (full precision, never the 4-bit copy) + adapter -> merge_and_unload -> safetensors + tokenizer."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    base_path = meta["base_model"]
    cfg = config_from_dict(meta["config"])
    dtype = _base_dtype(base_path)
    try:
        base = AutoModelForCausalLM.from_pretrained(
            base_path, dtype=dtype, trust_remote_code=cfg.model.trust_remote_code
        )
    except OSError as e:
        raise ConfigError(f"base model {base_path}: cannot load it to merge into ({str(e).splitlines()[0]})") from None
    model = PeftModel.from_pretrained(base, str(final))
    merged = model.merge_and_unload()
    merged.save_pretrained(dest, safe_serialization=True)
    AutoTokenizer.from_pretrained(str(final)).save_pretrained(dest)
    return dest


def check_destination(dest: Path, output_dir: Path, meta: dict, overwrite: bool) -> None:
    """Refuse a non-empty destination unless it is an earlier export of this same run (or --overwrite)."""
    if overwrite or not dest.exists() or (dest.is_dir() and not any(dest.iterdir())):
        return
    if not dest.is_dir():
        raise ConfigError(f"--to {dest}: is a file; give a directory (or --overwrite to replace it)")
    try:
        previous = json.loads((dest / FINAL_META).read_text())
        same = Manifest.load(dest).kind == "export" and (
            (meta.get("run_id") and previous.get("run_id") == meta.get("run_id"))
            or previous.get("source") == str(Path(output_dir).resolve())
        )
    except (OSError, ValueError, AttributeError, CheckpointError):
        same = False
    if not same:
        raise ConfigError(
            f"--to {dest}: not empty and not an earlier export of this run; nothing was written. "
            f"Give an empty or new directory (e.g. --to {dest / Path(output_dir).name}), or --overwrite "
            f"to replace what is there"
        )


def export(output_dir: Path, to: str | None, merge: bool, s3_config=None, overwrite: bool = False) -> str:
    """Write the export to `to` (a dir or a remote URI; default <output_dir>/export); returns where."""
    final, meta = read_final(output_dir)
    remote = bool(to) and (to.startswith("s3://") or to.startswith("file://"))
    dest = None if remote else (Path(to) if to else Path(output_dir) / "export")
    if dest is not None:
        check_destination(dest, output_dir, meta, overwrite)  # before any work: a merge can take minutes
    adapter = meta["method"] in ("lora", "qlora")
    about = {**meta, "source": str(Path(output_dir).resolve())}
    with tempfile.TemporaryDirectory(dir=output_dir, prefix=".export-") as tmp:
        stage = Path(tmp) / "out"
        if merge and adapter:
            merge_adapter(final, meta, stage)
            about["merged"] = True
        else:
            shutil.copytree(final, stage)
            (stage / "manifest.json").unlink()
        (stage / FINAL_META).write_text(json.dumps(about, indent=1))
        write_manifest(stage, build_manifest(stage, meta["step"], kind="export", run_id=meta.get("run_id")))
        if to and (to.startswith("s3://") or to.startswith("file://")):
            from trainer.remote.store import open_store

            store = open_store(to, s3_config)
            store.upload_dir(stage, "export")
            return f"{to.rstrip('/')}/export"
        dest.parent.mkdir(parents=True, exist_ok=True)
        old = Path(tmp) / "previous"
        if dest.is_dir():  # checked above: an earlier export of this run, or --overwrite
            os.replace(dest, old)
        elif dest.exists():
            dest.unlink()
        shutil.move(str(stage), dest)
        return str(dest)
