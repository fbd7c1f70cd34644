"""What the chaos proof checks at the end, and the numbers it reports (goodput, restarts, steps redone)."""

from __future__ import annotations

import hashlib
import statistics
from pathlib import Path

import torch
from safetensors.torch import load_file

from trainer.checkpoint.manifest import Manifest, verify
from trainer.metrics import read_jsonl
from trainer.run_dir import MANIFEST_NAME, parse_step_dirname


def read_events(out: Path) -> list[dict]:
    return read_jsonl(Path(out) / "events.jsonl")


def train_lines(out: Path) -> list[dict]:
    return [m for m in read_jsonl(Path(out) / "metrics.jsonl") if "loss" in m]


# ---------------------------------------------------------------- weights and losses


def tensors_differ(a: Path, b: Path) -> str | None:
    """None if the two safetensors files hold bitwise equal tensors, else what differs."""
    ta, tb = load_file(str(a)), load_file(str(b))
    if ta.keys() != tb.keys():
        return f"{a.name}: different tensor names"
    for k in ta:
        x, y = ta[k], tb[k]
        if x.dtype != y.dtype or x.shape != y.shape:
            return f"{a.name}: {k} dtype/shape differ"
        if not x.reshape(-1).view(torch.uint8).equal(y.reshape(-1).view(torch.uint8)):
            return f"{a.name}: {k} differs (max abs diff {(x.float() - y.float()).abs().max().item():.3e})"
    return None


def compare_to_reference(out: Path, ref: Path, steps: int) -> list[str]:
    """Problems: final checkpoint weights, final/ weights and each step's loss/grad_norm vs the reference run."""
    problems = []
    name = f"checkpoints/step-{steps:08d}/model.safetensors"
    if not (out / name).exists():
        return [f"{out / name}: missing"]
    if diff := tensors_differ(out / name, ref / name):
        problems.append(f"final checkpoint weights: {diff}")
    for f in sorted((ref / "final").glob("*.safetensors")):
        if not (out / "final" / f.name).exists():
            problems.append(f"final/{f.name}: missing")
        elif diff := tensors_differ(out / "final" / f.name, f):
            problems.append(f"final/: {diff}")
    got = {m["step"]: m for m in train_lines(out)}
    want = {m["step"]: m for m in train_lines(ref)}
    if sorted(got) != list(range(1, steps + 1)) or len(train_lines(out)) != steps:
        problems.append(f"metrics.jsonl: train steps are not exactly 1..{steps} once each")
    bad = [
        s for s in want if s in got and (got[s]["loss"], got[s]["grad_norm"]) != (want[s]["loss"], want[s]["grad_norm"])
    ]
    if bad:
        problems.append(f"loss/grad_norm differ from the reference at {len(bad)} steps (first: step {bad[0]})")
    return problems


# ---------------------------------------------------------------- checkpoints, local and remote


def verify_local(out: Path) -> tuple[list[int], list[str]]:
    """(committed steps, problems): every local dir with a manifest re-hashed, plus final/."""
    root, steps, problems = Path(out) / "checkpoints", [], []
    for d in sorted(root.iterdir()) if root.is_dir() else []:
        step = parse_step_dirname(d.name)
        if step is not None and (d / MANIFEST_NAME).is_file():
            steps.append(step)
            problems += verify(d)
    if (Path(out) / "final").is_dir():
        problems += verify(Path(out) / "final")
    return steps, problems


def _objects(client, bucket: str, prefix: str) -> dict[str, int]:
    pages = client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix + "/")
    return {o["Key"][len(prefix) + 1 :]: o["Size"] for p in pages for o in p.get("Contents", [])}


def remote_committed(client, bucket: str, prefix: str) -> list[int]:
    """Steps with checkpoints/step-XXXXXXXX/manifest.json in the bucket."""
    steps = []
    for key in _objects(client, bucket, prefix):
        parts = key.split("/")
        if len(parts) == 3 and parts[0] == "checkpoints" and parts[2] == MANIFEST_NAME:
            if (step := parse_step_dirname(parts[1])) is not None:
                steps.append(step)
    return sorted(steps)


