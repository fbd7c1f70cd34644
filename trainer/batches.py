"""Batches: sample order as a pure function of (seed, epoch), exact positions, padding and packing.

A training position is (epoch, samples consumed in that epoch). Resuming jumps straight to it:
nothing is iterated over to skip (transformers#11284 took 28 h to skip).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from trainer.data import IGNORE


def epoch_order(n: int, seed: int, epoch: int) -> np.ndarray:
    """The permutation of row indices for an epoch; depends only on (n, seed, epoch)."""
    return np.random.default_rng([seed, epoch]).permutation(n)


def pack_rows(rows: list[dict], max_length: int, seed: int) -> list[dict]:
    """Greedy first-fit packing into rows of <= max_length tokens, with per-document position ids."""
    order = np.random.default_rng([seed, 10_007]).permutation(len(rows))
    bins: list[dict] = []
    space: list[int] = []
    for i in order:
        r = rows[int(i)]
        n = len(r["input_ids"])
        for b, free in enumerate(space):  # noqa: B007  (b is the bin found, used after the loop)
            if free >= n:
                break
        else:
            bins.append({"input_ids": [], "labels": [], "position_ids": []})
            space.append(max_length)
            b = len(bins) - 1
        bins[b]["input_ids"] += r["input_ids"]
        # the first token of a document is never a target of the previous document's last token
        bins[b]["labels"] += [IGNORE] + r["labels"][1:]
        bins[b]["position_ids"] += list(range(n))
        space[b] -= n
    return bins


@dataclass
class Position:
    epoch: int = 0
    offset: int = 0  # samples of this epoch already consumed (over all ranks)

    def to_dict(self) -> dict:
        return {"epoch": self.epoch, "offset": self.offset}


class BatchPlan:
    """Which rows each rank trains on at each optimizer step, for any world size."""

    def __init__(self, n_rows: int, seed: int, micro_batch: int, grad_accum: int, world_size: int):
        self.n_rows, self.seed = n_rows, seed
        self.micro_batch, self.grad_accum, self.world_size = micro_batch, grad_accum, world_size
        self.global_batch = micro_batch * grad_accum * world_size
        self.steps_per_epoch = n_rows // self.global_batch  # the partial last batch is dropped
        self._order_cache: tuple[int, np.ndarray] | None = None

    def _order(self, epoch: int) -> np.ndarray:
        if self._order_cache is None or self._order_cache[0] != epoch:
            self._order_cache = (epoch, epoch_order(self.n_rows, self.seed, epoch))
        return self._order_cache[1]

    def step_rows(self, pos: Position, rank: int) -> tuple[list[list[int]], Position]:
        """Row indices of this rank's micro-batches for the step at `pos`, and the position after it."""
        if pos.offset + self.global_batch > self.n_rows:
            pos = Position(pos.epoch + 1, 0)
        order = self._order(pos.epoch)
        step = order[pos.offset : pos.offset + self.global_batch]
        per_micro = self.micro_batch * self.world_size
        micro = [
            step[m * per_micro + rank * self.micro_batch : m * per_micro + (rank + 1) * self.micro_batch]
            for m in range(self.grad_accum)
        ]
        nxt = Position(pos.epoch, pos.offset + self.global_batch)
        return [[int(i) for i in mb] for mb in micro], nxt


def collate(rows: list[dict], pad_id: int) -> dict[str, torch.Tensor]:
    """Pad to the longest row in the micro-batch (right padding); labels padded with -100."""
    L = max(len(r["input_ids"]) for r in rows)
    ids = torch.full((len(rows), L), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), L), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(rows), L), dtype=torch.long)
    packed = "position_ids" in rows[0]
    pos = torch.zeros((len(rows), L), dtype=torch.long) if packed else None
    for i, r in enumerate(rows):
        n = len(r["input_ids"])
        ids[i, :n] = torch.tensor(r["input_ids"])
        labels[i, :n] = torch.tensor(r["labels"])
        mask[i, :n] = 1
        if packed:
            pos[i, :n] = torch.tensor(r["position_ids"])
    out = {"input_ids": ids, "labels": labels}
    if packed:
        # packed rows: no attention_mask, position ids restart per document so attention does not cross them
        # (transformers builds a per-document mask from position_ids when attention_mask is None;
        # padding gets position 0, so each pad token is its own one-token document, with label -100)
        out["position_ids"] = pos
    else:
        out["attention_mask"] = mask
    return out


def count_targets(labels: torch.Tensor) -> int:
    """Tokens that contribute to the loss (labels shifted by one, as causal LM loss does)."""
    return int((labels[:, 1:] != IGNORE).sum())
