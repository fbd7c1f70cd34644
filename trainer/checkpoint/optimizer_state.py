"""Optimizer state on disk, keyed by parameter name, loadable at any world size.

One format for plain torch optimizers (DDP, single process) and DeepSpeed ZeRO-2 partitions:

- `optimizer.safetensors` + `optimizer.json` (rank 0; every rank holds the same full state), or
- `optimizer-rank00001.safetensors` + `.json` per rank under ZeRO-2: each rank's slice of every parameter.

Tensors are stored flat as `<state key>/<parameter name>` (`exp_avg/model.norm.weight`, `master/...` for
ZeRO's fp32 master weights); the JSON says which elements of the flattened parameter [start, start+numel)
a file holds, plus hyperparameters and scalar state. A loader stitches the slices it needs from any
set of files, so 2 -> 1 or 1 -> 2 processes is a file operation, not a collective.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch
from safetensors import safe_open

from trainer.checkpoint.optimizer_json import STEP_LIMIT, _finite, check_meta, step_limit
from trainer.errors import CheckpointError, CorruptCheckpoint

FORMAT_VERSION = 1
FULL_NAME = "optimizer"
RANK_NAME = re.compile(r"optimizer-rank(\d{5})\.json$")


def rank_file_stem(rank: int) -> str:
    return f"optimizer-rank{rank:05d}"


def _zero_optimizer(optimizer):
    """The DeepSpeed ZeRO-1/2 optimizer behind accelerate's wrapper, or None for a torch optimizer."""
    inner = getattr(optimizer, "optimizer", optimizer)
    return inner if hasattr(inner, "single_partition_of_fp32_groups") else None


def _torch_optimizer(optimizer):
    while not isinstance(optimizer, torch.optim.Optimizer) or hasattr(optimizer, "optimizer"):
        optimizer = optimizer.optimizer
    return optimizer


def _trainable_names(accelerator, model) -> dict[int, str]:
    module = accelerator.unwrap_model(model)
    return {id(p): n for n, p in module.named_parameters() if p.requires_grad}


def _group_hparams(group: dict) -> dict:
    out = {}
    for k, v in group.items():
        if k == "params":
            continue
        if isinstance(v, torch.Tensor) and v.numel() == 1:
            v = v.item()
        if isinstance(v, tuple):
            v = list(v)
        if v is None or isinstance(v, (bool, int, float, str, list)):
            out[k] = v
    return out


# ---------------------------------------------------------------- saving


def optimizer_snapshot(accelerator, model, optimizer, copy: bool = True) -> tuple[dict[str, dict], dict[str, dict]]:
    """This rank's optimizer files: ({"<stem>.safetensors": tensors}, {"<stem>.json": meta}).

    Tensors are copies on the CPU, safe to write from another thread while training goes on; with
    `copy=False` they are the live tensors (detached), for a write that finishes before training moves on. Under
    DeepSpeed every rank has files (optimizer-rank0000R.*); otherwise only rank 0 (optimizer.*), since
    DDP ranks hold identical state. No collectives: ranks may call it at different times.
    """
    names = _trainable_names(accelerator, model)
    zero = _zero_optimizer(optimizer)
    if zero is not None:
        tensors, meta = _zero_state(zero, names)
        stem = rank_file_stem(accelerator.process_index)
    elif accelerator.is_main_process:
        tensors, meta = _torch_state(_torch_optimizer(optimizer), names)
        stem = FULL_NAME
        scaler = scaler_state(getattr(accelerator, "scaler", None))
        if scaler:  # fp16 mixed precision: the loss scale and its growth tracker, so a resume scales the same
            meta["loss_scaler"] = scaler
    else:
        return {}, {}
    meta.update(rank=accelerator.process_index, world_size=accelerator.num_processes)
    if copy:
        tensors = {k: v.detach().to("cpu", copy=True).contiguous() for k, v in tensors.items()}
    else:
        tensors = {k: v.detach() for k, v in tensors.items()}
    return {f"{stem}.safetensors": tensors}, {f"{stem}.json": meta}


