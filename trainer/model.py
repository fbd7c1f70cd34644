"""Model: tokenizer, base model (local dir, hub id or the built-in tiny Llama), LoRA / QLoRA / full."""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path

import torch

from trainer import speed
from trainer.config.schema import Config
from trainer.errors import ConfigError
from trainer.run_dir import RunDir

log = logging.getLogger(__name__)

BUILTIN = "builtin:tiny-llama"
_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def is_builtin(cfg: Config) -> bool:
    return cfg.model.name_or_path == BUILTIN


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """'auto' -> bf16 on a GPU that supports it, else fp32 (CPU)."""
    if name != "auto":
        return _DTYPES[name]
    if device.type == "cuda" and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return torch.float32


def load_tokenizer(cfg: Config, path: str | None = None):
    """The run's tokenizer; a pad token is added (= eos) when the model has none."""
    if path is None and is_builtin(cfg):
        from trainer.builtin.tokenizer import build_char_tokenizer

        return build_char_tokenizer()
    from transformers import AutoTokenizer

    name = path or cfg.model.name_or_path
    try:
        tok = AutoTokenizer.from_pretrained(name, trust_remote_code=cfg.model.trust_remote_code)
    except (OSError, ValueError) as e:
        raise ConfigError(f"model.name_or_path {name}: cannot load a tokenizer ({str(e).splitlines()[0]})") from None
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return tok


def builtin_config(cfg: Config, vocab_size: int):
    from transformers import LlamaConfig

    b = cfg.model.builtin
    return LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=b.hidden_size,
        intermediate_size=b.intermediate_size,
        num_hidden_layers=b.num_hidden_layers,
        num_attention_heads=b.num_attention_heads,
        num_key_value_heads=b.num_key_value_heads,
        max_position_embeddings=b.max_position_embeddings,
        tie_word_embeddings=False,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
        use_cache=False,
    )


def model_config(cfg: Config):
    """The model's transformers config, without loading weights (builtin, local dir or hub id)."""
    if is_builtin(cfg):
        from trainer.builtin.tokenizer import CHARS, SPECIAL

        return builtin_config(cfg, len(SPECIAL) + len(CHARS))
    if cfg.model.name_or_path.startswith("builtin:"):
        raise ConfigError(f"model.name_or_path {cfg.model.name_or_path!r}: the built-in model is {BUILTIN}")
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(cfg.model.name_or_path, trust_remote_code=cfg.model.trust_remote_code)
    except (OSError, ValueError) as e:
        raise ConfigError(
            f"model.name_or_path {cfg.model.name_or_path}: cannot read its config.json "
            f"({str(e).splitlines()[0]}); give a local model dir or a reachable hub id"
        ) from None


def materialize_builtin(cfg: Config, tokenizer, output_dir: Path) -> Path:
    """Save the built-in model's random init (a function of train.seed) once, so every path loads from disk."""
    dest = RunDir(output_dir).base_model
    if (dest / "config.json").exists():
        return dest
    from transformers import LlamaForCausalLM

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.train.seed)
        model = LlamaForCausalLM(builtin_config(cfg, len(tokenizer)))
    tmp = output_dir / f".base-model.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    _save_everywhere(model, tmp)
    tokenizer.save_pretrained(tmp)
    try:
        os.replace(tmp, dest)
    except OSError:  # another rank won the race with identical content
        shutil.rmtree(tmp, ignore_errors=True)
    return dest


