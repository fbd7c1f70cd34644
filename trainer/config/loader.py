"""Loading the config: presets, `base:` inheritance, `--set key=value` overrides, typed building and validation.

Unknown keys and wrong types are ConfigErrors that name the key and suggest the nearest valid one.
"""

from __future__ import annotations

import dataclasses
import difflib
import logging
import types
import typing
from importlib import resources
from pathlib import Path
from typing import Any, Literal, Union

import yaml

from trainer.checkpoint.signing import check_env_name
from trainer.config.schema import Config
from trainer.errors import ConfigError
from trainer.remote.uri import reject_credentials
from trainer.trackers import check_logging

log = logging.getLogger(__name__)

# Keys earlier versions accepted: old configs and the config snapshots of old checkpoints still load.
RETIRED_KEYS = {
    "data.num_workers": (0, "rows are tokenized in memory before training, there is no loader to give workers to")
}
PRESET_DIR = Path(str(resources.files("trainer.config") / "presets"))
DEFAULT_PRESET = "default"

# ---------------------------------------------------------------- loading


def list_presets() -> dict[str, str]:
    """Preset name -> its first comment line (description)."""
    out = {}
    for p in sorted(PRESET_DIR.glob("*.yaml")):
        first = p.read_text().splitlines()[0] if p.read_text() else ""
        out[p.stem] = first.lstrip("# ").strip()
    return out


def preset_cards() -> dict[str, str]:
    """Preset name -> the GPU it is sized for, from its `# card: ...` comment line ("" when it has none)."""
    out = {}
    for p in sorted(PRESET_DIR.glob("*.yaml")):
        cards = [line.split(":", 1)[1].strip() for line in p.read_text().splitlines() if line.startswith("# card:")]
        out[p.stem] = cards[0] if cards else ""
    return out


def _read_yaml(path: Path, what: str) -> dict:
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise ConfigError(
            f"{what} {path}: file not found; give an existing YAML file or a preset name ({', '.join(list_presets())})"
        ) from None
    except OSError as e:
        raise ConfigError(f"{what} {path}: cannot read ({e.strerror})") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark else ""
        raise ConfigError(f"{path}{where}: not valid YAML ({getattr(e, 'problem', e)})") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: top level must be a mapping of sections (model:, data:, train:, ...)")
    return data


def _resolve_source(source: str | None) -> tuple[Path, str]:
    if source is None:
        return PRESET_DIR / f"{DEFAULT_PRESET}.yaml", "preset"
    p = Path(source)
    if p.suffix in (".yaml", ".yml") or p.exists() or "/" in source:
        return p, "config"
    preset = PRESET_DIR / f"{source}.yaml"
    if preset.exists():
        return preset, "preset"
    near = difflib.get_close_matches(source, list(list_presets()), n=1)
    hint = f"; did you mean preset '{near[0]}'?" if near else f"; presets: {', '.join(list_presets())}"
    raise ConfigError(f"config {source!r}: no such file or preset{hint}")


def _load_raw(source: str | None, seen: tuple = ()) -> dict:
    path, what = _resolve_source(source)
    data = _read_yaml(path, what)
    base = data.pop("base", None)
    if base is not None:
        if not isinstance(base, str):
            raise ConfigError(f"{path}: 'base' must be a preset name or a YAML path")
        if base in seen:
            raise ConfigError(f"{path}: 'base: {base}' makes a cycle")
        if not Path(base).is_absolute() and "/" in base:
            base = str(path.parent / base)
        return _deep_merge(_load_raw(base, seen + (base,)), data)
    return data


def _deep_merge(a: dict, b: dict) -> dict:
    out = dict(a)
    for k, v in b.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = _deep_merge(out[k], v)
        else:
            out[k] = v
    return out


def parse_override(item: str) -> tuple[list[str], Any]:
    """'train.max_steps=50' -> (['train', 'max_steps'], 50). The value is parsed as YAML."""
    if "=" not in item:
        raise ConfigError(f"--set {item!r}: expected key=value, e.g. --set train.max_steps=50")
    key, _, raw = item.partition("=")
    key = key.strip()
    if not key:
        raise ConfigError(f"--set {item!r}: empty key")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return key.split("."), value