def _torch_state(opt: torch.optim.Optimizer, names: dict[int, str]) -> tuple[dict, dict]:
    tensors, params, groups = {}, {}, []
    for gi, group in enumerate(opt.param_groups):
        hp = _group_hparams(group)
        hp["params"] = [names[id(p)] for p in group["params"] if id(p) in names]
        groups.append(hp)
        for p in group["params"]:
            if id(p) not in names:
                continue
            name, entry = names[id(p)], _param_entry(p, gi, 0, p.numel())
            for key, value in opt.state.get(p, {}).items():
                if isinstance(value, torch.Tensor) and value.shape == p.shape:
                    tensors[f"{key}/{name}"] = value.reshape(-1)
                    entry["sliced"].append(key)
                elif isinstance(value, torch.Tensor) and value.dim() == 0:
                    entry["values"][key] = value.item()
                    entry["scalar_tensors"][key] = str(value.dtype).removeprefix("torch.")
                elif isinstance(value, torch.Tensor):
                    tensors[f"{key}/{name}"] = value
                    entry["whole"].append(key)
                else:
                    entry["values"][key] = value
            params[name] = entry
    meta = {
        "format": FORMAT_VERSION,
        "layout": "full",
        "optimizer_class": type(opt).__name__,
        "param_groups": groups,
        "params": params,
    }
    return tensors, meta


def _param_entry(p, group: int, start: int, numel: int) -> dict:
    return {
        "shape": list(p.shape),
        "group": group,
        "start": start,
        "numel": numel,
        "sliced": [],
        "whole": [],
        "values": {},
        "scalar_tensors": {},
    }


def _zero_state(zero, names: dict[int, str]) -> tuple[dict, dict]:
    inner = zero.optimizer
    tensors, params, groups = {}, {}, []
    for gi, lp_group in enumerate(zero.bit16_groups):
        flat = zero.single_partition_of_fp32_groups[gi]
        state = inner.state.get(flat, {})
        hp = _group_hparams(inner.param_groups[gi])
        hp["params"] = [names[id(p)] for p in lp_group if id(p) in names]
        groups.append(hp)
        for p in lp_group:
            mapping = getattr(p, "_hp_mapping", None)
            if mapping is None or id(p) not in names:
                continue  # no element of this parameter lives in this rank's partition
            name = names[id(p)]
            hp_addr, lp_addr = mapping.hp_fragment_address, mapping.lp_fragment_address
            entry = _param_entry(p, gi, lp_addr.start, lp_addr.numel)
            tensors[f"master/{name}"] = mapping.hp_fragment
            entry["sliced"].append("master")
            for key, value in state.items():
                if isinstance(value, torch.Tensor) and value.shape == flat.shape:
                    tensors[f"{key}/{name}"] = value.narrow(0, hp_addr.start, hp_addr.numel)
                    entry["sliced"].append(key)
                elif isinstance(value, torch.Tensor) and value.dim() == 0:
                    entry["values"][key] = value.item()
                    entry["scalar_tensors"][key] = str(value.dtype).removeprefix("torch.")
                elif not isinstance(value, torch.Tensor):
                    entry["values"][key] = value
            params[name] = entry
    scaler = {k: v for k, v in vars(zero.loss_scaler).items() if isinstance(v, (bool, int, float))}
    meta = {
        "format": FORMAT_VERSION,
        "layout": "zero-partition",
        "optimizer_class": type(inner).__name__,
        "param_groups": groups,
        "params": params,
        "loss_scaler": scaler,
    }
    return tensors, meta


# ---------------------------------------------------------------- reading