def verify_remote(client, bucket: str, prefix: str) -> tuple[list[int], list[str]]:
    """(committed steps, problems): each committed remote dir (and final/) downloaded, hashed against its manifest."""
    objects, problems = _objects(client, bucket, prefix), []
    steps = remote_committed(client, bucket, prefix)
    dirs = [f"checkpoints/step-{s:08d}" for s in steps] + (["final"] if f"final/{MANIFEST_NAME}" in objects else [])
    for d in dirs:
        where = f"s3://{bucket}/{prefix}/{d}"
        body = client.get_object(Bucket=bucket, Key=f"{prefix}/{d}/{MANIFEST_NAME}")["Body"].read()
        try:
            manifest = Manifest.from_json(body.decode(), where=where)
        except Exception as e:
            problems.append(str(e))
            continue
        if d != "final" and manifest.step != parse_step_dirname(d.split("/")[1]):
            problems.append(f"{where}: manifest says step {manifest.step}")
        for f in manifest.files:
            rel = f"{d}/{f.path}"
            if objects.get(rel) != f.size:
                problems.append(f"{where}/{f.path}: {'missing' if rel not in objects else 'size differs'}")
                continue
            data = client.get_object(Bucket=bucket, Key=f"{prefix}/{rel}")["Body"].read()
            if hashlib.sha256(data).hexdigest() != f.sha256:
                problems.append(f"{where}/{f.path}: sha256 does not match the manifest")
    return steps, problems


# ---------------------------------------------------------------- attempts


def attempts(events: list[dict]) -> list[tuple[int, int, str]]:
    """(start step, last step, exit reason) of every trainer attempt that began training, in order."""
    out, start = [], None
    for e in events:
        if e.get("source") == "trainer" and e.get("event") == "train_start":
            start = e["step"]
        elif e.get("source") == "supervisor" and e.get("event") == "exit":
            if start is not None:
                last = e.get("last_step")
                out.append((start, last if isinstance(last, int) and last >= start else start, e.get("reason")))
            start = None
    return out


def first_start_after(events: list[dict], t: float) -> int | None:
    return next((e["step"] for e in events if e.get("event") == "train_start" and e.get("time", 0) >= t), None)


# ---------------------------------------------------------------- the verdict


def check_run(run, code: int | None) -> list[tuple[str, bool, str]]:
    """(check, passed, detail) for a finished ChaosRun."""
    checks = []

    def check(name: str, problems: list[str], ok_detail: str = "") -> None:
        checks.append(
            (
                name,
                not problems,
                "; ".join(problems[:3]) + (f" (+{len(problems) - 3})" if len(problems) > 3 else "")
                if problems
                else ok_detail,
            )
        )

    check("run finished (last pod exit 0)", [] if code == 0 else [f"exit {code}"])
    check(
        "bitwise equal to the uninterrupted run",
        compare_to_reference(run.out, run.reference_dir, run.steps),
        f"final weights, final/ and the loss of all {run.steps} steps",
    )
    steps, problems = verify_local(run.out)
    check("local checkpoints verify (sha256)", problems, f"steps {steps} and final/")
    steps, problems = verify_remote(run.server.client(), run.bucket, run.prefix)
    if not steps or steps[-1] != run.steps:
        problems.append(f"newest remote checkpoint is {steps[-1] if steps else None}, expected {run.steps}")
    check("remote checkpoints verify (sha256 of every object)", problems, f"steps {steps} and final/")
    sig = [f"stop {i}: {p}" for i, s in enumerate(run.stops, 1) for p in s.problems]
    check(
        "SIGTERM: exit 75, emergency checkpoint at the step reached",
        sig,
        f"{len(run.stops)} stops, steps lost {[s.steps_lost for s in run.stops]}",
    )
    resumes = []
    for t, want, why in run.expected_resumes:
        got = first_start_after(run.history, t)
        if got != want:
            resumes.append(f"{why}: resumed from step {got}, expected {want}")
    check(
        "fresh/corrupted pods resume from the newest valid checkpoint",
        resumes,
        f"{len(run.expected_resumes)} pods" if run.expected_resumes else "none injected",
    )
    odd = [
        f"attempt exit {e.get('reason')} (code {e.get('code')})"
        for e in run.history
        if e.get("event") == "exit" and e.get("reason") not in ("done", "killed", "preempted")
    ]
    odd += [f"supervisor gave up: {e.get('reason')}" for e in run.history if e.get("event") == "give_up"]
    check("no crash, hang or give-up besides the injected faults", odd)
    return checks


