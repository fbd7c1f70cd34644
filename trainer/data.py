"""Data: load rows with `datasets`, render a format, tokenize with response-only labels, cache on disk."""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path

from trainer.config.schema import Config, DataConfig
from trainer.durable import replace_file
from trainer.errors import ConfigError

log = logging.getLogger(__name__)

IGNORE = -100
ALPACA_PROMPT = "### Instruction:\n{instruction}\n\n### Response:\n"
ALPACA_PROMPT_INPUT = "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
REQUIRED = {
    "text": ["text"],
    "alpaca": ["instruction", "output"],
    "chat": ["messages"],
    "completion": ["prompt", "completion"],
}
_BUILDERS = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv", ".txt": "text"}


@dataclass
class TokenizedData:
    """Tokenized train/eval rows: lists of input_ids and labels; eval keeps raw prompts for generation."""

    train: list[dict]
    eval: list[dict]
    eval_prompts: list[dict]  # {"prompt": str, "completion": str} for exact-match eval; may be empty


# ---------------------------------------------------------------- loading rows


def _load_rows(path: str, split: str, what: str) -> list[dict]:
    """Rows from a local file, a saved dataset dir, or a hub dataset name."""
    import datasets

    datasets.disable_progress_bars()
    p = Path(path)
    try:
        if p.is_dir() and ((p / "dataset_info.json").exists() or (p / "dataset_dict.json").exists()):
            ds = datasets.load_from_disk(str(p))
            if isinstance(ds, datasets.DatasetDict):
                if split not in ds:
                    raise ConfigError(f"{what} {path}: no split {split!r} (has {', '.join(ds)})")
                ds = ds[split]
        elif p.is_file():
            builder = _BUILDERS.get(p.suffix.lower())
            if builder is None:
                raise ConfigError(
                    f"{what} {path}: unsupported file type {p.suffix!r}; use "
                    f"{', '.join(_BUILDERS)} or a saved dataset dir"
                )
            ds = datasets.load_dataset(builder, data_files=str(p), split="train")
        elif p.exists() or path.startswith((".", "/", "~")) or p.suffix.lower() in _BUILDERS:
            raise ConfigError(f"{what} {path}: file not found")
        else:
            ds = datasets.load_dataset(path, split=split)  # a hub name (real use only)
    except ConfigError:
        raise
    except Exception as e:  # datasets raises many types for bad files
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise ConfigError(f"{what} {path}: cannot load ({msg})") from None
    return ds.to_list()


def load_rows(cfg: DataConfig, seed: int) -> tuple[list[dict], list[dict]]:
    """(train_rows, eval_rows) before tokenization."""
    if cfg.path == "builtin:tasks":
        from trainer.builtin.tasks import generate

        if cfg.format != "completion":
            raise ConfigError("data.format: builtin:tasks rows are prompt/completion; use format: completion")
        return generate(cfg.builtin)
    rows = _load_rows(cfg.path, cfg.split, "data.path")
    if not rows:
        raise ConfigError(f"data.path {cfg.path}: no rows")
    need = REQUIRED[cfg.format]
    missing = [k for k in need if k not in rows[0]]
    if missing:
        raise ConfigError(
            f"data.path {cfg.path}: format {cfg.format!r} needs field(s) {', '.join(missing)}; "
            f"the rows have {', '.join(rows[0])}. Set data.format to match the data"
        )
    ev = cfg.eval_split
    if isinstance(ev, str):
        return rows, _load_rows(ev, "train", "data.eval_split")
    if not ev:
        return rows, []
    import random

    idx = list(range(len(rows)))
    random.Random(seed).shuffle(idx)
    n_eval = max(1, int(len(rows) * ev))
    eval_idx = set(idx[:n_eval])
    return [r for i, r in enumerate(rows) if i not in eval_idx], [rows[i] for i in sorted(eval_idx)]


# ---------------------------------------------------------------- tokenizing


def _prompt_completion(row: dict, fmt: str) -> tuple[str, str]:
    if fmt == "completion":
        return str(row["prompt"]), str(row["completion"])
    inp = row.get("input") or ""
    tmpl = ALPACA_PROMPT_INPUT if inp else ALPACA_PROMPT
    return tmpl.format(instruction=row["instruction"], input=inp), str(row["output"])


