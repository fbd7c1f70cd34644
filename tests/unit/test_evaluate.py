"""trainer.evaluate: eval loss is the token-weighted mean over rows; exact match of greedy completions."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from transformers import LlamaConfig, LlamaForCausalLM

from trainer.builtin.tokenizer import build_char_tokenizer
from trainer.data import IGNORE
from trainer.evaluate import eval_loss, exact_match

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def tok():
    return build_char_tokenizer()


@pytest.fixture(scope="module")
def model(tok):
    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        pad_token_id=tok.pad_token_id,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
    )
    return LlamaForCausalLM(cfg).train()  # as the training loop hands it over


def summed_loss(model, row) -> tuple[float, int]:
    """Cross-entropy summed over one unpadded row's targets (next-token), and how many targets it has."""
    ids, labels = torch.tensor([row["input_ids"]]), torch.tensor(row["labels"])
    with torch.no_grad():
        logits = model.eval()(input_ids=ids).logits[0].float()
    targets = labels[1:]
    keep = targets != IGNORE
    return F.cross_entropy(logits[:-1][keep], targets[keep], reduction="sum").item(), int(keep.sum())


def test_eval_loss_is_the_token_weighted_mean_over_all_rows(model, tok):
    g = torch.Generator().manual_seed(3)
    rows = []
    for n, masked in ((5, 2), (11, 6), (3, 0), (8, 1), (14, 10)):  # lengths differ; some prompt tokens masked
        ids = torch.randint(4, len(tok), (n,), generator=g).tolist()
        rows.append({"input_ids": ids, "labels": [IGNORE] * masked + ids[masked:]})
    sums = [summed_loss(model, r) for r in rows]
    want = sum(s for s, _ in sums) / sum(k for _, k in sums)  # not a mean of per-batch means
    model.train()
    got = eval_loss(model, rows, tok.pad_token_id, batch_size=2, device=CPU)
    assert got == pytest.approx(want, rel=1e-5)
    assert model.training  # put back in train mode
    assert eval_loss(model, [], tok.pad_token_id, 2, CPU) is None


def greedy(model, tok, prompt: str, max_new_tokens: int) -> str:
    """The model's own greedy completion of one prompt, decoded as exact_match decodes it."""
    ids = torch.tensor([[tok.bos_token_id, *tok(prompt, add_special_tokens=False)["input_ids"]]])
    with torch.no_grad():
        out = model.eval().generate(
            input_ids=ids,
            attention_mask=torch.ones_like(ids),
            do_sample=False,
            max_new_tokens=max_new_tokens,
            pad_token_id=tok.pad_token_id,
            eos_token_id=tok.eos_token_id,
        )
    return tok.decode(out[0, ids.shape[1] :], skip_special_tokens=True)


def test_exact_match_counts_greedy_completions_that_equal_the_reference(model, tok):
    prompts = ["12+30=", "reverse abc:", "7*6="]
    refs = [greedy(model, tok, p, 6) for p in prompts]
    assert any(r.strip() for r in refs)  # a random model still says something to compare
    model.train()
    right = [{"prompt": p, "completion": f"  {r} "} for p, r in zip(prompts, refs, strict=True)]  # whitespace-stripped
    assert exact_match(model, tok, right, max_new_tokens=6, batch_size=1, device=CPU) == 1.0
    assert model.training
    wrong = [right[0]] + [{"prompt": p, "completion": r + "#"} for p, r in zip(prompts[1:], refs[1:], strict=True)]
    score = exact_match(model, tok, wrong, max_new_tokens=6, batch_size=1, device=CPU)
    assert 0.0 <= score <= 1.0 and score == pytest.approx(1 / 3)
    assert exact_match(model, tok, [], 6, 1, CPU) is None


def test_a_long_generation_ticks_between_tokens_and_a_stop_ends_it_mid_batch(model, tok, monkeypatch):
    # One batch of long answers can outlast the supervisor's hang_timeout: the tick runs between tokens too.
    from trainer import evaluate

    clock = [0.0]
    monkeypatch.setattr(evaluate.time, "monotonic", lambda: clock[0])
    calls = []

    def tick() -> bool:
        calls.append(clock[0])
        return len(calls) >= 4  # the 4th tick asks to stop: before-batch tick, then two between tokens, then stop

    original = evaluate._TickWhileGenerating.__call__

    def every_token(self, input_ids, scores, **kwargs):
        clock[0] += 0.3  # each token "takes" 0.3 s
        tokens.append(input_ids.shape[1])
        return original(self, input_ids, scores, **kwargs)

    tokens = []
    monkeypatch.setattr(evaluate._TickWhileGenerating, "__call__", every_token)
    prompts = [{"prompt": "12+30=", "completion": "42"}]
    with pytest.raises(evaluate.Interrupted):
        exact_match(model, tok, prompts, max_new_tokens=100, batch_size=1, device=CPU, tick=tick)
    assert len(calls) == 4
    assert all(b - a >= 0.5 for a, b in zip(calls[1:], calls[2:], strict=False))  # rate-limited
    assert len(tokens) < 20  # ended long before 100 tokens
    assert model.training
