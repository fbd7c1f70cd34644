"""report: time accounting of a run with restarts, robustness to partial runs, and the PNG plot."""

from __future__ import annotations

import json
import math
import struct

import pytest

from trainer.errors import ConfigError
from trainer.report import build_report, plot_report, read_jsonl, render_report

T0 = 1_763_900_000.0


def _write_jsonl(path, records, torn: str | None = None):
    text = "".join(json.dumps(r) + "\n" for r in records)
    path.write_text(text + (torn or ""))


def _metric(step, t):
    return {
        "step": step,
        "time": t,
        "loss": 3.0 * math.exp(-step / 40) + 0.5,
        "lr": 1e-4,
        "grad_norm": 1.0,
        "tokens": 4096,
        "tokens_per_second": 4096.0,
        "step_time_s": 1.0,
        "memory_gb": 1.0,
        "epoch": step / 100,
        "samples_seen": 8 * step,
    }


def make_run(tmp_path, with_events=True):
    """100 surviving steps of 1 s; preempted at step 50 (resumed from 40), crashed at 70 (resumed from 60)."""
    out = tmp_path / "run"
    out.mkdir()
    metrics = [_metric(s, T0 + 20 + s) for s in range(1, 41)]  # attempt 1: steps 1-50, 41-50 dropped
    metrics += [{"step": 40, "time": T0 + 61, "eval_loss": 1.4, "eval_exact_match": 0.2}]
    metrics += [_metric(s, T0 + 100 + (s - 40)) for s in range(41, 61)]  # attempt 2: steps 41-70, 61-70 dropped
    metrics += [_metric(s, T0 + 145 + (s - 60)) for s in range(61, 101)]  # attempt 3: steps 61-100
    metrics += [{"step": 100, "time": T0 + 186, "eval_loss": 0.9, "eval_exact_match": None}]
    _write_jsonl(out / "metrics.jsonl", metrics, torn='{"step": 101, "time": 17639')
    sup, tr = {"source": "supervisor"}, {"source": "trainer"}
    events = [
        {"time": T0, "event": "start", **sup},
        {"time": T0 + 1, "event": "launch", "attempt": 1, "command": "x", "resume_step": None, **sup},
        {"time": T0 + 20, "event": "train_start", "step": 0, "world_size": 2, **tr},
        {"time": T0 + 40.5, "event": "checkpoint", "step": 20, "kind": "periodic", "stall_s": 0.5, "commit_s": 1, **tr},
        {"time": T0 + 60.5, "event": "checkpoint", "step": 40, "kind": "periodic", "stall_s": 0.5, "commit_s": 1, **tr},
        {
            "time": T0 + 75,
            "event": "exit",
            "attempt": 1,
            "code": 137,
            "reason": "preempted",
            "last_step": 50,
            "runtime_s": 74,
            **sup,
        },
        {
            "time": T0 + 77,
            "event": "restart",
            "attempt": 2,
            "backoff_s": 2,
            "resumed_from_step": 40,
            "steps_lost": 10,
            **sup,
        },
        {"time": T0 + 100, "event": "train_start", "step": 40, "world_size": 2, **tr},
        {
            "time": T0 + 135,
            "event": "exit",
            "attempt": 2,
            "code": 1,
            "reason": "crash",
            "last_step": 70,
            "runtime_s": 57,
            **sup,
        },
        {
            "time": T0 + 137,
            "event": "restart",
            "attempt": 3,
            "backoff_s": 2,
            "resumed_from_step": 60,
            "steps_lost": 10,
            **sup,
        },
        {"time": T0 + 145, "event": "train_start", "step": 60, "world_size": 2, **tr},
        {"time": T0 + 186, "event": "train_end", "step": 100, "status": "done", **tr},
        {"time": T0 + 187, "event": "exit", "attempt": 3, "code": 0, "reason": "done", "last_step": 100, **sup},
        {"time": T0 + 188, "event": "done", **sup},
    ]
    if with_events:
        _write_jsonl(out / "events.jsonl", events)
    return out


