"""trainer.run_dir: step dir names, which checkpoints count as committed, the heartbeat file."""

import pytest

from trainer.run_dir import RunDir, committed_steps, parse_step_dirname, step_dirname


@pytest.mark.parametrize("step", [0, 1, 120, 99_999_999])
def test_step_dirname_round_trips(step):
    name = step_dirname(step)
    assert name.startswith("step-") and len(name) == 13
    assert parse_step_dirname(name) == step


@pytest.mark.parametrize(
    "name",
    [
        "step-120",
        "step-000000120",
        "step-0000012a",
        ".tmp-step-00000012",
        ".tmp-step-00000012-4242",
        "Step-00000012",
        "step_00000012",
        "step--0000012",
        "step-00000012.json",
        "final",
        "",
    ],
)
def test_parse_step_dirname_rejects_anything_else(name):
    assert parse_step_dirname(name) is None


def test_only_dirs_with_a_manifest_are_committed(tmp_path):
    root = tmp_path / "checkpoints"
    for name in ("step-00000004", "step-00000008", "step-00000012", ".tmp-step-00000016-99", "step-00000020"):
        (root / name).mkdir(parents=True)
    for name in ("step-00000004", "step-00000012", ".tmp-step-00000016-99"):
        (root / name / "manifest.json").write_text("{}")
    (root / "step-00000020" / "manifest.json").mkdir()  # not a file
    (root / "step-00000024").write_text("a file, not a dir")
    (root / "notes").mkdir()
    (root / "notes" / "manifest.json").write_text("{}")
    assert committed_steps(root) == [4, 12]
    assert RunDir(tmp_path).committed_steps() == [4, 12]
    assert committed_steps(tmp_path / "nowhere") == []


def test_heartbeat_write_then_read(tmp_path):
    run = RunDir(tmp_path)
    assert run.read_heartbeat() is None  # not written yet
    run.write_heartbeat(7)
    assert run.read_heartbeat() == 7 and run.heartbeat.read_text() == "7\n"
    run.write_heartbeat(8)
    assert run.read_heartbeat() == 8
    assert sorted(p.name for p in tmp_path.iterdir()) == ["heartbeat"]  # replaced, no temp file left
    run.heartbeat.write_text("garbage\n")
    assert run.read_heartbeat() is None


def test_run_dir_paths():
    run = RunDir("/w/run")
    assert str(run.checkpoint(12)) == "/w/run/checkpoints/step-00000012"
    assert (str(run.final), str(run.metrics), str(run.events)) == (
        "/w/run/final",
        "/w/run/metrics.jsonl",
        "/w/run/events.jsonl",
    )
