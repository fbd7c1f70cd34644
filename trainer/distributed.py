"""Processes and precision: the Accelerator, the batch arithmetic and the DeepSpeed config.

Launch with `accelerate launch` (or torchrun); this module turns the config into an Accelerator that
agrees with the launcher on the world size. On machines without CUDA (CI, laptops) processes talk over
gloo: plain DDP through `Accelerator(cpu=True)`, DeepSpeed through the gloo backend handed to accelerate
(accelerate alone picks no backend for DeepSpeed without CUDA, and every rank would think it is rank 0).
"""

from __future__ import annotations

import copy
import json
import os
import socket
from datetime import timedelta
from importlib import resources
from pathlib import Path

import torch

from trainer.errors import ConfigError

# The package's own copies (package data), so a non-editable install finds them; the repo's top-level
# deepspeed_configs/ holds the same files for people to read and copy (a test keeps them identical).
DEEPSPEED_CONFIG_DIR = Path(str(resources.files("trainer") / "deepspeed_configs"))
_SOURCE_TREE = Path(__file__).resolve().parents[1]  # the repo in a clone or editable install


def world_size_from_env() -> int:
    """The number of processes the launcher started (1 for a plain `python` run)."""
    return int(os.environ.get("WORLD_SIZE", 1))


def local_world_size(world: int) -> int:
    """Processes per node (torchrun's LOCAL_WORLD_SIZE); the whole world when it is not set."""
    try:
        n = int(os.environ.get("LOCAL_WORLD_SIZE", world))
    except ValueError:
        return world
    return n if 1 <= n <= world and world % n == 0 else world


def resolve_grad_accum(cfg, world_size: int) -> int:
    """Micro-batches per optimizer step on each process, from train.global_batch_size or train.grad_accum."""
    t = cfg.train
    if t.global_batch_size is None:
        return t.grad_accum or 1
    per_pass = t.micro_batch_size * world_size
    if t.global_batch_size % per_pass:
        lower = max(per_pass, t.global_batch_size - t.global_batch_size % per_pass)
        raise ConfigError(
            f"train.global_batch_size={t.global_batch_size} is not a multiple of train.micro_batch_size "
            f"({t.micro_batch_size}) x {world_size} process(es) = {per_pass}; set it to a multiple of {per_pass} "
            f"(e.g. {lower}) or change train.micro_batch_size"
        )
    return t.global_batch_size // per_pass


def mixed_precision(cfg, cuda: bool | None = None) -> str:
    """accelerate's mixed_precision ('bf16' | 'fp16' | 'no') for model.dtype; 'auto' is bf16 on a GPU that has it."""
    cuda = torch.cuda.is_available() if cuda is None else cuda
    dtype = cfg.model.dtype
    if dtype == "fp16" and not cuda:
        raise ConfigError("model.dtype fp16: mixed precision fp16 needs a CUDA GPU; use bf16 or fp32 on the CPU")
    if dtype == "auto":
        return "bf16" if cuda and torch.cuda.is_bf16_supported() else "no"
    return {"bf16": "bf16", "fp16": "fp16", "fp32": "no"}[dtype]


def resolve_deepspeed_config(name_or_path: str) -> Path:
    """A DeepSpeed JSON by name (deepspeed_configs/<name>.json) or by path."""
    path = Path(name_or_path).expanduser()
    if path.suffix == ".json" or "/" in name_or_path:
        if not path.is_file() and not path.is_absolute() and (_SOURCE_TREE / path).is_file():
            path = _SOURCE_TREE / path  # launch/*.yaml name repo-relative files; the CWD may be elsewhere
        elif (
            not path.is_file()
            and path.parent.name == "deepspeed_configs"
            and (DEEPSPEED_CONFIG_DIR / path.name).is_file()
        ):
            path = DEEPSPEED_CONFIG_DIR / path.name  # no repo around (a pip install): the package's identical copy
        if not path.is_file():
            raise ConfigError(
                f"distributed.deepspeed: {name_or_path}: file not found; give a DeepSpeed JSON "
                f"or one of: {', '.join(deepspeed_config_names())}"
            )
        return path
    named = DEEPSPEED_CONFIG_DIR / f"{name_or_path}.json"
    if not named.is_file():
        raise ConfigError(
            f"distributed.deepspeed: no config named {name_or_path!r} in {DEEPSPEED_CONFIG_DIR}; "
            f"use one of: {', '.join(deepspeed_config_names())}, or a path to a JSON file"
        )
    return named


