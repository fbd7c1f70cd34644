"""One typed config: dataclasses loaded from YAML, presets and `--set key=value` overrides.

The signature of these dataclasses is the documentation of every key (README: "Config reference").
"""

from __future__ import annotations

import dataclasses
import difflib
import typing
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Literal, Optional, Union

import yaml

from .errors import ConfigError

PRESET_DIR = Path(str(resources.files("trainer") / "presets"))
DEFAULT_PRESET = "default"


@dataclass
class BuiltinModelConfig:
    """Shape of the built-in tiny Llama (used when model.name_or_path is 'builtin:tiny-llama')."""

    hidden_size: int = 128
    intermediate_size: int = 352
    num_hidden_layers: int = 4
    num_attention_heads: int = 4
    num_key_value_heads: int = 2
    max_position_embeddings: int = 256


@dataclass
class ModelConfig:
    name_or_path: str = "builtin:tiny-llama"
    method: Literal["lora", "qlora", "full"] = "full"
    dtype: Literal["auto", "bf16", "fp16", "fp32"] = "auto"  # auto: bf16 on a GPU that has it, else fp32
    gradient_checkpointing: bool = False
    attn_implementation: Optional[str] = None  # sdpa | eager | flash_attention_2; None = transformers' choice
    trust_remote_code: bool = False
    builtin: BuiltinModelConfig = field(default_factory=BuiltinModelConfig)
    # speed (trainer/speed.py); "auto" = on where known safe and faster (a CUDA GPU), off on the CPU
    liger_kernels: Union[bool, Literal["auto"]] = "auto"  # fused RMSNorm/SwiGLU/RoPE, loss without full logits
    packed_attention: Literal["auto", "varlen", "mask"] = "auto"  # data.packing: flash per document, or a mask
    kbit_bf16_frozen: Union[bool, Literal["auto"]] = "auto"  # qlora: keep norms/embeddings/lm_head bf16, not fp32
    checkpoint_layers: Union[int, Literal["auto"], None] = "auto"  # layers to checkpoint; auto: fewest that fit
    memory_budget_gb: Optional[float] = None  # GiB that checkpoint_layers=auto may plan for; None: all free


@dataclass
class LoraConfig:
    r: int = 16
    alpha: int = 32
    dropout: float = 0.05
    target_modules: Union[str, list[str]] = "all-linear"


@dataclass
class QuantConfig:
    """bitsandbytes quantization of the frozen base weights (method: qlora)."""

    bits: Literal[4, 8] = 4
    quant_type: Literal["nf4", "fp4"] = "nf4"
    double_quant: bool = True
    compute_dtype: Literal["auto", "bf16", "fp16", "fp32"] = "auto"


@dataclass
class BuiltinDataConfig:
    """The generated instruction dataset used when data.path is 'builtin:tasks'."""

    tasks: list[str] = field(default_factory=lambda: ["reverse", "sort", "add"])
    num_train: int = 4000
    num_eval: int = 200
    min_len: int = 3
    max_len: int = 8


@dataclass
class DataConfig:
    path: str = "builtin:tasks"  # file (jsonl/json/parquet/csv/txt), saved dataset dir, hub name, or builtin:tasks
    format: Literal["text", "alpaca", "chat", "completion"] = "completion"
    split: str = "train"
    max_length: int = 512
    packing: bool = False
    eval_split: Union[float, str, None] = 0.05  # fraction of the data, or a file path; None = no eval
    num_workers: int = 0
    builtin: BuiltinDataConfig = field(default_factory=BuiltinDataConfig)


@dataclass
class TrainConfig:
    seed: int = 42
    max_steps: Optional[int] = None  # None: run `epochs` over the data
    epochs: float = 1.0
    micro_batch_size: int = 8
    grad_accum: Optional[int] = None  # None: derived from global_batch_size, else 1
    global_batch_size: Optional[int] = None  # samples per optimizer step over all processes
    optimizer: Literal["adamw", "adamw_8bit", "paged_adamw_8bit", "paged_adamw"] = "adamw"
    lr: float = 2e-4
    weight_decay: float = 0.0
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_eps: float = 1e-8
    lr_scheduler: Literal["linear", "cosine", "constant"] = "cosine"
    warmup_steps: int = 0
    warmup_ratio: float = 0.0
    max_grad_norm: Optional[float] = 1.0
    log_every_steps: int = 10
    device: Literal["auto", "cpu", "cuda"] = "auto"


