"""Experiment trackers through the CLI: SIGKILL mid-run, resume, and every tracker holds one run with each step once;
a tracker that is missing or fails costs one warning and the run exits 0."""

from __future__ import annotations

import json
import signal
from collections import Counter

import pytest

from tests.harness.common import TINY, kill_at_step, run_cli, start_cli, wait_for_checkpoint

pytestmark = pytest.mark.e2e

STEPS = list(range(1, 13))  # TINY: 12 steps, a checkpoint every 4


def tensorboard_steps(out, tag):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(out / "tensorboard"))
    acc.Reload()  # reads the files in order; a restart's purge_step hides what the killed process logged after it
    return [e.step for e in acc.Scalars(tag)] if tag in acc.Tags()["scalars"] else []


@pytest.mark.slow
def test_sigkill_and_resume_one_run_per_tracker_each_step_once(tmp_path, monkeypatch):
    pytest.importorskip("tensorboard")
    pytest.importorskip("wandb")
    pytest.importorskip("mlflow")
    from mlflow import MlflowClient

    from trainer.tracker_backends import wandb_history_steps

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)  # the default: a file store in the output dir
    out = tmp_path / "run"
    overrides = TINY + ["logging.report_to=[tensorboard, wandb, mlflow]", "eval.every_steps=4", "logging.tags=[t1]"]
    proc = start_cli("train", overrides=overrides, output_dir=out)
    wait_for_checkpoint(proc, out, 4)
    kill_at_step(proc, out, 6, sig=signal.SIGKILL)
    proc.wait(timeout=30)
    first = json.loads((out / "trackers.json").read_text())
    p = run_cli("train", overrides=overrides, output_dir=out)
    assert "resum" in p.stdout.lower()
    after = json.loads((out / "trackers.json").read_text())
    said = p.stdout[-3000:] + p.stderr[-3000:]  # a tracker that failed says why in a warning
    assert {k: after.get(k) for k in ("key", "wandb", "mlflow")} == {
        k: first.get(k, after.get(k)) for k in ("key", "wandb", "mlflow")
    }, said
    assert "mlflow" in after and "wandb" in after, said
    assert after["restarts"] == 1

    assert tensorboard_steps(out, "loss") == STEPS
    assert tensorboard_steps(out, "eval_loss") == [4, 8, 12]
    assert len(tensorboard_steps(out, "restarts")) == 1  # a marker, not a new run

    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # for this reader; the trainer sets it for a file store
    client = MlflowClient((out / "mlruns").as_uri())
    (exp,) = [e for e in client.search_experiments() if e.name == "spot-trainer"]
    (run,) = client.search_runs([exp.experiment_id])
    assert run.info.run_id == after["mlflow"]["run_id"] and run.data.tags["t1"] == "true"
    steps = [m.step for m in client.get_metric_history(run.info.run_id, "loss")]
    assert sorted(steps) == STEPS, Counter(steps)

    run_id = after["wandb"]["run_id"]
    files = sorted((tmp_path / "wandb").glob(f"offline-run-*/run-{run_id}.wandb"))
    assert len(files) == 2  # one offline file per process, both of the same run id
    steps = [s for f in files for s in wandb_history_steps(f)]
    assert sorted(steps) == STEPS, Counter(steps)


@pytest.mark.slow  # keeps the -m "not slow" pass under 3 minutes
def test_missing_and_failing_trackers_cost_one_warning_each(tmp_path, monkeypatch):
    pytest.importorskip("tensorboard")
    shim = tmp_path / "shim" / "wandb"
    shim.mkdir(parents=True)
    (shim / "__init__.py").write_text("raise ImportError(\"No module named 'wandb'\")\n")
    monkeypatch.setenv("PYTHONPATH", str(shim.parent))  # wandb, as if it were not installed
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    out = tmp_path / "run"
    overrides = TINY + [
        "logging.report_to=[wandb, mlflow, tensorboard]",
        f"logging.init_kwargs.mlflow.tracking_uri=file://{blocker}/mlruns",  # under a file: cannot be created
    ]
    p = run_cli("train", overrides=overrides, output_dir=out)
    assert "step 12/12" in p.stdout
    ours = [ln for ln in (p.stdout + p.stderr).splitlines() if "trainer.trackers" in ln]
    assert len(ours) == 2, ours
    assert "tracker wandb is not installed" in ours[0] and "tracker mlflow could not start" in ours[1]
    assert tensorboard_steps(out, "loss") == STEPS