class SavedOptimizerState:
    """The optimizer files of one checkpoint: slices of each parameter's state, found by name and range."""

    def __init__(self, ckpt_dir):
        self.dir = Path(ckpt_dir)
        full = self.dir / f"{FULL_NAME}.json"
        stems = (
            [FULL_NAME]
            if full.exists()
            else sorted(p.name[:-5] for p in self.dir.glob("optimizer-rank*.json") if RANK_NAME.match(p.name))
        )
        if not stems:
            raise CheckpointError(
                f"{self.dir}: no optimizer.json or optimizer-rank*.json; the checkpoint is "
                f"incomplete; resume from an earlier one"
            )
        self.files = []
        for stem in stems:
            try:
                meta = json.loads((self.dir / f"{stem}.json").read_text())
            except (OSError, json.JSONDecodeError) as e:
                raise CheckpointError(
                    f"{self.dir / stem}.json: unreadable ({e}); resume from an earlier checkpoint"
                ) from None
            self.files.append((self.dir / f"{stem}.safetensors", meta))
        self.meta = self.files[0][1]
        if not isinstance(self.meta, dict) or "layout" not in self.meta or "param_groups" not in self.meta:
            raise CheckpointError(
                f"{self.dir}: optimizer state in an older or unknown format; resume from a "
                f"checkpoint written by this version, or use --resume never"
            )
        limit = step_limit(self.dir)
        for path, meta in self.files:
            check_meta(meta, str(path.with_suffix(".json")), limit)
        saved_ws = self.meta.get("world_size", len(stems))
        if self.meta["layout"] == "zero-partition" and len(stems) != saved_ws:
            raise CheckpointError(
                f"{self.dir}: {len(stems)} optimizer-rank files for a world size of "
                f"{saved_ws}; the checkpoint is incomplete"
            )
        self.param_groups = self.meta["param_groups"]
        self._handles = {}

    def _open(self, path: Path):
        if path not in self._handles:
            self._handles[path] = safe_open(str(path), framework="pt", device="cpu")
        return self._handles[path]

    def entries(self, name: str) -> list[tuple[Path, dict]]:
        return [(path, meta["params"][name]) for path, meta in self.files if name in meta["params"]]

    def has(self, name: str, key: str) -> bool:
        found = self.entries(name)
        return bool(found) and all(key in e["sliced"] for _, e in found)

    def values(self, name: str, shape: torch.Size | None = None) -> tuple[dict, dict]:
        """The scalar state of parameter `name`, whose saved shape must be `shape` (the model's)."""
        found = self.entries(name)
        if not found:
            raise CheckpointError(
                f"{self.dir}: no optimizer state for parameter {name!r}; the checkpoint "
                f"belongs to a different model or method"
            )
        for path, e in found:
            if shape is not None and e["shape"] != list(shape):
                raise CheckpointError(
                    f"{path.with_suffix('.json')}: optimizer state of parameter {name!r} has shape {e['shape']}, "
                    f"the model's is {list(shape)}; it was saved with another model or method"
                )
        return found[0][1]["values"], found[0][1]["scalar_tensors"]

    def read(self, name: str, key: str, start: int, numel: int) -> torch.Tensor:
        """Elements [start, start+numel) of the flattened `key` state of parameter `name`."""
        out, filled = None, 0
        for path, e in self.entries(name):
            lo, hi = max(start, e["start"]), min(start + numel, e["start"] + e["numel"])
            if lo >= hi:
                continue
            if key not in e["sliced"]:
                raise CheckpointError(f"{path}: no {key!r} state for {name!r}")
            piece = self._slice(path, f"{key}/{name}", e["numel"])[lo - e["start"] : hi - e["start"]]
            if out is None:
                out = torch.empty(numel, dtype=piece.dtype)
            out[lo - start : hi - start] = piece
            filled += hi - lo
        if filled != numel:
            raise CheckpointError(
                f"{self.dir}: optimizer state {key!r} of {name!r} covers {filled} of {numel} "
                f"elements; the checkpoint is incomplete or from a different model"
            )
        return out

    def read_whole(self, name: str, key: str) -> torch.Tensor:
        path, _ = self.entries(name)[0]
        try:
            return self._open(path).get_tensor(f"{key}/{name}")
        except Exception as e:  # safetensors' own error types: a missing tensor, a damaged file
            raise CorruptCheckpoint(f"{path}: cannot read {key}/{name} ({e})") from None

    def _slice(self, path: Path, tensor: str, numel: int):
        """The 1-D tensor of `numel` elements its JSON says, or CorruptCheckpoint."""
        try:
            sl = self._open(path).get_slice(tensor)
            shape, dtype = sl.get_shape(), sl.get_dtype()
        except Exception as e:  # safetensors' own error types: a missing tensor, a damaged file
            raise CorruptCheckpoint(f"{path}: cannot read {tensor} ({e})") from None
        if list(shape) != [numel]:
            raise CorruptCheckpoint(
                f"{path}: {tensor} has shape {list(shape)} ({dtype}), its JSON says {numel} elements; the checkpoint "
                f"is damaged: resume from an earlier one"
            )
        return sl


