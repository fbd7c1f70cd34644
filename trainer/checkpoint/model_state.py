"""Training state as plain files: trainable weights in safetensors, RNG state in JSON (optimizer: optimizer_state.py).

Nothing here unpickles: a checkpoint from an untrusted bucket cannot run code.
"""

from __future__ import annotations

import base64
import random

import numpy as np
import torch

from trainer.errors import CheckpointError, CorruptCheckpoint


def trainable_state(model, copy: bool = True) -> dict[str, torch.Tensor]:
    """Trainable parameters by name, copied to CPU (a snapshot safe to write in the background); `copy=False`:
    the live tensors, for a write that finishes before the next optimizer step."""
    if not copy:
        return {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}
    return {n: p.detach().to("cpu", copy=True).contiguous() for n, p in model.named_parameters() if p.requires_grad}


def load_trainable_state(model, tensors: dict[str, torch.Tensor], where: str) -> None:
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    missing = sorted(set(params) - set(tensors))
    unexpected = sorted(set(tensors) - set(params))
    if missing or unexpected:
        raise CheckpointError(
            f"{where}: weights do not match the model (missing {missing[:3]}, "
            f"unexpected {unexpected[:3]}); was it saved with another model or method?"
        )
    for n, p in params.items():  # all checked before any is copied (copy_ would broadcast a smaller one)
        if tensors[n].shape != p.shape:
            raise CheckpointError(
                f"{where}: parameter {n!r} has shape {list(tensors[n].shape)} in the checkpoint, "
                f"{list(p.shape)} in the model; was it saved with another model or method?"
            )
    with torch.no_grad():
        for n, p in params.items():
            p.copy_(tensors[n].to(p.device, p.dtype))


def _b64(t: torch.Tensor) -> str:
    return base64.b64encode(t.numpy().tobytes()).decode()


def _unb64(s: str) -> torch.Tensor:
    return torch.frombuffer(bytearray(base64.b64decode(s)), dtype=torch.uint8).clone()


def capture_rng() -> tuple:
    """This process's python, numpy and torch (CPU and CUDA) RNG states, as cheap raw copies."""
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None
    return random.getstate(), np.random.get_state(), torch.get_rng_state(), cuda


def rng_json(raw: tuple) -> dict:
    """A capture_rng() result in JSON-safe form (what rng-rank*.json holds)."""
    py, npst, cpu, cuda = raw
    out = {
        "python": [py[0], list(py[1]), py[2]],
        "numpy": [npst[0], npst[1].tolist(), int(npst[2]), int(npst[3]), float(npst[4])],
        "torch": _b64(cpu),
    }
    if cuda is not None:
        out["cuda"] = [_b64(s) for s in cuda]
    return out


def set_rng_state(state: dict, where: str = "rng state") -> None:
    """Restore capture_rng()'s states from rng_json()'s form; anything else is CorruptCheckpoint."""
    try:
        _set_rng_state(state)
    except (KeyError, IndexError, TypeError, ValueError, OverflowError, RuntimeError) as e:
        raise CorruptCheckpoint(f"{where}: not a valid RNG state ({str(e)[:100]}); the checkpoint is damaged") from None


def _set_rng_state(state: dict) -> None:
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    n = state["numpy"]
    np.random.set_state((n[0], np.array(n[1], dtype=np.uint32), n[2], n[3], n[4]))
    torch.set_rng_state(_unb64(state["torch"]))
    if "cuda" in state and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all([_unb64(s) for s in state["cuda"]])