def _apply_override(data: dict, keys: list[str], value: Any) -> None:
    node = data
    for k in keys[:-1]:
        if not isinstance(node.get(k), dict):
            node[k] = {}
        node = node[k]
    node[keys[-1]] = value


def load_config(source: str | None = None, overrides: list[str] = (), output_dir: str | None = None) -> Config:
    """Build the Config from a preset or YAML file, then `--set` overrides, then --output-dir."""
    data = _load_raw(source)
    for item in overrides:
        keys, value = parse_override(item)
        _apply_override(data, keys, value)
    if output_dir is not None:
        data["output_dir"] = str(output_dir)
    cfg = _build(Config, data, "")
    validate(cfg)
    return cfg


def config_from_dict(data: dict) -> Config:
    cfg = _build(Config, data, "")
    validate(cfg)
    return cfg


# ---------------------------------------------------------------- typed building


def _build(cls, data: Any, prefix: str):
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix.rstrip('.') or 'config'}: expected a mapping, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in data.items():
        if f"{prefix}{key}" in RETIRED_KEYS and key not in names:
            old_default, why = RETIRED_KEYS[f"{prefix}{key}"]
            if value != old_default:  # old snapshots (config.yaml in a checkpoint) carry the default: no noise
                log.warning("config key '%s%s' is no longer used and is ignored: %s", prefix, key, why)
            continue
        if key not in names:
            near = difflib.get_close_matches(str(key), names, n=1, cutoff=0.5)
            hint = f"; did you mean '{prefix}{near[0]}'?" if near else f"; valid keys: {', '.join(names)}"
            raise ConfigError(f"unknown config key '{prefix}{key}'{hint}")
        kwargs[key] = _coerce(hints[key], value, f"{prefix}{key}")
    return cls(**kwargs)


def _type_name(tp) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return " | ".join(repr(a) for a in typing.get_args(tp))
    if origin in (Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(tp) if a is not type(None)) + " (or null)" * (
            type(None) in typing.get_args(tp)
        )
    if origin is list:
        return f"list of {_type_name(typing.get_args(tp)[0])}"
    if origin is dict or tp is dict:
        return "mapping"
    return getattr(tp, "__name__", str(tp))


