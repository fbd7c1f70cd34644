"""Show the LR-scheduler trap of accelerate + DeepSpeed offload after `load_state`, and the fix.

    OMP_NUM_THREADS=1 python scripts/dev/ds_lr_trap.py

The usual recipe `model, opt, sched = accelerator.prepare(model, opt, sched)` binds the torch scheduler to
the torch AdamW that accelerate swaps for DeepSpeedCPUAdam (they share param-group dicts, so it works at
first). `accelerator.load_state` -> ZeRO `load_state_dict` -> torch `Optimizer.load_state_dict` replaces
those dicts: from then on the scheduler moves an orphaned copy and the engine's LR stays frozen.
Fix: point the scheduler at the prepared optimizer (a live view), or never replace the dicts (our
trainer.optimizer_state loader updates them in place).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))


def worker(phase: str, ckpt: str, fix: bool) -> None:
    import torch

    from scripts.dev.ds_cpu_probe import build_model, make_data
    from trainer.config.loader import config_from_dict
    from trainer.distributed import make_accelerator, release

    cfg = config_from_dict({"model": {"dtype": "fp32"}, "train": {"micro_batch_size": 2},
                            "distributed": {"deepspeed": "zero2_offload"}})
    acc = make_accelerator(cfg, 1)
    model = build_model("full")
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 / (s + 1))
    model, opt, sched = acc.prepare(model, opt, sched)
    data = make_data()
    start = 0
    if phase == "resume":
        acc.load_state(ckpt)
        start = 4
        if fix:
            sched.scheduler.optimizer = opt  # the prepared optimizer: param_groups is a live view
    rows = []
    for step in range(start, start + 4):
        batch = data[step * 2:step * 2 + 2]
        loss = model(input_ids=batch, labels=batch).loss
        acc.backward(loss)
        engine_lr = acc.deepspeed_engine_wrapped.engine.optimizer.optimizer.param_groups[0]["lr"]
        sched.step()
        rows.append({"step": step + 1, "engine_lr": engine_lr, "scheduler_lr_next": sched.get_last_lr()[0]})
    if phase == "first":
        acc.save_state(ckpt)
    if acc.is_main_process:
        print(json.dumps({"phase": phase, "fix": fix, "rows": rows}), flush=True)
    del model, opt, sched
    release(acc)


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "worker":
        worker(sys.argv[2], sys.argv[3], sys.argv[4] == "fix")
        return
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = str(Path(tmp) / "state")
        for phase, fix in (("first", False), ("resume", False), ("resume", True)):
            cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                   __file__, "worker", phase, ckpt, "fix" if fix else "nofix"]
            out = subprocess.run(cmd, env=env, capture_output=True, text=True)
            lines = [ln for ln in out.stdout.splitlines() if ln.startswith("{")]
            if out.returncode != 0 or not lines:
                sys.exit(f"failed: {' '.join(cmd)}\n{out.stderr[-3000:]}")
            r = json.loads(lines[-1])
            print(f"{phase:6s} fix={fix!s:5s} " + "  ".join(
                f"step {x['step']}: lr {x['engine_lr']:.5f}" for x in r["rows"]))


if __name__ == "__main__":
    main()