def summarize(run, checks: list, wall: float, ref_wall: float) -> dict:
    """The numbers the proof prints."""
    useful = sum(m.get("step_time_s", 0.0) for m in train_lines(run.out))
    ref_useful = sum(m.get("step_time_s", 0.0) for m in train_lines(run.reference_dir))
    tries = attempts(run.history)
    executed = sum(last - start for start, last, _ in tries)
    restarts = sum(1 for e in run.history if e.get("event") == "restart")
    fired = [f for f in run.faults if f.fired_step is not None]
    by_kind: dict[str, int] = {}
    for f in fired:
        by_kind[f.kind] = by_kind.get(f.kind, 0) + 1
    landed = {
        k: f"{sum(1 for f in fired if f.kind == k and f.landed)}/{by_kind.get(k, 0)}"
        for k in ("kill_in_checkpoint", "kill_in_upload")
    }
    commit = [s.sigterm_to_commit_s for s in run.stops if s.sigterm_to_commit_s is not None]
    own = [s.stop_to_commit_s for s in run.stops if s.stop_to_commit_s is not None]
    return {
        "passed": all(ok for _, ok, _ in checks),
        "checks": [{"check": c, "passed": ok, "detail": d} for c, ok, d in checks],
        "faults_planned": len(run.faults),
        "faults_injected": len(fired),
        "faults_by_kind": by_kind,
        "kills_that_hit_their_window": landed,
        "wall_s": round(wall, 1),
        "useful_step_s": round(useful, 2),
        "goodput": round(useful / wall, 4),
        "reference_wall_s": round(ref_wall, 1),
        "reference_goodput": round(ref_useful / ref_wall, 4),
        "lost_s_per_fault": round((wall - ref_wall) / max(1, len(fired)), 1),
        "trainer_restarts": restarts,
        "pods": run.pods,
        "attempts": len(tries),
        "steps": run.steps,
        "steps_executed": executed,
        "steps_redone": executed - run.steps,
        "sigterm_steps_lost": [s.steps_lost for s in run.stops],
        "sigterm_to_commit_s": {"median": _median(commit), "max": max(commit) if commit else None, "n": len(commit)},
        "trainer_stop_to_commit_s": {"median": _median(own), "max": max(own) if own else None},
        "sigterm_to_exit_s": {
            "median": _median([s.exit_s for s in run.stops]),
            "max": max([s.exit_s for s in run.stops], default=None),
        },
        "corrupted": [f"step {s} {name}" for s, name in run.corrupted],
        "faults": [
            {
                "kind": f.kind,
                "at_step": f.at_step,
                "fired_step": f.fired_step,
                "at_s": f.at_s,
                "landed": f.landed,
                "note": f.note,
            }
            for f in run.faults
        ],
    }


def _median(values: list[float]) -> float | None:
    return round(statistics.median(values), 3) if values else None


def render(summary: dict, command: str) -> str:
    """The summary as text for a terminal."""
    s = summary
    lines = [
        f"command: {command}",
        f"faults: {s['faults_injected']}/{s['faults_planned']} injected "
        f"({', '.join(f'{k} {v}' for k, v in sorted(s['faults_by_kind'].items()))})",
        f"kills that hit their window: write {s['kills_that_hit_their_window']['kill_in_checkpoint']}, "
        f"upload {s['kills_that_hit_their_window']['kill_in_upload']}",
        f"wall {s['wall_s']} s, useful step time {s['useful_step_s']} s, goodput {s['goodput']:.1%} "
        f"(uninterrupted run: {s['reference_wall_s']} s wall, goodput {s['reference_goodput']:.1%}; "
        f"{s['lost_s_per_fault']} s lost per fault)",
        f"restarts: {s['trainer_restarts']} trainer restarts by the supervisor, {s['pods']} pods, "
        f"{s['attempts']} training attempts",
        f"steps: {s['steps']} needed, {s['steps_executed']} executed, {s['steps_redone']} redone",
        f"SIGTERM: steps lost {s['sigterm_steps_lost']}; SIGTERM -> committed local checkpoint "
        f"median {s['sigterm_to_commit_s']['median']} s, max {s['sigterm_to_commit_s']['max']} s "
        f"(trainer's stop_to_commit_s median {s['trainer_stop_to_commit_s']['median']} s); "
        f"SIGTERM -> supervisor exit median {s['sigterm_to_exit_s']['median']} s",
    ]
    lines += [f"  {'PASS' if c['passed'] else 'FAIL'}  {c['check']}: {c['detail']}" for c in s["checks"]]
    lines.append("chaos proof " + ("PASSED" if s["passed"] else "FAILED"))
    return "\n".join(lines)
