"""Speed features that run on the CPU too: document bounds, the varlen attention's masked path, checkpoint plans."""

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from trainer import speed
from trainer.config.loader import load_config


def _tiny(attn: str) -> LlamaForCausalLM:
    cfg = LlamaConfig(
        vocab_size=50,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        attn_implementation=attn,
    )
    torch.manual_seed(0)
    return LlamaForCausalLM(cfg).eval()


def test_document_bounds_split_rows_and_restarts():
    pos = torch.tensor([[0, 1, 2, 0, 1, 0], [0, 1, 2, 3, 0, 0]])
    cu, longest = speed.document_bounds(pos, 2)
    assert cu.tolist() == [0, 3, 5, 6, 10, 11, 12]
    assert longest == 4
    assert cu.dtype == torch.int32


def test_document_mask_blocks_attention_across_documents():
    mask = speed.document_mask(torch.tensor([[0, 1, 0, 1, 2]]), 1)[0, 0]
    assert mask[1, 0] and not mask[2, 1] and mask[4, 2] and not mask[3, 4]


def test_varlen_registration_matches_sdpa_on_packed_rows():
    """Packed rows: the registered implementation (masked path on CPU) gives sdpa's per-document logits."""
    speed.register_varlen()
    ids = torch.randint(3, 50, (2, 12))
    pos = torch.tensor([list(range(5)) + list(range(7)), list(range(12))])
    want = _tiny("sdpa")(input_ids=ids, position_ids=pos, use_cache=False).logits
    got = _tiny(speed.VARLEN)(input_ids=ids, position_ids=pos, use_cache=False).logits
    assert torch.allclose(got, want, atol=1e-5)
    # and a document alone gives the same logits as inside the packed row
    alone = _tiny("sdpa")(input_ids=ids[:1, 5:], use_cache=False).logits
    assert torch.allclose(got[0, 5:], alone[0], atol=1e-5)


def test_varlen_keeps_padding_masks_for_generation_style_batches():
    speed.register_varlen()
    ids = torch.randint(3, 50, (2, 6))
    mask = torch.tensor([[0, 0, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1]])
    want = _tiny("sdpa")(input_ids=ids, attention_mask=mask).logits
    got = _tiny(speed.VARLEN)(input_ids=ids, attention_mask=mask).logits
    assert torch.allclose(got[:, 2:], want[:, 2:], atol=1e-5)


def test_plan_checkpoints_fewest_layers_that_fit():
    per_token = 1000
    # room for all 8 layers plain: no checkpointing
    assert speed.plan_checkpointing(8, 100, per_token, budget_bytes=10**7, fixed_bytes=0, hidden=10).layers == 0
    # room for about half: the rest checkpointed
    plan = speed.plan_checkpointing(
        8, 100, per_token, budget_bytes=int(5 * 100 * per_token * speed.SAFETY), fixed_bytes=0, hidden=10
    )
    assert 0 < plan.layers < 8
    # no room at all: every layer
    assert speed.plan_checkpointing(8, 100, per_token, budget_bytes=10, fixed_bytes=0, hidden=10).layers == 8


def test_layer_bytes_count_liger_and_dropout_savings():
    cfg = LlamaConfig(hidden_size=4096, intermediate_size=14336, num_attention_heads=32, num_key_value_heads=8)
    targets = ["q_proj", "k_proj", "v_proj", "o_proj"]
    liger = speed.layer_bytes_per_token(cfg, targets, 0.05, True, "qlora")
    plain = speed.layer_bytes_per_token(cfg, targets, 0.05, False, "qlora")
    no_dropout = speed.layer_bytes_per_token(cfg, targets, 0.0, True, "qlora")
    assert no_dropout < liger < plain
    assert 100_000 < liger < 200_000  # ~140 KiB per token per layer for Llama-3-8B, LoRA q/k/v/o


def test_set_checkpoint_layers_first_n_only():
    model = _tiny("sdpa").train()
    speed.set_checkpoint_layers(model, 2, {"use_reentrant": False})
    assert [m.gradient_checkpointing for m in speed.decoder_layers(model)] == [True, True, False]
    speed.set_checkpoint_layers(model, 0, {"use_reentrant": False})
    assert not any(m.gradient_checkpointing for m in speed.decoder_layers(model))


def test_auto_settings_are_off_on_cpu():
    cfg = load_config("qlora", ["data.packing=true"])
    cpu = torch.device("cpu")
    assert not speed.use_liger(cfg, cpu)
    assert not speed.use_varlen(cfg, cpu, lambda: None)
    assert speed.upcast_kbit(cfg, cpu)
    assert speed.resolve_checkpoint_layers(cfg, cpu) is None


