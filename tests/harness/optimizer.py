"""Optimizer state helpers for tests: write one rank's files, read a checkpoint's whole state back by name."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from trainer.checkpoint.optimizer_state import SavedOptimizerState, optimizer_snapshot
from trainer.checkpoint.stream import write_safetensors
from trainer.durable import write_file


def save_optimizer_state(accelerator, model, optimizer, ckpt_dir) -> list[Path]:
    """Write (and fsync) this rank's optimizer files into ckpt_dir, as the checkpoint writer does."""
    tensors, meta = optimizer_snapshot(accelerator, model, optimizer)
    ckpt_dir = Path(ckpt_dir)
    for name, t in tensors.items():
        write_safetensors(ckpt_dir / name, t)
    for name, obj in meta.items():
        write_file(ckpt_dir / name, json.dumps(obj, indent=1, sort_keys=True).encode())
    return [ckpt_dir / n for n in (*tensors, *meta)]


def consolidate_optimizer_state(ckpt_dir) -> dict[str, dict[str, torch.Tensor]]:
    """Full per-parameter state {name: {key: tensor}} from any checkpoint layout."""
    saved = SavedOptimizerState(ckpt_dir)
    out = {}
    for name in sorted({n for _, meta in saved.files for n in meta["params"]}):
        e = saved.entries(name)[0][1]
        numel = 1
        for d in e["shape"]:
            numel *= d
        keys = sorted({k for _, x in saved.entries(name) for k in x["sliced"]})
        out[name] = {k: saved.read(name, k, 0, numel).view(e["shape"]) for k in keys}
    return out