def _ids(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def _tokenize_chat(tokenizer, messages: list[dict]) -> tuple[list[int], list[int]]:
    """Render with the chat template; labels only on assistant turns (not their headers)."""
    if not getattr(tokenizer, "chat_template", None):
        raise ConfigError(
            "data.format chat: the tokenizer has no chat template; use a chat model's tokenizer or format: completion"
        )
    ids: list[int] = []
    labels: list[int] = []
    for i, msg in enumerate(messages):
        full = tokenizer.apply_chat_template(messages[: i + 1], tokenize=True)
        full = full["input_ids"] if isinstance(full, dict) or hasattr(full, "keys") else full
        if full[: len(ids)] != ids:  # template not prefix-stable: fall back to masking nothing extra
            log.warning("chat template is not prefix-stable; labels may include template tokens")
        new = full[len(ids) :]
        if msg.get("role") == "assistant":
            head = tokenizer.apply_chat_template(messages[:i], tokenize=True, add_generation_prompt=True) if i else []
            head = head["input_ids"] if hasattr(head, "keys") else head
            n_head = max(0, len(head) - len(ids))
            labels += [IGNORE] * n_head + new[n_head:]
        else:
            labels += [IGNORE] * len(new)
        ids = list(full)
    return ids, labels


def tokenize_row(tokenizer, row: dict, fmt: str, max_length: int) -> dict:
    """One row -> {input_ids, labels}; loss only on the response for alpaca/chat/completion."""
    bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    if fmt == "text":
        ids = bos + _ids(tokenizer, str(row["text"])) + eos
        labels = list(ids)
    elif fmt == "chat":
        ids, labels = _tokenize_chat(tokenizer, row["messages"])
    else:
        prompt, completion = _prompt_completion(row, fmt)
        p = bos + _ids(tokenizer, prompt)
        c = _ids(tokenizer, completion) + eos
        ids, labels = p + c, [IGNORE] * len(p) + c
    return {"input_ids": ids[:max_length], "labels": labels[:max_length]}


CACHE_VERSION = 2  # of the tokenized-data cache's key and contents (a new version tokenizes once)


def _source_stamp(path: str) -> list | None:
    """What changes when a data source's bytes change (each file's size, mtime, ctime and inode: a copy that keeps
    the mtime still gets a new ctime), or None for a source that must be loaded to be known (a hub dataset name,
    or a path this process cannot stat: loading it then says why in one line)."""
    if path == "builtin:tasks":
        return []  # generated from data.builtin, which the key holds
    p = Path(path)
    try:
        if p.is_file():
            return _stat(p)
        if p.is_dir():
            return [[str(f.relative_to(p)), *_stat(f)] for f in sorted(p.rglob("*")) if f.is_file()]
    except OSError:
        return None
    return None


def _stat(p: Path) -> list[int]:
    st = p.stat()
    return [st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino]


def _tokenizer_stamp(tokenizer) -> str:
    """A hash of everything tokenizing depends on: a fast tokenizer's serialized form (vocabulary, merges, pre-
    and post-processing, added tokens; ~0.1 s for a 128k vocabulary where sorting get_vocab() took ~1 s), else its
    vocabulary; its special tokens and chat template."""
    h = hashlib.sha256()
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        h.update(backend.to_str().encode())
    else:
        h.update(json.dumps(tokenizer.get_vocab(), sort_keys=True).encode())
    ids = [tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id]
    h.update(json.dumps([type(tokenizer).__name__, ids, str(getattr(tokenizer, "chat_template", ""))]).encode())
    return h.hexdigest()


def _cache_key(cfg: Config, tokenizer, rows: tuple[list[dict], list[dict]] | None = None) -> str | None:
    """The tokenized-data cache's key, known without loading the rows for local files, dirs and builtin data (a
    cache hit then reads only the cache); None when the rows are needed (`rows` given: their counts stand in)."""
    d = cfg.data
    stamps = [_source_stamp(d.path)] + ([_source_stamp(d.eval_split)] if isinstance(d.eval_split, str) else [])
    if any(s is None for s in stamps):
        if rows is None:
            return None
        counts = ["rows", len(rows[0]), len(rows[1])]  # stands in only for what has no stamp
        stamps = [counts if s is None else s for s in stamps]
    fields = [d.path, d.format, d.max_length, str(d.eval_split), d.split, d.builtin.__dict__]
    fields += [cfg.train.seed, cfg.eval.max_samples, stamps, _tokenizer_stamp(tokenizer), CACHE_VERSION]
    return hashlib.sha256(json.dumps(fields, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _read_cache(path: Path | None) -> TokenizedData | None:
    if path is None or not path.exists():
        return None
    try:
        blob = json.loads(path.read_text())
        data = TokenizedData(blob["train"], blob["eval"], blob["eval_prompts"])
    except (OSError, ValueError, KeyError, TypeError):
        log.warning("ignoring unreadable tokenization cache %s", path)
        return None
    log.info("tokenized data from cache %s", path)
    return data


def prepare_data(cfg: Config, tokenizer, cache_dir: Path | None) -> TokenizedData:
    """Load, tokenize (or reuse the on-disk cache) and return train/eval rows. For local data a cache hit loads
    neither the rows nor `datasets`."""
    rows = None
    key = _cache_key(cfg, tokenizer)
    if key is None:  # a hub dataset: its rows are the key
        rows = load_rows(cfg.data, cfg.train.seed)
        key = _cache_key(cfg, tokenizer, rows)
    cached = cache_dir / f"tokenized-{key}.json" if cache_dir else None
    if (hit := _read_cache(cached)) is not None:
        return hit
    train_rows, eval_rows = rows or load_rows(cfg.data, cfg.train.seed)
    eval_rows = eval_rows[: max(cfg.eval.max_samples, 0)]
    fmt, L = cfg.data.format, cfg.data.max_length
    eval_prompts = []
    if fmt in ("completion", "alpaca"):
        eval_prompts = [dict(zip(("prompt", "completion"), _prompt_completion(r, fmt))) for r in eval_rows]
    train = [tokenize_row(tokenizer, r, fmt, L) for r in train_rows]
    evals = [tokenize_row(tokenizer, r, fmt, L) for r in eval_rows]
    train = [r for r in train if any(x != IGNORE for x in r["labels"][1:])]
    if not train:
        raise ConfigError(f"data.path {cfg.data.path}: no row has a response within data.max_length={L}")
    if cached is not None:  # atomic (a cache: no fsync)
        cached.parent.mkdir(parents=True, exist_ok=True)
        blob = {"train": train, "eval": evals, "eval_prompts": eval_prompts}
        replace_file(cached, json.dumps(blob).encode(), fsync=False)
    return TokenizedData(train, evals, eval_prompts)
