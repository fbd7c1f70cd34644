import torch

from trainer.batches import BatchPlan, Position, collate, count_targets, epoch_order, pack_rows
from trainer.data import IGNORE


def test_order_is_pure_function_of_seed_and_epoch():
    assert (epoch_order(100, 1, 0) == epoch_order(100, 1, 0)).all()
    assert not (epoch_order(100, 1, 0) == epoch_order(100, 1, 1)).all()
    assert sorted(epoch_order(100, 1, 3).tolist()) == list(range(100))


def test_plan_covers_each_step_once_for_any_world_size():
    # the same global batch on 1, 2 or 4 processes trains on the same rows at every step
    for world, accum in ((1, 4), (2, 2), (4, 1)):
        plan = BatchPlan(n_rows=50, seed=3, micro_batch=2, grad_accum=accum, world_size=world)
        assert plan.global_batch == 8 and plan.steps_per_epoch == 6
        pos, seen = Position(), []
        for _ in range(7):  # crosses into epoch 1
            rows = []
            nxt = None
            for rank in range(world):
                micro, nxt = plan.step_rows(pos, rank)
                rows += [i for mb in micro for i in mb]
            seen.append(sorted(rows))
            pos = nxt
        if world == 1:
            ref = seen
        assert seen == ref
        assert pos == Position(1, 8)


def test_resume_jumps_to_position_without_iterating():
    plan = BatchPlan(n_rows=1000, seed=0, micro_batch=4, grad_accum=1, world_size=1)
    pos = Position()
    for _ in range(30):
        _, pos = plan.step_rows(pos, 0)
    fresh = BatchPlan(n_rows=1000, seed=0, micro_batch=4, grad_accum=1, world_size=1)
    assert fresh.step_rows(Position(pos.epoch, pos.offset), 0) == plan.step_rows(pos, 0)


def test_collate_pads_and_masks():
    b = collate([{"input_ids": [1, 5, 6], "labels": [IGNORE, 5, 6]}, {"input_ids": [1, 7], "labels": [1, 7]}], 0)
    assert b["input_ids"].tolist() == [[1, 5, 6], [1, 7, 0]]
    assert b["labels"].tolist() == [[IGNORE, 5, 6], [1, 7, IGNORE]]
    assert b["attention_mask"].tolist() == [[1, 1, 1], [1, 1, 0]]
    assert count_targets(b["labels"]) == 3


def test_packing_keeps_documents_apart():
    rows = [{"input_ids": list(range(1, n + 1)), "labels": list(range(1, n + 1))} for n in (5, 3, 7, 2)]
    packed = pack_rows(rows, max_length=10, seed=0)
    assert sum(len(r["input_ids"]) for r in packed) == 17
    assert all(len(r["input_ids"]) <= 10 for r in packed)
    for r in packed:
        starts = [i for i, p in enumerate(r["position_ids"]) if p == 0]
        assert all(r["labels"][i] == IGNORE for i in starts)  # no target crosses a document boundary


def test_packed_loss_equals_unpacked_loss():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(
        LlamaConfig(
            vocab_size=50,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
        )
    ).eval()
    g = torch.Generator().manual_seed(1)
    rows = [{"input_ids": torch.randint(3, 50, (n,), generator=g).tolist()} for n in (6, 9, 4)]
    for r in rows:
        r["labels"] = list(r["input_ids"])
    plain = collate(rows, 0)
    k = count_targets(plain["labels"])
    ref = model(**plain, num_items_in_batch=k, use_cache=False).loss
    packed = collate(pack_rows(rows, max_length=32, seed=0), 0)
    assert count_targets(packed["labels"]) == k
    got = model(**packed, num_items_in_batch=k, use_cache=False).loss  # a cache disables packed masks
    assert torch.allclose(ref, got, atol=1e-5), (ref, got)