# ---------------------------------------------------------------- loading


def load_optimizer_state(accelerator, model, optimizer, ckpt_dir) -> None:
    """Fill the optimizer from ckpt_dir in place, whatever world size or layout wrote it.

    Load the model weights first. Param-group dicts are updated in place (not replaced), so an LR
    scheduler bound to the optimizer keeps driving it.
    """
    saved = SavedOptimizerState(ckpt_dir)
    names = _trainable_names(accelerator, model)
    zero = _zero_optimizer(optimizer)
    if zero is not None:
        _load_zero(zero, names, saved)
    else:
        _load_torch(_torch_optimizer(optimizer), names, saved)
        load_scaler_state(getattr(accelerator, "scaler", None), saved.meta.get("loss_scaler"), saved.dir)


SCALER_KEYS = {"scale": float, "growth_factor": float, "backoff_factor": float, "growth_interval": int}


def scaler_state(scaler) -> dict:
    """A torch GradScaler's state as plain numbers ({} without one, or before its first step)."""
    if scaler is None or not scaler.is_enabled():
        return {}
    state = scaler.state_dict()
    if not state or state.get("scale") is None:
        return {}
    return {k: (float(v) if isinstance(v, float) or k == "scale" else int(v)) for k, v in state.items()}


def load_scaler_state(scaler, state: dict | None, where) -> None:
    """Put a saved loss scale back into this run's GradScaler; a checkpoint without one (bf16/fp32, or an older
    version) leaves the scaler at its start values. Every value is checked: the file may come from a bucket."""
    if scaler is None or not scaler.is_enabled() or not state:
        return
    want = {**SCALER_KEYS, "_growth_tracker": int}
    if set(state) - set(want) or not set(SCALER_KEYS) <= set(state):
        raise CorruptCheckpoint(f"{where}: loss_scaler has keys {sorted(state)}, expected {sorted(want)}")
    for k, kind in want.items():
        v = state.get(k, 0)
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not _finite(v) or v < 0:
            raise CorruptCheckpoint(f"{where}: loss_scaler.{k} is {v!r}, not a finite number >= 0")
        if kind is int and v != int(v):
            raise CorruptCheckpoint(f"{where}: loss_scaler.{k} is {v!r}, not an integer")
    if not 0 < state["scale"] <= 2.0**128:
        raise CorruptCheckpoint(f"{where}: loss_scaler.scale {state['scale']!r} is out of range")
    scaler.load_state_dict({k: want[k](state.get(k, 0)) for k in want})


def _restore_groups(groups: list[dict], saved: SavedOptimizerState, group_names: list[list[str]]) -> None:
    if len(groups) != len(saved.param_groups):
        raise CheckpointError(
            f"{saved.dir}: the checkpoint has {len(saved.param_groups)} optimizer param "
            f"groups, this run has {len(groups)}; resume with the same optimizer settings"
        )
    for group, want, names in zip(groups, saved.param_groups, group_names):
        if sorted(names) != sorted(want["params"]):
            raise CheckpointError(
                f"{saved.dir}: optimizer param groups hold different parameters than this "
                f"run's; resume with the same model, method and optimizer settings"
            )
        for k, v in want.items():
            if k == "params" or k not in group:
                continue
            group[k] = tuple(v) if isinstance(group[k], tuple) else v


def _step_value(opt, value, dtype_name: str | None):
    if dtype_name is not None:
        return torch.tensor(value, dtype=getattr(torch, dtype_name))
    if isinstance(opt, (torch.optim.Adam, torch.optim.AdamW)):
        return torch.tensor(float(value), dtype=torch.float32)
    return value