def _lora_tiny():
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(
        _tiny("sdpa"), LoraConfig(r=4, lora_alpha=8, lora_dropout=0.1, target_modules="all-linear")
    ).train()
    return model


def _step(model, ids):
    """Loss, and the gradients of the adapters and of the input embeddings, of one forward + backward."""
    torch.manual_seed(1)  # the same dropout masks in every run
    embeds = model.get_input_embeddings()(ids).detach().requires_grad_()
    loss = model(inputs_embeds=embeds, labels=ids).loss
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    model.zero_grad(set_to_none=True)
    return loss.detach(), grads, embeds.grad


def _count_forwards(model) -> dict:
    counts = {"self_attn": [0] * 3, "mlp": [0] * 3}

    def hook(attr, idx):
        def count(*_):
            counts[attr][idx] += 1

        return count

    first = {"self_attn": "q_proj", "mlp": "gate_proj"}  # the part's first linear: a recompute may stop early
    for idx, layer in enumerate(speed.decoder_layers(model)):
        for attr in counts:
            getattr(getattr(layer, attr), first[attr]).register_forward_pre_hook(hook(attr, idx))
    return counts


@pytest.mark.parametrize(
    "parts,n,whole,attn_runs,mlp_runs",
    [
        ("layer", 2, None, [2, 2, 1], [2, 2, 1]),  # whole layers 0, 1 recompute both parts
        ("attention", 2, None, [2, 2, 1], [1, 1, 1]),
        ("mlp", 3, None, [1, 1, 1], [2, 2, 2]),
        ("attention", 3, 1, [2, 2, 2], [2, 1, 1]),  # layer 0 whole, layers 1-2 attention only
    ],
)
def test_checkpoint_parts_recompute_only_that_part_with_identical_results(parts, n, whole, attn_runs, mlp_runs):
    ids = torch.randint(3, 50, (2, 10))
    want_loss, want_grads, want_dx = _step(_lora_tiny(), ids)
    model = _lora_tiny()
    speed.set_checkpoint_layers(model, n, {"use_reentrant": False}, parts=parts, whole=whole)
    counts = _count_forwards(model)
    loss, grads, dx = _step(model, ids)
    assert counts == {"self_attn": attn_runs, "mlp": mlp_runs}  # forward + one recompute where checkpointed
    assert torch.equal(loss, want_loss)
    assert grads.keys() == want_grads.keys()
    for name, g in grads.items():
        assert torch.allclose(g, want_grads[name], rtol=1e-5, atol=1e-7), name
    assert torch.allclose(dx, want_dx, rtol=1e-5, atol=1e-7)
    # eval (no grads) never recomputes, and turning the parts off again restores the plain layer
    speed.set_checkpoint_layers(model, 0, {"use_reentrant": False}, parts=parts)
    counts = _count_forwards(model)
    _step(model, ids)
    assert counts == {"self_attn": [1, 1, 1], "mlp": [1, 1, 1]}


def test_plan_checkpointing_parts_then_whole_layers():
    per_token, tokens, hidden = 1000, 100, 10
    part = 400  # a layer with only its part checkpointed keeps 40% of its activations
    per_layer = int(per_token * tokens * speed.SAFETY)
    part_bytes = int(part * tokens * speed.SAFETY)
    whole_bytes = tokens * hidden * 2

    def plan(room_layers):
        budget = int(per_layer + room_layers)
        return speed.plan_checkpointing(
            8, tokens, per_token, budget, 0, hidden, parts="attention", part_bytes_per_token=part
        )

    # room for 3 plain layers and 5 part-checkpointed ones: 5 checkpointed, none whole
    p = plan(3 * per_layer + 5 * part_bytes)
    assert (p.layers, p.whole_layers) == (5, 0) and "(whole 0, attention 5)" in p.describe()
    # room for less than 8 part-checkpointed layers: every layer, the first 3 of them whole
    p = plan(3 * whole_bytes + 5 * part_bytes)
    assert (p.layers, p.whole_layers) == (8, 3)
    # parts=layer plans as before: the same room checkpoints whole layers only
    q = speed.plan_checkpointing(8, tokens, per_token, per_layer + 3 * per_layer + 5 * whole_bytes, 0, hidden)
    assert (q.layers, q.whole_layers) == (5, 5) and "whole" not in q.describe()
