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
