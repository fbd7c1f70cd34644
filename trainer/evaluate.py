"""Evaluation: loss on held-out rows, and exact-match accuracy of greedy answers to held-out prompts.

Both take `tick`, called before every batch (and, while generating, every half second between tokens: one batch
of long answers can outlast hang_timeout): it beats the heartbeat (an eval longer than the supervisor's hang_timeout
is not a hang) and returns True when a stop was requested, which ends the eval at once (Interrupted).
"""

from __future__ import annotations

import time
from collections.abc import Callable

import torch

from trainer.batches import collate, count_targets

Tick = Callable[[], bool]


class Interrupted(Exception):
    """A stop was requested during the eval; its result is dropped."""


def _check(tick: Tick | None) -> None:
    if tick is not None and tick():
        raise Interrupted


@torch.no_grad()
def eval_loss(
    model, rows: list[dict], pad_id: int, batch_size: int, device: torch.device, tick: Tick | None = None
) -> float | None:
    """Token-weighted mean loss over the rows."""
    if not rows:
        return None
    was_training = model.training
    model.eval()
    try:
        return _eval_loss(model, rows, pad_id, batch_size, device, tick)
    finally:
        model.train(was_training)


def _eval_loss(model, rows, pad_id, batch_size, device, tick) -> float | None:
    total, n = 0.0, 0
    for i in range(0, len(rows), batch_size):
        _check(tick)
        batch = {k: v.to(device) for k, v in collate(rows[i : i + batch_size], pad_id).items()}
        k = count_targets(batch["labels"])
        if k == 0:
            continue
        out = model(**batch, num_items_in_batch=k, use_cache=False)
        total += float(out.loss) * k
        n += k
    return total / n if n else None


@torch.no_grad()
def exact_match(
    model,
    tokenizer,
    prompts: list[dict],
    max_new_tokens: int,
    batch_size: int,
    device: torch.device,
    tick: Tick | None = None,
) -> float | None:
    """Share of prompts whose greedy completion equals the reference (whitespace-stripped)."""
    if not prompts:
        return None
    was_training = model.training
    model.eval()
    try:
        return _exact_match(model, tokenizer, prompts, max_new_tokens, batch_size, device, tick)
    finally:
        model.train(was_training)


class _TickWhileGenerating:
    """A stopping criterion that ticks between generated tokens (at most every `every_s`) and ends the generation
    when the tick says stop; `stopped` then tells the caller to drop the result."""

    def __init__(self, tick: Tick, every_s: float = 0.5):
        self.tick, self.every_s = tick, every_s
        self.stopped = False
        self._last = time.monotonic()

    def __call__(self, input_ids: torch.Tensor, scores, **kwargs) -> torch.Tensor:
        now = time.monotonic()
        if not self.stopped and now - self._last >= self.every_s:
            self._last = now
            self.stopped = bool(self.tick())
        return torch.full((input_ids.shape[0],), self.stopped, dtype=torch.bool, device=input_ids.device)


def _exact_match(model, tokenizer, prompts, max_new_tokens, batch_size, device, tick) -> float:
    from transformers import StoppingCriteriaList

    bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    pad = tokenizer.pad_token_id
    hits = 0
    for i in range(0, len(prompts), batch_size):
        _check(tick)
        chunk = prompts[i : i + batch_size]
        enc = [bos + tokenizer(p["prompt"], add_special_tokens=False)["input_ids"] for p in chunk]
        L = max(len(e) for e in enc)
        ids = torch.full((len(enc), L), pad, dtype=torch.long)
        mask = torch.zeros((len(enc), L), dtype=torch.long)
        for j, e in enumerate(enc):  # left padding for generation
            ids[j, L - len(e) :] = torch.tensor(e)
            mask[j, L - len(e) :] = 1
        between = _TickWhileGenerating(tick) if tick is not None else None
        out = model.generate(
            input_ids=ids.to(device),
            attention_mask=mask.to(device),
            do_sample=False,
            max_new_tokens=max_new_tokens,
            pad_token_id=pad,
            use_cache=True,
            eos_token_id=tokenizer.eos_token_id,
            stopping_criteria=StoppingCriteriaList([between]) if between is not None else None,
        )
        if between is not None and between.stopped:
            raise Interrupted
        for j, p in enumerate(chunk):
            text = tokenizer.decode(out[j, L:], skip_special_tokens=True)
            hits += int(text.strip() == p["completion"].strip())
    return hits / len(prompts)