def _coerce(tp, value, key: str):
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        return _build(tp, value if value is not None else {}, key + ".")
    if origin in (Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return _coerce(a, value, key)
            except ConfigError as e:
                errors.append(e)
        raise ConfigError(f"{key}: expected {_type_name(tp)}, got {value!r}")
    if origin is Literal:
        allowed = typing.get_args(tp)
        if value in allowed and type(value) is type(allowed[allowed.index(value)]):
            return value
        near = difflib.get_close_matches(str(value), [str(a) for a in allowed], n=1)
        hint = f"; did you mean {near[0]!r}?" if near else ""
        raise ConfigError(f"{key}: {value!r} is not one of {', '.join(repr(a) for a in allowed)}{hint}")
    if origin is list:
        (inner,) = typing.get_args(tp)
        if not isinstance(value, list):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        return [_coerce(inner, v, f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is dict or tp is dict:  # dict[K, V] checks keys and values; a bare dict is passed on as it is
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        if origin is None:
            return dict(value)
        kt, vt = typing.get_args(tp)
        return {_coerce(kt, k, key): _coerce(vt, v, f"{key}.{k}") for k, v in value.items()}
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{key}: expected true or false, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(f"{key}: expected an integer, got {value!r}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML reads 1e-4 (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"{key}: expected a number, got {value!r}")
    if tp is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"{key}: expected a string, got {value!r}")
    raise ConfigError(f"{key}: unsupported type {tp}")


def _positive(cfg_value, key: str, allow_zero: bool = False):
    if cfg_value is None:
        return
    if cfg_value < 0 or (cfg_value == 0 and not allow_zero):
        raise ConfigError(f"{key}: must be {'>= 0' if allow_zero else '> 0'}, got {cfg_value}")


def _check_machines(s) -> None:
    _positive(s.num_machines, "supervisor.num_machines")
    if not 0 <= s.machine_rank < s.num_machines:
        raise ConfigError(
            f"supervisor.machine_rank: must be in [0, {s.num_machines}) for supervisor.num_machines="
            f"{s.num_machines}, got {s.machine_rank}"
        )
    if s.num_machines > 1 and not (s.main_process_ip or "").strip():
        raise ConfigError(
            "supervisor.main_process_ip: required when supervisor.num_machines > 1 (the address of machine_rank 0)"
        )
    if not 1 <= s.main_process_port <= 65535:
        raise ConfigError(f"supervisor.main_process_port: must be in [1, 65535], got {s.main_process_port}")


def validate(cfg: Config) -> None:
    """Cross-field checks that types alone cannot express."""
    t = cfg.train
    for key in ("micro_batch_size", "grad_accum", "global_batch_size", "max_steps", "log_every_steps"):
        _positive(getattr(t, key), f"train.{key}")
    _positive(t.epochs, "train.epochs")
    _positive(t.lr, "train.lr", allow_zero=True)
    if not 0 <= t.warmup_ratio < 1:
        raise ConfigError(f"train.warmup_ratio: must be in [0, 1), got {t.warmup_ratio}")
    if t.grad_accum is not None and t.global_batch_size is not None:
        raise ConfigError("train.grad_accum and train.global_batch_size: set one of them, not both")
    _positive(cfg.data.max_length, "data.max_length")
    ev = cfg.data.eval_split
    if isinstance(ev, float) and not 0 <= ev < 1:
        raise ConfigError(f"data.eval_split: a fraction must be in [0, 1), got {ev}")
    _positive(cfg.checkpoint.every_steps, "checkpoint.every_steps")
    _positive(cfg.checkpoint.keep_last, "checkpoint.keep_last")
    _positive(cfg.checkpoint.remote_keep_last, "checkpoint.remote_keep_last")
    _positive(cfg.lora.r, "lora.r")
    if not 0 <= cfg.lora.dropout < 1:
        raise ConfigError(f"lora.dropout: must be in [0, 1), got {cfg.lora.dropout}")
    remote = cfg.checkpoint.remote
    # first: the checks below repeat the URI, and a secret in it must appear nowhere
    reject_credentials(remote, "checkpoint.remote")
    reject_credentials(cfg.checkpoint.s3.endpoint_url, "checkpoint.s3.endpoint_url")
    check_env_name(cfg.checkpoint.sign_key_env)  # the variable is read when a command needs the key
    if cfg.model.mirror and remote is None:
        raise ConfigError("model.mirror: needs checkpoint.remote (s3://... or file://...), where the copy is kept")
    if cfg.model.mirror_4bit and not (cfg.model.mirror and cfg.model.method == "qlora" and cfg.quant.bits == 4):
        raise ConfigError(
            "model.mirror_4bit: mirrors 4-bit QLoRA weights; set model.mirror=true, model.method=qlora and "
            f"quant.bits=4 (now mirror={cfg.model.mirror}, method={cfg.model.method}, bits={cfg.quant.bits})"
        )
    if not cfg.distributed.shared_output_dir and remote is None:
        raise ConfigError(
            "distributed.shared_output_dir=false: set checkpoint.remote (s3://... or file://...); without a shared "
            "output dir the nodes commit their checkpoints there"
        )
    if remote is not None and not (remote.startswith("s3://") or remote.startswith("file://")):
        raise ConfigError(f"checkpoint.remote: {remote!r} must start with s3:// or file://")
    if remote is not None and remote.startswith("s3://") and len(remote) <= 5:
        raise ConfigError("checkpoint.remote: give a bucket, e.g. s3://my-bucket/runs/exp1")
    if cfg.supervisor.num_processes != "auto":
        _positive(cfg.supervisor.num_processes, "supervisor.num_processes")
    _check_machines(cfg.supervisor)
    _positive(cfg.supervisor.hang_timeout, "supervisor.hang_timeout")
    _positive(cfg.distributed.timeout_s, "distributed.timeout_s")
    check_logging(cfg.logging)
    _positive(cfg.preemption.grace_seconds, "preemption.grace_seconds", allow_zero=True)
    url = cfg.preemption.metadata_url
    if url is not None and not url.startswith(("http://", "https://")):
        raise ConfigError(f"preemption.metadata_url: {url!r} must be an http:// URL (e.g. http://169.254.169.254)")
