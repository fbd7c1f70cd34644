"""Export `final/`: the adapter as it is, or merged into the base model's own weights, to a dir or the remote.

What to merge into (the base model, trust_remote_code, the method) comes from the run's config: the CONFIG and
--set given, or the config.yaml snapshot of the run's newest checkpoint (verified against its manifest, and its
signature with checkpoint.sign_key_env) with --set on top. Never from final/spot_trainer.json: final/ is what is
exported, not what to trust; where its copy disagrees, a line says so and the config wins.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import torch

from trainer.checkpoint import signing
from trainer.checkpoint.manifest import Manifest, build_manifest, sha256_file, verify, write_manifest
from trainer.checkpoint.store import CheckpointStore
from trainer.config.loader import load_config
from trainer.config.schema import Config
from trainer.errors import CheckpointError, ConfigError
from trainer.remote.uri import reject_credentials
from trainer.run_dir import FINAL_META, RunDir

_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def run_config(target: str | None, overrides: list[str], output_dir: str | None) -> tuple[Path, Config, str | None]:
    """(run dir, config, where the config came from; None: the defaults and --set alone, no snapshot found).

    `target` is a CONFIG (file or preset) or a run's output dir; for a dir, the --set given may name
    checkpoint.sign_key_env, so that the snapshot is only taken from a checkpoint signed with that key.
    """
    if target and not Path(target).is_dir():  # a CONFIG: the user's own
        cfg = load_config(target, overrides, output_dir)
        return Path(cfg.output_dir), cfg, f"config {target}"
    run_dir = Path(target or load_config(None, overrides, output_dir).output_dir)
    cli = load_config(None, overrides, str(run_dir))
    snapshot = config_snapshot(run_dir, signing.from_config(cli.checkpoint))
    if snapshot is None:
        return run_dir, cli, None
    cfg = load_config(str(snapshot), overrides, str(run_dir))
    if cfg.checkpoint.sign_key_env and not cli.checkpoint.sign_key_env:  # the run signs: its snapshot must be signed
        signer = signing.from_config(cfg.checkpoint)
        problem = signer.problem(Manifest.load(snapshot.parent))
        if problem:
            raise ConfigError(f"{snapshot.parent}: {problem}; the run's config is not taken from it")
    return run_dir, cfg, str(snapshot)


def config_snapshot(run_dir: Path, signer) -> Path | None:
    """config.yaml of the newest checkpoint that verifies (sizes, the snapshot's sha256, the signature)."""
    found = CheckpointStore(run_dir, signer).latest_valid(deep=False)
    if found is None:
        return None
    path = found[1] / "config.yaml"
    entry = next((f for f in Manifest.load(found[1]).files if f.path == "config.yaml"), None)
    if entry is None or not path.is_file() or sha256_file(path) != entry.sha256:
        return None
    return path


def read_final(output_dir: Path, signer=None) -> tuple[Path, dict, Manifest]:
    final = RunDir(output_dir).final
    problems = verify(final, signer=signer)
    if problems:
        raise ConfigError(f"{final}: no finished run to export ({problems[0]}); train to the end first")
    try:
        meta = json.loads((final / FINAL_META).read_text())
    except (OSError, ValueError) as e:
        raise ConfigError(f"{final / FINAL_META}: cannot read ({e}); train to the end again") from None
    return final, meta if isinstance(meta, dict) else {}, Manifest.load(final)


def trusted_source(final: Path, meta: dict, cfg: Config, output_dir: Path, say) -> tuple[str, str]:
    """(method, base model) from the config; one line when final/spot_trainer.json says otherwise."""
    from trainer.model import base_model_path

    ours = {
        "method": cfg.model.method,
        "base_model": base_model_path(cfg, output_dir),
        "trust_remote_code": cfg.model.trust_remote_code,
    }
    model = meta.get("config", {}).get("model", {}) if isinstance(meta.get("config"), dict) else {}
    theirs = {
        "method": meta.get("method"),
        "base_model": meta.get("base_model"),
        "trust_remote_code": model.get("trust_remote_code", False) if isinstance(model, dict) else None,
    }
    differ = [k for k in ours if theirs[k] != ours[k] and not (k == "base_model" and _same_dir(theirs[k], ours[k]))]
    if differ:
        said = ", ".join(f"{k} {str(theirs[k])[:120]!r}" for k in differ)
        used = ", ".join(f"{k} {ours[k]!r}" for k in differ)
        say(f"{final / FINAL_META} says {said}; not obeyed: using the run's config ({used})")
    return ours["method"], ours["base_model"]


def _base_dtype(base_path: str) -> torch.dtype:
    """The dtype the base weights were published in (config.json), so merging keeps it."""
    try:
        cfg = json.loads((Path(base_path) / "config.json").read_text())
    except (OSError, ValueError):
        return torch.bfloat16
    return _DTYPES.get(cfg.get("torch_dtype") or cfg.get("dtype") or "", torch.float32)


def _same_dir(a: object, b: str) -> bool:
    """The same local directory under two spellings (a relative and an absolute --output-dir)."""
    return isinstance(a, str) and Path(a).is_dir() and Path(b).is_dir() and Path(a).resolve() == Path(b).resolve()


def merge_adapter(final: Path, base_path: str, cfg: Config, dest: Path) -> Path:
    """Base (full precision, never the 4-bit copy) + adapter -> merge_and_unload -> safetensors + tokenizer.
    trust_remote_code is the config's: the user's own setting, never final/'s."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

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


def export(
    output_dir: Path,
    to: str | None,
    merge: bool,
    cfg: Config,
    cfg_source: str | None,
    overwrite: bool = False,
    say=print,
) -> str:
    """Write the export to `to` (a dir or a remote URI; default <output_dir>/export); returns where. `cfg` is the
    run's config (run_config()); `cfg_source` None: no snapshot was found, so a merge needs the run's CONFIG."""
    remote = bool(to) and (to.startswith("s3://") or to.startswith("file://"))
    if remote:
        reject_credentials(to, "--to")
    signer = signing.from_config(cfg.checkpoint)
    final, meta, manifest = read_final(output_dir, signer)
    dest = None if remote else (Path(to) if to else Path(output_dir) / "export")
    if dest is not None:
        check_destination(dest, output_dir, meta, overwrite)  # before any work: a merge can take minutes
    method, base_path = trusted_source(final, meta, cfg, output_dir, say)
    adapter = method in ("lora", "qlora")
    if merge and adapter and cfg_source is None:
        raise ConfigError(
            f"{output_dir}: no verified checkpoint config.yaml to take the base model from (final/ is not trusted "
            f"for it); give the run's config: spot-trainer export CONFIG --output-dir {output_dir} --merge"
        )
    about = {
        **meta,
        "method": method,
        "base_model": base_path,
        "config": cfg.to_dict(),
        "step": manifest.step,
        "run_id": manifest.run_id,
        "source": str(Path(output_dir).resolve()),
    }
    with tempfile.TemporaryDirectory(dir=output_dir, prefix=".export-") as tmp:
        stage = Path(tmp) / "out"
        if merge and adapter:
            merge_adapter(final, base_path, cfg, stage)
            about["merged"] = True
        else:
            shutil.copytree(final, stage)
            (stage / "manifest.json").unlink()
        (stage / FINAL_META).write_text(json.dumps(about, indent=1))
        built = build_manifest(stage, manifest.step, kind="export", run_id=manifest.run_id)
        write_manifest(stage, signer.sign(built) if signer is not None else built)
        if to and (to.startswith("s3://") or to.startswith("file://")):
            from trainer.remote.store import open_store

            store = open_store(to, cfg.checkpoint.s3)
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