def _load_torch(opt: torch.optim.Optimizer, names: dict[int, str], saved: SavedOptimizerState) -> None:
    _restore_groups(
        opt.param_groups, saved, [[names[id(p)] for p in g["params"] if id(p) in names] for g in opt.param_groups]
    )
    for group in opt.param_groups:
        on_device = group.get("fused") or group.get("capturable")
        for p in group["params"]:
            if id(p) not in names:
                continue
            name = names[id(p)]
            values, scalar_tensors = saved.values(name, p.shape)  # first: the shapes are checked
            state = opt.state[p]
            for key in sorted({k for _, e in saved.entries(name) for k in e["sliced"]} - {"master"}):
                state[key] = saved.read(name, key, 0, p.numel()).view(p.shape).to(p.device)
            for key in saved.entries(name)[0][1]["whole"]:
                state[key] = saved.read_whole(name, key).to(p.device)
            for key, value in values.items():
                v = _step_value(opt, value, scalar_tensors.get(key)) if key == "step" else value
                if isinstance(v, torch.Tensor) and key in scalar_tensors:
                    v = v.to(p.device if on_device else "cpu")
                state[key] = v


def _load_zero(zero, names: dict[int, str], saved: SavedOptimizerState) -> None:
    inner = zero.optimizer
    group_names = [[names[id(p)] for p in g if id(p) in names] for g in zero.bit16_groups]
    _restore_groups(inner.param_groups, saved, group_names)
    missing_master = False
    step = None
    for gi, lp_group in enumerate(zero.bit16_groups):
        flat = zero.single_partition_of_fp32_groups[gi]
        state = inner.state[flat]
        for p in lp_group:
            mapping = getattr(p, "_hp_mapping", None)
            if mapping is None or id(p) not in names:
                continue
            name, lp = names[id(p)], mapping.lp_fragment_address
            hp = mapping.hp_fragment_address
            values, scalar_tensors = saved.values(name, p.shape)  # first: the shapes are checked
            if saved.has(name, "master"):
                mapping.hp_fragment.data.copy_(saved.read(name, "master", lp.start, lp.numel))
            else:
                missing_master = True
            for key in ("exp_avg", "exp_avg_sq"):
                if not saved.has(name, key):
                    continue
                if key not in state:
                    state[key] = torch.zeros_like(flat)
                state[key].narrow(0, hp.start, hp.numel).copy_(saved.read(name, key, lp.start, lp.numel))
            if "step" in values:
                step = values["step"]
                state["step"] = _step_value(inner, int(step), None if _is_cpu_adam(inner) else "float32")
    if missing_master:
        zero.refresh_fp32_params()  # a torch-optimizer checkpoint: the model weights are the masters
    for k, v in saved.meta.get("loss_scaler", {}).items():
        if hasattr(zero.loss_scaler, k):
            setattr(zero.loss_scaler, k, v)
    if step is not None and _is_cpu_adam(inner):
        _replay_cpu_adam_steps(inner, int(step))
    # ZeRO links per-parameter views into optimizer state lazily; relink to the tensors set here
    zero._hp_optimizer_states_linked = False


def _is_cpu_adam(opt) -> bool:
    return hasattr(opt, "ds_opt_adam") and hasattr(opt, "opt_id")


def _replay_cpu_adam_steps(opt, step: int) -> None:
    """Bring DeepSpeedCPUAdam's C++ bias-correction state to `step` the way an unbroken run got there.

    The C++ optimizer keeps beta1^t and beta2^t as running float products; a fresh process would compute
    them with pow() at step t+1, which differs in the last bits, so resumed weights would not be bitwise
    equal to an uninterrupted run. Replaying the increments on a 1-element dummy costs ~2 us per step.
    """
    if not 0 <= step <= STEP_LIMIT:  # checked when read; a replay is never longer than this
        raise CorruptCheckpoint(f"optimizer step {step} is not between 0 and {STEP_LIMIT}; not replayed")
    group = opt.param_groups[0]
    beta1, beta2 = group["betas"]
    buf = [torch.zeros(1) for _ in range(4)]
    for t in range(1, step + 1):
        opt.ds_opt_adam.adam_update(
            opt.opt_id, t, 0.0, beta1, beta2, group["eps"], 0.0, group.get("bias_correction", True), *buf
        )
