"""The built-in instruction dataset: small string tasks a tiny model learns in minutes on a CPU."""

from __future__ import annotations

import random

from trainer.config.schema import BuiltinDataConfig

LETTERS = "abcdefghijklmnopqrstuvwxyz"
DATA_SEED = 1234  # fixed: the data is the same for every run; the training seed only orders it


def _example(task: str, rng: random.Random, cfg: BuiltinDataConfig) -> dict:
    n = rng.randint(cfg.min_len, cfg.max_len)
    if task == "reverse":
        s = "".join(rng.choice(LETTERS) for _ in range(n))
        return {"prompt": f"reverse {s} =", "completion": f" {s[::-1]}"}
    if task == "sort":
        s = "".join(rng.choice(LETTERS) for _ in range(n))
        return {"prompt": f"sort {s} =", "completion": f" {''.join(sorted(s))}"}
    if task == "add":
        a, b = rng.randint(0, 10 ** min(n, 4) - 1), rng.randint(0, 999)
        return {"prompt": f"add {a}+{b} =", "completion": f" {a + b}"}
    raise ValueError(task)


def generate(cfg: BuiltinDataConfig) -> tuple[list[dict], list[dict]]:
    """(train, eval) rows of {prompt, completion}; eval prompts never appear in train."""
    from trainer.errors import ConfigError

    bad = [t for t in cfg.tasks if t not in ("reverse", "sort", "add")]
    if bad:
        raise ConfigError(f"data.builtin.tasks: unknown task {bad[0]!r}; choose from reverse, sort, add")
    if not cfg.tasks:
        raise ConfigError("data.builtin.tasks: give at least one task (reverse, sort, add)")
    rng = random.Random(DATA_SEED)
    seen, train, evals = set(), [], []
    want = cfg.num_train + cfg.num_eval
    attempts = 0
    while len(train) + len(evals) < want and attempts < want * 20:
        attempts += 1
        ex = _example(cfg.tasks[attempts % len(cfg.tasks)], rng, cfg)
        if ex["prompt"] in seen:
            continue
        seen.add(ex["prompt"])
        (evals if len(evals) < cfg.num_eval else train).append(ex)
    return train, evals
