"""Out of memory is an answer: the pre-flight check refuses a run that cannot fit (exit 2, nothing written), and an
out-of-memory error inside a step commits the last completed step and exits 3, which the supervisor does not rerun.

On the CPU the memory comes from model.memory_budget_gb and the OOM is torch's own OutOfMemoryError raised inside a
micro-batch (the GPU run in bench/ hits a real one under a memory cap).
"""

from __future__ import annotations

import pytest
import torch

from tests.harness.common import TINY, run_cli
from trainer.checkpoint.manifest import verify
from trainer.config.loader import load_config
from trainer.errors import EXIT_OOM
from trainer.loop import Trainer, run_training
from trainer.metrics import read_jsonl
from trainer.run_dir import committed_steps

pytestmark = pytest.mark.e2e


def test_a_run_that_cannot_fit_is_refused_in_one_line_before_anything_is_written(tmp_path):
    out = tmp_path / "run"
    p = run_cli("train", overrides=[*TINY, "model.memory_budget_gb=0.0001"], output_dir=out, check=False)
    assert p.returncode == 2, p.stderr
    (line,) = [x for x in p.stderr.splitlines() if x.startswith("error:")]
    assert "does not fit: predicted peak" in line and "model.memory_budget_gb" in line and "try " in line
    assert "Traceback" not in p.stderr
    assert not out.exists()  # nothing written


@pytest.mark.slow
def test_a_run_that_fits_is_not_refused(tmp_path):
    p = run_cli("train", overrides=[*TINY, "train.max_steps=2", "model.memory_budget_gb=4"], output_dir=tmp_path)
    assert p.returncode == 0


@pytest.mark.slow
def test_an_out_of_memory_error_in_a_step_commits_the_last_completed_step_and_exits_3(tmp_path, monkeypatch, capsys):
    cfg = load_config(None, [*TINY, "checkpoint.every_steps=100"], str(tmp_path))
    real = Trainer._micro_step

    def micro_step(self, batch, last, n_targets):
        if self.progress.step == 6:  # step 7 runs out of memory in its first micro-batch
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return real(self, batch, last, n_targets)

    monkeypatch.setattr(Trainer, "_micro_step", micro_step)
    try:
        run_training(cfg)
    except Exception as e:
        err = e
    assert getattr(err, "exit_code", None) == EXIT_OOM == 3
    assert "out of GPU memory in step 7" in str(err) and "step 6 is checkpointed" in str(err)
    assert committed_steps(tmp_path / "checkpoints") == [6]
    assert not verify(tmp_path / "checkpoints" / "step-00000006")
    (oom,) = [e for e in read_jsonl(tmp_path / "events.jsonl") if e["event"] == "oom"]
    assert oom["step"] == 7 and oom["committed_step"] == 6
