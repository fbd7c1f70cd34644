"""trainer.metrics: metrics.jsonl rewound on resume, torn lines skipped and reported, events.jsonl lines."""

import json

from trainer.metrics import EventLog, MetricsLog, read_jsonl


def lines(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_rewind_keeps_exactly_the_steps_up_to_n(tmp_path):
    log = MetricsLog(tmp_path / "metrics.jsonl", enabled=True)
    for step in range(1, 9):
        log.write(step=step, loss=1.0 / step)
        if step % 4 == 0:
            log.write(step=step, eval_loss=0.5)
    log.rewind(None, 5)  # resumed from the step-5 checkpoint: steps 6-8 will be trained again
    assert [(m["step"], "eval_loss" in m) for m in lines(log.path)] == [
        (1, False),
        (2, False),
        (3, False),
        (4, False),
        (4, True),
        (5, False),
    ]
    log.write(step=6, loss=0.1)
    assert [m["step"] for m in lines(log.path)][-2:] == [5, 6]


def test_rewind_to_the_checkpoints_copy_replaces_the_file(tmp_path):
    log = MetricsLog(tmp_path / "metrics.jsonl", enabled=True)
    for step in range(1, 6):
        log.write(step=step, loss=1.0)
    saved = '{"step": 1, "loss": 2.0}\n\n{"step": 2, "loss": 1.5}\n'
    log.rewind(saved, 2)
    assert lines(log.path) == [{"step": 1, "loss": 2.0}, {"step": 2, "loss": 1.5}]
    assert not [p for p in tmp_path.iterdir() if p.name != "metrics.jsonl"]  # no temp file left


def test_a_disabled_metrics_log_writes_nothing(tmp_path):
    log = MetricsLog(tmp_path / "metrics.jsonl", enabled=False)  # ranks other than 0
    log.write(step=1, loss=1.0)
    log.rewind(None, 0)
    assert not log.path.exists() and log.text() == ""


def test_read_jsonl_skips_a_torn_last_line_and_says_so(tmp_path):
    p = tmp_path / "metrics.jsonl"
    p.write_text('{"step": 1}\n{"step": 2}\n{"step": 3, "lo')
    warnings: list[str] = []
    assert read_jsonl(p, warnings) == [{"step": 1}, {"step": 2}]
    assert len(warnings) == 1 and "line 3" in warnings[0] and "torn last line" in warnings[0]
    assert read_jsonl(p) == [{"step": 1}, {"step": 2}]  # without a list: skipped silently
    assert read_jsonl(tmp_path / "missing.jsonl", warnings) == [] and len(warnings) == 1


def test_read_jsonl_calls_a_bad_line_in_the_middle_corrupt(tmp_path):
    p = tmp_path / "events.jsonl"
    p.write_text('{"a": 1}\n{oops\n\n[1]\n{"a": 2}\n')
    warnings: list[str] = []
    assert read_jsonl(p, warnings) == [{"a": 1}, {"a": 2}]  # a non-object line is not a record either
    assert len(warnings) == 1 and "line 2" in warnings[0] and "corrupt" in warnings[0]


def test_event_log_lines_from_two_sources_in_one_file(tmp_path):
    path = tmp_path / "events.jsonl"
    supervisor, trainer = EventLog(path, "supervisor"), EventLog(path, "trainer")
    launched = supervisor.emit("launch", attempt=1)
    trainer.emit("train_start", step=0, world_size=2)
    supervisor.emit("exit", attempt=1, code=0)
    got = lines(path)
    assert [(e["source"], e["event"]) for e in got] == [
        ("supervisor", "launch"),
        ("trainer", "train_start"),
        ("supervisor", "exit"),
    ]
    assert got[0] == launched and set(launched) == {"time", "event", "source", "attempt"}
    assert got[1]["step"] == 0 and got[1]["world_size"] == 2 and got[2]["code"] == 0
    assert got[0]["time"] <= got[1]["time"] <= got[2]["time"]


def test_a_disabled_event_log_returns_the_event_without_writing(tmp_path):
    log = EventLog(tmp_path / "events.jsonl", "trainer", enabled=False)
    assert log.emit("preempt", step=3)["step"] == 3
    assert not log.path.exists()
