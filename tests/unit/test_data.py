"""trainer.data: formats rendered and tokenized with response-only labels, rows loaded and split, the cache."""

from __future__ import annotations

import json

import pytest

import trainer.data as data
from trainer.builtin.tokenizer import build_char_tokenizer
from trainer.config.loader import load_config
from trainer.data import ALPACA_PROMPT, ALPACA_PROMPT_INPUT, IGNORE, load_rows, prepare_data, tokenize_row
from trainer.errors import ConfigError


@pytest.fixture(scope="module")
def tok():
    return build_char_tokenizer()


def ids(tok, text: str) -> list[int]:
    """The char tokenizer's ids for `text`, no special tokens added."""
    return tok(text, add_special_tokens=False)["input_ids"]


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_text_rows_train_on_every_token(tok):
    row = tokenize_row(tok, {"text": "hello"}, "text", 64)
    assert row["input_ids"] == [tok.bos_token_id, *ids(tok, "hello"), tok.eos_token_id]
    assert row["labels"] == row["input_ids"]


def test_completion_rows_mask_the_prompt(tok):
    row = tokenize_row(tok, {"prompt": "2+2=", "completion": "4"}, "completion", 64)
    prompt = [tok.bos_token_id, *ids(tok, "2+2=")]
    answer = [*ids(tok, "4"), tok.eos_token_id]
    assert row["input_ids"] == prompt + answer
    assert row["labels"] == [IGNORE] * len(prompt) + answer


@pytest.mark.parametrize("extra, template", [({}, ALPACA_PROMPT), ({"input": "abc"}, ALPACA_PROMPT_INPUT)])
def test_alpaca_rows_render_the_prompt_and_mask_it(tok, extra, template):
    row = tokenize_row(tok, {"instruction": "Reverse", "output": "cba", **extra}, "alpaca", 256)
    prompt = [tok.bos_token_id, *ids(tok, template.format(instruction="Reverse", input=extra.get("input", "")))]
    answer = [*ids(tok, "cba"), tok.eos_token_id]
    assert row["input_ids"] == prompt + answer
    assert row["labels"] == [IGNORE] * len(prompt) + answer


def test_chat_rows_train_only_on_assistant_turns(tok):
    messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]
    row = tokenize_row(tok, {"messages": messages}, "chat", 256)
    # the built-in template: <role>content</s> per message; the assistant's header is not a target
    head, answer = ids(tok, "<user>hi</s><assistant>"), ids(tok, "yo</s>")
    assert row["input_ids"] == head + answer
    assert row["labels"] == [IGNORE] * len(head) + answer


def test_max_length_truncates_ids_and_labels_alike(tok):
    full = tokenize_row(tok, {"prompt": "abc", "completion": "defgh"}, "completion", 1000)
    cut = tokenize_row(tok, {"prompt": "abc", "completion": "defgh"}, "completion", 6)
    assert cut == {"input_ids": full["input_ids"][:6], "labels": full["labels"][:6]}
    assert len(full["input_ids"]) > 6


def test_load_rows_from_jsonl_splits_eval_rows_off_by_seed(tmp_path):
    rows = [{"prompt": f"p{i}", "completion": f"c{i}"} for i in range(20)]
    path = write_jsonl(tmp_path / "d.jsonl", rows)
    cfg = load_config(None, [f"data.path={path}", "data.format=completion", "data.eval_split=0.25"]).data
    train, evals = load_rows(cfg, seed=0)
    assert len(train) == 15 and len(evals) == 5
    assert sorted(train + evals, key=lambda r: int(r["prompt"][1:])) == rows  # a partition, rows unchanged
    assert load_rows(cfg, seed=0) == (train, evals)  # the same seed, the same split
    assert load_rows(cfg, seed=1)[1] != evals


def test_a_missing_field_is_a_config_error_naming_the_fields(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [{"question": "q", "answer": "a"}])
    cfg = load_config(None, [f"data.path={path}", "data.format=alpaca"]).data
    with pytest.raises(ConfigError, match=r"needs field\(s\) instruction, output; the rows have question, answer"):
        load_rows(cfg, seed=0)


def test_second_prepare_data_reuses_the_tokenization_cache(tmp_path, tok, monkeypatch):
    rows = [{"prompt": f"say {w}", "completion": w} for w in ("ab", "cd", "ef", "gh", "ij", "kl", "mn", "op")]
    path = write_jsonl(tmp_path / "d.jsonl", rows)
    cfg = load_config(None, [f"data.path={path}", "data.format=completion", "data.eval_split=0.25"])
    cache = tmp_path / "cache"
    first = prepare_data(cfg, tok, cache)
    assert len(list(cache.glob("tokenized-*.json"))) == 1
    assert len(first.train) == 6 and len(first.eval) == 2

    def no_tokenizing(*args, **kwargs):
        raise AssertionError("tokenized again instead of reading the cache")

    monkeypatch.setattr(data, "tokenize_row", no_tokenizing)
    monkeypatch.setattr(data, "load_rows", no_tokenizing)  # a hit reads only the cache: no rows, no `datasets`
    second = prepare_data(cfg, tok, cache)
    assert (second.train, second.eval, second.eval_prompts) == (first.train, first.eval, first.eval_prompts)


def test_the_tokenization_cache_follows_the_seed_the_file_and_the_tokenizer(tmp_path, tok):
    rows = [{"prompt": f"say {w}", "completion": w} for w in ("ab", "cd", "ef", "gh", "ij", "kl", "mn", "op")]
    path = write_jsonl(tmp_path / "d.jsonl", rows)
    base = [f"data.path={path}", "data.format=completion", "data.eval_split=0.25"]
    cache = tmp_path / "cache"

    def evals(*overrides):
        got = prepare_data(load_config(None, base + list(overrides)), tok, cache)
        return sorted(p["completion"] for p in got.eval_prompts)

    first = evals()
    for seed in range(1, 20):  # another seed splits off other eval rows: never the cached split of seed 0
        other = evals(f"train.seed={seed}")
        if other != first:
            break
    assert other != first
    assert evals(f"train.seed={seed}") == other and evals() == first  # each from its own cache entry
    n = len(list(cache.glob("tokenized-*.json")))
    write_jsonl(path, rows[:4])  # the file changed: tokenized again
    assert len(prepare_data(load_config(None, base), tok, cache).train) == 3
    assert len(list(cache.glob("tokenized-*.json"))) == n + 1
    tok.add_tokens(["<new>"])  # another tokenizer: another key
    prepare_data(load_config(None, base), tok, cache)
    assert len(list(cache.glob("tokenized-*.json"))) == n + 2