def deepspeed_config_names() -> list[str]:
    return sorted(p.stem for p in DEEPSPEED_CONFIG_DIR.glob("*.json"))


def deepspeed_config_name(cfg) -> str | None:
    """distributed.deepspeed, else the JSON an `accelerate launch` DeepSpeed config named, else None."""
    if cfg.distributed.deepspeed is not None:
        return cfg.distributed.deepspeed
    if os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true":
        from_launcher = os.environ.get("ACCELERATE_DEEPSPEED_CONFIG_FILE", "none")
        if from_launcher == "none":
            raise ConfigError(
                "the launcher enabled DeepSpeed without a deepspeed_config_file; set "
                "distributed.deepspeed (e.g. --set distributed.deepspeed=zero2_offload)"
            )
        return from_launcher
    return None


def deepspeed_config(cfg, grad_accum: int, world_size: int) -> dict:
    """The DeepSpeed JSON named by distributed.deepspeed (or the launcher) with our "auto" values filled in."""
    path = resolve_deepspeed_config(deepspeed_config_name(cfg))
    try:
        ds = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ConfigError(f"{path}: not valid JSON (line {e.lineno}: {e.msg})") from None
    if ds.get("zero_optimization", {}).get("stage", 0) == 3:
        raise ConfigError(
            f"{path}: ZeRO stage 3 is not supported (checkpoints assume whole weights on every process); use stage 2"
        )
    if "optimizer" in ds or "scheduler" in ds:
        raise ConfigError(f"{path}: remove 'optimizer'/'scheduler'; they come from the train section")
    if cfg.train.optimizer != "adamw":
        # with offload accelerate swaps the optimizer for DeepSpeedCPUAdam, and a bitsandbytes one
        # would silently become Adam with L2 decay; ZeRO partitions are untested with bitsandbytes
        raise ConfigError(
            f"train.optimizer={cfg.train.optimizer} cannot run under DeepSpeed ({path.name}); "
            f"use train.optimizer=adamw (the 8-bit/paged optimizers replace offload, use them "
            f"without distributed.deepspeed)"
        )
    precision = mixed_precision(cfg, torch.cuda.is_available() and cfg.train.device != "cpu")
    micro = cfg.train.micro_batch_size
    # the values the train section owns: the JSON leaves them "auto" so batch settings live in one place
    ours = {
        "train_micro_batch_size_per_gpu": micro,
        "gradient_accumulation_steps": grad_accum,
        "train_batch_size": micro * grad_accum * world_size,
        "gradient_clipping": float(cfg.train.max_grad_norm or 0.0),
        "bf16.enabled": precision == "bf16",
        "fp16.enabled": precision == "fp16",
    }
    ds = copy.deepcopy(ds)
    for key, value in ours.items():
        node = ds
        *parents, leaf = key.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        if node.get(leaf, "auto") not in ("auto", value):
            raise ConfigError(
                f"{path}: {key} is {node[leaf]!r} but the train config says {value!r}; set it to "
                f'"auto" so the train section decides'
            )
        node[leaf] = value
    return ds


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def make_accelerator(cfg, grad_accum: int):
    """An Accelerator whose world size matches the launcher's, with precision and DeepSpeed from cfg."""
    from accelerate import Accelerator
    from accelerate.utils import DeepSpeedPlugin, InitProcessGroupKwargs

    _unwrap_without_deepspeed_import()
    world_size = world_size_from_env()
    if cfg.train.device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("train.device cuda: no CUDA GPU is visible; use train.device: auto or cpu")
    cuda = torch.cuda.is_available() and cfg.train.device != "cpu"
    precision = mixed_precision(cfg, cuda)
    kwargs = dict(
        gradient_accumulation_steps=grad_accum,
        mixed_precision=precision,
        # our schedules count optimizer steps; accelerate would otherwise step the
        # scheduler once per process per optimizer step
        step_scheduler_with_optimizer=False,
    )
    # a collective waits this long for a peer, then fails (a dead rank becomes a restart, not a hang)
    group = dict(timeout=timedelta(seconds=cfg.distributed.timeout_s))
    if deepspeed_config_name(cfg) is not None:
        if "LOCAL_RANK" not in os.environ:
            # a plain `python` run: DeepSpeed still wants a process group; make a group of one
            os.environ.update(
                RANK="0",
                LOCAL_RANK="0",
                WORLD_SIZE="1",
                LOCAL_WORLD_SIZE="1",
                MASTER_ADDR=os.environ.get("MASTER_ADDR", "127.0.0.1"),
                MASTER_PORT=os.environ.get("MASTER_PORT", str(_free_port())),
            )
        ds = deepspeed_config(cfg, grad_accum, world_size)
        kwargs["deepspeed_plugin"] = DeepSpeedPlugin(hf_ds_config=ds, zero3_init_flag=False)
        if not cuda:
            # accelerate only chooses a backend for DeepSpeed on an accelerator; without this
            # each process initialises a world of its own
            group["backend"] = "gloo"
    elif not cuda:
        # without cpu=True a CPU launch is N single-process runs that all believe they are rank 0
        kwargs["cpu"] = True
    kwargs["kwargs_handlers"] = [InitProcessGroupKwargs(**group)]
    accelerator = Accelerator(**kwargs)
    if accelerator.num_processes != world_size:
        raise ConfigError(
            f"the launcher started {world_size} processes but accelerate sees "
            f"{accelerator.num_processes} (distributed type {accelerator.distributed_type}); "
            f"launch with `accelerate launch --num_processes N` or torchrun and check the backend"
        )
    return accelerator