def _save_everywhere(model, dest: Path) -> None:
    """model.save_pretrained, also on a rank other than 0: transformers writes the weights only on torch rank 0,
    and with own output dirs (distributed.shared_output_dir=false) the first rank of every node saves its copy."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0:
        model.save_pretrained(dest)
        return
    from safetensors.torch import save_model

    dest.mkdir(parents=True, exist_ok=True)
    model.config.save_pretrained(dest)
    if model.generation_config is not None:
        model.generation_config.save_pretrained(dest)
    save_model(model, str(dest / "model.safetensors"), metadata={"format": "pt"})


def base_model_path(cfg: Config, output_dir: Path) -> str:
    return str(RunDir(output_dir).base_model) if is_builtin(cfg) else cfg.model.name_or_path


def is_quantized_dir(path: Path) -> bool:
    """A model dir whose config.json says bitsandbytes stored its weights quantized (a model.mirror_4bit copy)."""
    try:
        q = json.loads((path / "config.json").read_text()).get("quantization_config")
    except (OSError, ValueError, AttributeError):
        return False
    return isinstance(q, dict) and q.get("quant_method") == "bitsandbytes"


def _quant_config(cfg: Config, device: torch.device):
    from transformers import BitsAndBytesConfig

    q = cfg.quant
    compute = resolve_dtype(q.compute_dtype, device)
    if q.bits == 8:
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=q.quant_type,
        bnb_4bit_use_double_quant=q.double_quant,
        bnb_4bit_compute_dtype=compute,
    )


def load_base_model(cfg: Config, path: str, device: torch.device, quantized: bool, dtype: torch.dtype):
    """The frozen or trainable base model from a local dir or hub id."""
    from transformers import AutoModelForCausalLM

    kwargs = dict(trust_remote_code=cfg.model.trust_remote_code, dtype=dtype)
    if cfg.model.attn_implementation:
        kwargs["attn_implementation"] = cfg.model.attn_implementation
    elif speed.use_varlen(cfg, device, lambda: model_config(cfg)):
        kwargs["attn_implementation"] = speed.register_varlen()
    if quantized:
        try:
            import bitsandbytes  # noqa: F401
        except ImportError:
            raise ConfigError("model.method qlora needs bitsandbytes: pip install bitsandbytes") from None
        kwargs["quantization_config"] = _quant_config(cfg, device)
        # accelerate's device can be plain "cuda" (no index): place on the current GPU then
        if device.type == "cuda":
            kwargs["device_map"] = {"": device.index if device.index is not None else torch.cuda.current_device()}
        else:
            kwargs["device_map"] = {"": "cpu"}
    try:
        return AutoModelForCausalLM.from_pretrained(path, **kwargs)
    except (OSError, ValueError) as e:
        raise ConfigError(f"model.name_or_path {path}: cannot load ({str(e).splitlines()[0]})") from None


def build_model(cfg: Config, tokenizer, device: torch.device, output_dir: Path, after_load=None):
    """The model to train: full, LoRA or QLoRA, with gradient checkpointing if asked. `after_load(model)` sees the
    base model as loaded, before anything changes it (model.mirror_4bit saves the quantized copy there)."""
    m = cfg.model
    if is_builtin(cfg):
        materialize_builtin(cfg, tokenizer, output_dir)
    path = base_model_path(cfg, output_dir)
    dtype = resolve_dtype(m.dtype, device)
    # full fine-tuning keeps fp32 master weights (autocast does the bf16 math); adapters train on a bf16 base
    load_dtype = torch.float32 if m.method == "full" else dtype
    if m.method != "qlora" and is_quantized_dir(Path(path)):
        raise ConfigError(
            f"model.name_or_path {path}: holds 4-bit weights (a model.mirror_4bit copy); model.method {m.method} "
            f"needs the original weights: use model.method=qlora, or another output dir"
        )
    model = load_base_model(cfg, path, device, quantized=m.method == "qlora", dtype=load_dtype)
    if after_load is not None:
        after_load(model)
    model.config.use_cache = False
    gc_kwargs = {"use_reentrant": False}
    liger = speed.use_liger(cfg, device) and speed.apply_liger(model)
    if m.method == "qlora" and not speed.upcast_kbit(cfg, device):
        speed.prepare_kbit_bf16(model, m.gradient_checkpointing, gc_kwargs)
    elif m.method == "qlora":
        from peft import prepare_model_for_kbit_training

        model = prepare_model_for_kbit_training(
            model, use_gradient_checkpointing=m.gradient_checkpointing, gradient_checkpointing_kwargs=gc_kwargs
        )
    elif m.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=gc_kwargs)
    if m.method in ("lora", "qlora"):
        from peft import LoraConfig, get_peft_model

        lc = cfg.lora
        try:
            model = get_peft_model(
                model,
                LoraConfig(
                    r=lc.r,
                    lora_alpha=lc.alpha,
                    lora_dropout=lc.dropout,
                    target_modules=lc.target_modules,
                    task_type="CAUSAL_LM",
                ),
            )
        except ValueError as e:
            raise ConfigError(f"lora.target_modules: {str(e).splitlines()[0]}") from None
        for p in model.parameters():  # adapters train in fp32 for stable updates, as peft recommends
            if p.requires_grad:
                p.data = p.data.float()
        if m.gradient_checkpointing:
            model.enable_input_require_grads()
    if m.method != "qlora":
        model.to(device)
    _plan_checkpointing(model, cfg, device, liger, gc_kwargs)
    # from_pretrained returns the model in eval mode: without this, LoRA dropout and gradient checkpointing
    # (which transformers applies only while training) would be silently off
    model.train()
    return model


def _plan_checkpointing(model, cfg: Config, device: torch.device, liger: bool, gc_kwargs: dict) -> None:
    """model.checkpoint_layers: an explicit count, or (auto, on a GPU) the fewest layers that fit in memory."""
    n = speed.resolve_checkpoint_layers(cfg, device)
    if n is None:
        return
    whole = None  # an explicit count checkpoints that many layers' model.checkpoint_parts
    if n == "auto":
        plan = speed.auto_checkpoint_plan(model, cfg, device, liger)
        if int(os.environ.get("RANK", "0")) == 0:
            print(plan.describe(), flush=True)
        n, whole = plan.layers, plan.whole_layers
    if n < 0:
        raise ConfigError(f"model.checkpoint_layers: must be >= 0, got {n}")
    speed.set_checkpoint_layers(model, n, gc_kwargs, parts=cfg.model.checkpoint_parts, whole=whole)


def trainable_parameters(model) -> list[tuple[str, torch.nn.Parameter]]:
    return [(n, p) for n, p in model.named_parameters() if p.requires_grad]