@dataclass
class EvalConfig:
    every_steps: Optional[int] = None  # None: only before and after training
    max_samples: int = 200
    generate: bool = True  # greedy-decode eval prompts and report exact-match accuracy
    max_new_tokens: int = 32
    before_training: bool = True


@dataclass
class S3Config:
    endpoint_url: Optional[str] = None  # None: AWS; else R2/B2/GCS/MinIO/SeaweedFS URL
    region: Optional[str] = None
    addressing_style: Literal["auto", "path", "virtual"] = "auto"
    profile: Optional[str] = None  # credentials come from boto3's normal chain; never from this file
    part_size_mb: int = 64
    max_concurrency: int = 8
    connect_timeout_s: float = 10.0
    read_timeout_s: float = 60.0
    max_attempts: int = 8
    deadline_s: float = 900.0  # total time one upload may take, retries included


@dataclass
class CheckpointConfig:
    every_steps: Optional[int] = 100
    every_minutes: Optional[float] = None
    keep_last: Optional[int] = 3  # local retention; the newest committed checkpoint is never deleted
    remote: Optional[str] = None  # s3://bucket/prefix or file:///path
    remote_keep_last: Optional[int] = None  # None: same as keep_last
    s3: S3Config = field(default_factory=S3Config)


@dataclass
class PreemptionConfig:
    watch: Literal["auto", "none", "aws", "gcp", "azure"] = "auto"
    poll_seconds: float = 5.0
    grace_seconds: float = 25.0  # assumed time left after SIGTERM when no notice gave a deadline


@dataclass
class SupervisorConfig:
    max_restarts: int = 20
    hang_timeout: float = 900.0  # seconds without a heartbeat before the run is killed and restarted
    backoff_initial_s: float = 2.0
    backoff_max_s: float = 120.0
    num_processes: Union[int, Literal["auto"]] = 1  # "auto": one per visible GPU
    accelerate_config: Optional[str] = None  # launch/<x>.yaml; None: a plain process (or auto multi-GPU)


@dataclass
class DistributedConfig:
    deepspeed: Optional[str] = None  # zero2 | zero2_offload | path to a DeepSpeed JSON


@dataclass
class Config:
    output_dir: str = "runs/default"
    model: ModelConfig = field(default_factory=ModelConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    quant: QuantConfig = field(default_factory=QuantConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    preemption: PreemptionConfig = field(default_factory=PreemptionConfig)
    supervisor: SupervisorConfig = field(default_factory=SupervisorConfig)
    distributed: DistributedConfig = field(default_factory=DistributedConfig)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)


# ---------------------------------------------------------------- loading


def list_presets() -> dict[str, str]:
    """Preset name -> its first comment line (description)."""
    out = {}
    for p in sorted(PRESET_DIR.glob("*.yaml")):
        first = p.read_text().splitlines()[0] if p.read_text() else ""
        out[p.stem] = first.lstrip("# ").strip()
    return out


def _read_yaml(path: Path, what: str) -> dict:
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise ConfigError(f"{what} {path}: file not found; give an existing YAML file or a preset name "
                          f"({', '.join(list_presets())})") from None
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
            base = str((path.parent / base))
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
    if origin is Union:
        return " or ".join(_type_name(a) for a in typing.get_args(tp) if a is not type(None)) + " (or null)" * (
            type(None) in typing.get_args(tp))
    if origin is list:
        return f"list of {_type_name(typing.get_args(tp)[0])}"
    return getattr(tp, "__name__", str(tp))


def _coerce(tp, value, key: str):
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        return _build(tp, value if value is not None else {}, key + ".")
    if origin is Union:
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
    if remote is not None and not (remote.startswith("s3://") or remote.startswith("file://")):
        raise ConfigError(f"checkpoint.remote: {remote!r} must start with s3:// or file://")
    if remote is not None and remote.startswith("s3://") and len(remote) <= 5:
        raise ConfigError("checkpoint.remote: give a bucket, e.g. s3://my-bucket/runs/exp1")
    if cfg.supervisor.num_processes != "auto":
        _positive(cfg.supervisor.num_processes, "supervisor.num_processes")
    _positive(cfg.supervisor.hang_timeout, "supervisor.hang_timeout")