def test_report_accounts_for_restarts(tmp_path):
    r = build_report(make_run(tmp_path), price_per_hour=3.6)
    assert r.steps == 100 and r.final_eval_loss == 0.9
    assert r.wall_s == pytest.approx(188.0)
    assert r.useful_s == pytest.approx(100.0)
    assert r.redone_steps == 20 and r.redone_s == pytest.approx(20.0)
    assert [x.latency_s for x in r.restarts] == [pytest.approx(25.0), pytest.approx(10.0)]
    assert r.resumed_steps == [40, 60]
    assert r.restarts_by_cause == {"preempted": 1, "crash": 1}
    assert r.checkpoint_stall_s == pytest.approx(1.0)
    assert r.goodput == pytest.approx(100 / 188)
    assert r.other_s == pytest.approx(188 - 100 - 20 - 35 - 1)
    assert r.tokens_per_second == pytest.approx(4096.0) and r.world_size == 2
    assert r.cost == pytest.approx(3.6 * 2 * 188 / 3600)
    assert any("torn last line" in w for w in r.warnings)
    text = render_report(r)
    for needle in ("goodput", "53.2%", "preempted 1", "crash 1", "redone steps", "$0.38", "torn last line"):
        assert needle in text, needle


def test_partial_run_without_events(tmp_path):
    r = build_report(make_run(tmp_path, with_events=False))
    assert r.restarts == [] and r.restarts_by_cause == {}
    assert r.useful_s == pytest.approx(100.0)
    assert r.wall_s == pytest.approx(186 - 20)  # first step's start to the last metric
    assert r.cost is None
    assert "stops by cause" in render_report(r)


def test_missing_metrics_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="no metrics.jsonl"):
        build_report(tmp_path)


def test_read_jsonl_skips_corrupt_lines(tmp_path):
    p = tmp_path / "m.jsonl"
    p.write_text('{"step": 1}\nnot json\n[1, 2]\n{"step": 2}\n{"ste')
    warnings: list[str] = []
    assert read_jsonl(p, warnings) == [{"step": 1}, {"step": 2}]
    assert len(warnings) == 2 and "corrupt" in warnings[0] and "torn" in warnings[1]


def test_plot_is_a_png_of_the_expected_size(tmp_path):
    png = plot_report(make_run(tmp_path), tmp_path / "out" / "report.png")
    data = png.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    assert data[12:16] == b"IHDR"
    width, height = struct.unpack(">II", data[16:24])
    assert (width, height) == (1000, 700)
    assert len(data) > 20_000  # two panels of lines and labels, not an empty canvas


def _startup(t, resumed_from, phases):
    total = round(sum(phases.values()) + 0.5, 3)
    return {
        "time": t,
        "event": "startup",
        "source": "trainer",
        "phases": phases,
        "total_s": total,
        "other_s": 0.5,
        "resumed_from": resumed_from,
    }


def test_report_shows_start_up_by_phase_and_the_median(tmp_path):
    out = make_run(tmp_path)
    names = ("imports", "device_init", "data", "model_load", "optimizer", "resume", "first_step")
    starts = [
        _startup(T0 + 19, None, dict(zip(names, (9.0, 3.0, 2.0, 4.0, 0.5, 0.0, 1.0)))),
        _startup(T0 + 99, 40, dict(zip(names, (7.0, 3.5, 1.0, 3.0, 0.5, 1.5, 1.0)))),
        _startup(T0 + 144, 60, dict(zip(names, (8.0, 2.5, 1.5, 5.0, 0.5, 2.5, 1.0)))),
    ]
    with open(out / "events.jsonl", "a") as f:
        f.write("".join(json.dumps(e) + "\n" for e in starts))
    r = build_report(out)
    assert [s["resumed_from"] for s in r.startups] == [None, 40, 60]
    lines = render_report(r).splitlines()
    header = next(i for i, line in enumerate(lines) if "start-up" in line)
    assert lines[header].split()[-9:] == [*names, "other", "total"]
    fresh, first, second, median = (line.split() for line in lines[header + 1 : header + 5])
    assert fresh[0] == "fresh" and fresh[1:] == [
        "9.00",
        "3.00",
        "2.00",
        "4.00",
        "0.50",
        "0.00",
        "1.00",
        "0.50",
        "20.00",
    ]
    assert first[:3] == ["resumed", "from", "40"] and second[:3] == ["resumed", "from", "60"]
    assert median[:3] == ["median", "of", "3"]
    assert median[3:] == ["8.00", "3.00", "1.50", "4.00", "0.50", "1.50", "1.00", "0.50", "20.00"]


def test_report_without_startup_events_has_no_start_up_table(tmp_path):
    assert "start-up" not in render_report(build_report(make_run(tmp_path)))