def _unwrap_without_deepspeed_import() -> None:
    """accelerate's unwrap (Accelerator.unwrap_model, transformers' save_pretrained) imports DeepSpeed wherever it is
    installed, to test isinstance(model, DeepSpeedEngine): 1,646 modules (mlflow and pandas, through DeepSpeed's
    autotuner), 3.0-3.5 s of CPU on a 2-core machine, in a run without DeepSpeed. No model is a DeepSpeedEngine
    before deepspeed is imported, so the test waits for that import (accelerate's DeepSpeed path does it) and is
    otherwise the same."""
    import sys

    from accelerate.utils import other

    available = other.is_deepspeed_available
    if getattr(available, "imported_only", False):
        return

    def imported_and_available() -> bool:
        return "deepspeed" in sys.modules and available()

    imported_and_available.imported_only = True
    other.is_deepspeed_available = imported_and_available


def release(accelerator) -> None:
    """Tear down the process group so the interpreter exits cleanly; drop your model/optimizer refs first.

    With gloo, a DDP model still alive at interpreter exit lets a gloo worker thread destroy its last
    work item while Python finalizes, which aborts the process (SIGABRT, "terminate called without an
    active exception") in roughly 1 of 8 runs. Freeing the models before destroying the group avoids it.
    """
    import gc

    import torch.distributed as dist

    if dist.is_initialized():
        accelerator.wait_for_everyone()
    accelerator.free_memory()
    gc.collect()
    accelerator.end_training()  # destroys the default process group


def agree_int(value: int, accelerator, any_rank: int | None = None) -> int:
    """Rank 0's `value` on every rank (one all-reduce MAX; the other ranks pass the smallest int64). No pickling.
    With `any_rank`, the largest of every rank's own value instead."""
    import torch.distributed as dist

    mine = any_rank if any_rank is not None else value if accelerator.is_main_process else -(2**62)
    if accelerator.num_processes == 1 or not (dist.is_available() and dist.is_initialized()):
        return mine if any_rank is not None else value
    t = torch.tensor([mine], dtype=torch.int64, device=accelerator.device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return int(t.item())
