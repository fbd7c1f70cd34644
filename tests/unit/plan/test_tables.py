"""plan's measured-throughput table ships in the package (trainer/plan/tables/measured.json), generated from the
repo's bench/results by scripts/measured_table.py; plan reads that file, and a raw results dir only when asked."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

from trainer.config.loader import load_config
from trainer.plan import tables
from trainer.plan.planner import make_plan

ROOT = Path(__file__).resolve().parents[3]


def _script():
    spec = importlib.util.spec_from_file_location("measured_table", ROOT / "scripts" / "measured_table.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_packaged_table_is_generated_from_bench_results():
    """bench/results changed without `python scripts/measured_table.py`: the shipped table is stale."""
    assert _script().main(["--check"]) == 0
    assert tables.MEASURED_TABLE.parent == Path(tables.__file__).parent / "tables"


def _bench_dir(tmp_path) -> Path:
    bench = tmp_path / "bench"
    bench.mkdir()
    (bench / "h100-tiny.json").write_text(
        json.dumps(
            {
                "gpu": "H100",
                "model": "builtin:tiny-llama",
                "method": "full",
                "tokens_per_second": 123456.0,
                "gradient_checkpointing": False,
                "peak_memory_gib": 1.2,
                "versions": {"torch": "2.11"},
            }
        )
    )
    (bench / "a100.json").write_text(
        json.dumps(
            [
                {
                    "gpu": "A100 80GB",
                    "model": "other/llama-1b",
                    "method": "full",
                    "num_params": 1.2e9,
                    "tokens_per_second": 20000.0,
                }
            ]
        )
    )
    return bench


def test_plan_reads_the_packaged_table_not_the_repo(tmp_path, monkeypatch):
    bench = _bench_dir(tmp_path)
    table = tmp_path / "measured.json"
    assert _script().main(["--bench-dir", str(bench), "--out", str(table)]) == 0
    rows = json.loads(table.read_text())["records"]
    assert {r["source"] for r in rows} == {"h100-tiny.json", "a100.json"}
    assert all(set(r) <= {*tables.MEASURED_FIELDS, "source"} for r in rows)  # only what plan reads
    assert next(r for r in rows if r["source"] == "a100.json")["params"] == 1.2e9  # num_params -> params
    cfg = load_config(None, ["train.max_steps=10"])
    monkeypatch.setattr(tables, "MEASURED_TABLE", table)
    packaged = make_plan(cfg, gpu="h100", num_gpus=2)
    assert packaged.throughput.tokens_per_second == 2 * 123456.0
    assert "measured (h100-tiny.json)" in packaged.throughput.source
    # the raw records (a developer's bench dir) and the packaged table give the same numbers
    for gpu in ("h100", "a100-80gb"):
        raw = make_plan(cfg, gpu=gpu, bench_dir=bench).throughput
        assert raw == make_plan(cfg, gpu=gpu).throughput, gpu
    assert "implied by a100.json" in make_plan(cfg, gpu="a100-80gb").throughput.source
    monkeypatch.setattr(tables, "MEASURED_TABLE", tmp_path / "missing.json")
    assert "default" in make_plan(cfg, gpu="h100").throughput.source  # no table: FLOPs alone


# parameter counts published on the models' hub pages (safetensors metadata)
PUBLISHED_PARAMS = {
    "meta-llama/Meta-Llama-3-8B": 8_030_261_248,
    "meta-llama/Llama-3.2-1B": 1_235_814_400,
    "meta-llama/Llama-3.2-3B": 3_212_749_824,
    "meta-llama/Llama-2-7b-hf": 6_738_415_616,
    "mistralai/Mistral-7B-v0.1": 7_241_732_096,
    "Qwen/Qwen2.5-1.5B": 1_543_714_304,
}


def test_known_models_plan_offline_at_their_published_sizes(monkeypatch):
    import trainer.model

    def no_hub(cfg):
        raise AssertionError(f"plan read {cfg.model.name_or_path}'s config from the hub")

    monkeypatch.setattr(trainer.model, "model_config", no_hub)
    assert set(PUBLISHED_PARAMS) <= set(tables.load_models())
    for name, params in PUBLISHED_PARAMS.items():
        plan = make_plan(load_config("lora", [f"model.name_or_path={name}"]))
        assert plan.shape.params_total == params, name
    # an alias and any case name the same table row
    instruct = make_plan(load_config("lora", ["model.name_or_path=META-LLAMA/Meta-Llama-3-8B-Instruct"]))
    assert instruct.shape.params_total == PUBLISHED_PARAMS["meta-llama/Meta-Llama-3-8B"]


def test_a_local_dir_of_that_name_wins(tmp_path, monkeypatch):
    local = tmp_path / "meta-llama" / "Llama-3.2-1B"
    local.mkdir(parents=True)
    config = {"model_type": "llama", "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2}
    (local / "config.json").write_text(json.dumps({**config, "num_attention_heads": 4, "vocab_size": 100}))
    monkeypatch.chdir(tmp_path)
    assert tables.known_model_config("meta-llama/Llama-3.2-1B") is None
    plan = make_plan(load_config("lora", ["model.name_or_path=meta-llama/Llama-3.2-1B"]))
    assert plan.shape.num_layers == 2
