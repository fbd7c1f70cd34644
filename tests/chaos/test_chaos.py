"""A short chaos proof (scripts/chaos.py): trainer kills (anywhere, mid-write, mid-upload), a SIGTERM, an S3 kill."""

import pytest

from scripts.chaos import ChaosRun
from scripts.chaos_checks import render

pytestmark = pytest.mark.e2e

STEPS = 32  # the same run as tests/e2e/test_supervisor_e2e.py: one uninterrupted reference for both


@pytest.mark.slow
@pytest.mark.timeout(480)
def test_short_chaos_run_passes_every_check(tmp_path, tmp_path_factory):
    kinds = ("kill_trainer", "kill_in_checkpoint", "kill_in_upload", "sigterm", "kill_s3")
    run = ChaosRun(
        seed=3,
        faults=len(kinds),
        steps=STEPS,
        method="lora",
        workdir=tmp_path,
        kinds=kinds,
        reference_dir=tmp_path_factory.getbasetemp() / f"chaos-reference-lora-{STEPS}",
    )
    summary = run.run()
    report = render(summary, "tests/chaos/test_chaos.py")
    print(report)
    assert summary["passed"], report
    assert summary["faults_injected"] == len(kinds), report
    assert sorted(summary["faults_by_kind"]) == sorted(kinds)
    assert summary["sigterm_steps_lost"] == [0]
    assert summary["trainer_restarts"] == 3 and summary["pods"] == 2  # three trainer kills, one stopped pod
    assert summary["steps_executed"] >= STEPS and 0 < summary["goodput"] < 1
