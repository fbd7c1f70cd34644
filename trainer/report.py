"""`spot-trainer report`: what a finished (or interrupted) run cost in time and money, from metrics and events."""

from __future__ import annotations

import logging
import statistics
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from trainer.errors import ConfigError
from trainer.metrics import read_jsonl
from trainer.run_dir import RunDir
from trainer.startup import PHASES

log = logging.getLogger(__name__)

RESTART_EVENTS = ("train_start",)


@dataclass
class Restart:
    attempt: int | None
    reason: str  # the supervisor's exit reason: preempted | crash | hang | killed | ...
    exit_time: float
    resumed_from_step: int | None
    steps_lost: int
    latency_s: float | None  # exit -> next train_start (or first new metric)


@dataclass
class Report:
    output_dir: Path
    steps: int
    final_loss: float | None
    final_eval_loss: float | None
    wall_s: float
    useful_s: float
    redone_steps: int
    redone_s: float
    restart_latency_s: float
    checkpoint_stall_s: float
    restarts: list[Restart]
    restarts_by_cause: dict[str, int]
    tokens: int
    tokens_per_second: float | None
    world_size: int
    start_time: float  # unix time of the first event or step
    price_per_hour: float | None
    cost: float | None
    warnings: list[str] = field(default_factory=list)
    startups: list[dict] = field(default_factory=list)  # the `startup` events, one per process start

    @property
    def goodput(self) -> float:
        return self.useful_s / self.wall_s if self.wall_s > 0 else 0.0

    @property
    def other_s(self) -> float:
        """Startup, evaluation, data loading: wall time not otherwise accounted for."""
        return max(0.0, self.wall_s - self.useful_s - self.redone_s - self.restart_latency_s - self.checkpoint_stall_s)

    @property
    def resumed_steps(self) -> list[int]:
        return [r.resumed_from_step for r in self.restarts if r.resumed_from_step is not None]


def _num(rec: dict, key: str) -> float | None:
    v = rec.get(key)
    return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else None


def build_report(output_dir: Path, price_per_hour: float | None = None) -> Report:
    """Wall time, useful time, time lost to preemptions and restarts, goodput, throughput and cost of a run."""
    output_dir = Path(output_dir)
    metrics_path = RunDir(output_dir).metrics
    if not metrics_path.exists():
        raise ConfigError(
            f"{output_dir}: no metrics.jsonl; give a run's output dir (train.output_dir) after at least one logged step"
        )
    warnings: list[str] = []
    metrics = read_jsonl(metrics_path, warnings)
    events = sorted(read_jsonl(RunDir(output_dir).events, warnings), key=lambda e: _num(e, "time") or 0.0)
    train = sorted(
        (m for m in metrics if _num(m, "loss") is not None and isinstance(m.get("step"), int)), key=lambda m: m["step"]
    )
    evals = [m for m in metrics if _num(m, "eval_loss") is not None]

    useful = sum(_num(m, "step_time_s") or 0.0 for m in train)
    mean_step = useful / len(train) if train else 0.0
    starts = [(_num(m, "time") or 0.0) - (_num(m, "step_time_s") or 0.0) for m in train if _num(m, "time")]
    times = starts + [t for m in metrics if (t := _num(m, "time"))] + [t for e in events if (t := _num(e, "time"))]
    wall = max(times) - min(times) if times else useful

    restarts = _restarts(events, train)
    redone_steps = sum(r.steps_lost for r in restarts)
    # redone steps were dropped from metrics.jsonl on resume; their first run is priced at the mean step time
    redone_s = redone_steps * mean_step
    latency = sum(r.latency_s or 0.0 for r in restarts)
    stalls = sum(_num(e, "stall_s") or 0.0 for e in events if e.get("event") == "checkpoint")
    exits = [e for e in events if e.get("event") == "exit" and e.get("reason") != "done"]
    by_cause = dict(Counter(str(e.get("reason", "unknown")) for e in exits))
    tokens = int(sum(_num(m, "tokens") or 0 for m in train))
    world = max(
        [
            int(e["world_size"])
            for e in events
            if e.get("event") == "train_start" and isinstance(e.get("world_size"), int)
        ]
        or [1]
    )
    cost = price_per_hour * world * wall / 3600 if price_per_hour is not None else None
    return Report(
        output_dir=output_dir,
        steps=train[-1]["step"] if train else 0,
        final_loss=_num(train[-1], "loss") if train else None,
        final_eval_loss=_num(evals[-1], "eval_loss") if evals else None,
        wall_s=wall,
        useful_s=useful,
        redone_steps=redone_steps,
        redone_s=redone_s,
        restart_latency_s=latency,
        checkpoint_stall_s=stalls,
        restarts=restarts,
        restarts_by_cause=by_cause,
        tokens=tokens,
        tokens_per_second=tokens / useful if useful > 0 and tokens else None,
        world_size=world,
        start_time=min(times) if times else 0.0,
        price_per_hour=price_per_hour,
        cost=cost,
        warnings=warnings,
        startups=[e for e in events if e.get("event") == "startup" and isinstance(e.get("phases"), dict)],
    )


def _restarts(events: list[dict], train: list[dict]) -> list[Restart]:
    """One Restart per supervisor `restart` event, joined with the `exit` before it and the start after it."""
    out = []
    last_exit: dict | None = None
    for i, e in enumerate(events):
        kind = e.get("event")
        if kind == "exit":
            last_exit = e
        elif kind == "restart":
            exit_time = _num(last_exit, "time") if last_exit else _num(e, "time")
            resumed = e.get("resumed_from_step") if isinstance(e.get("resumed_from_step"), int) else None
            lost = e.get("steps_lost")
            if not isinstance(lost, int):
                last_step = last_exit.get("last_step") if last_exit else None
                lost = max(0, last_step - resumed) if isinstance(last_step, int) and resumed is not None else 0
            back = next((_num(n, "time") for n in events[i + 1 :] if n.get("event") in RESTART_EVENTS), None)
            if back is None and resumed is not None:  # no trainer events: the first metric after the resume
                back = next(
                    (
                        _num(m, "time") - (_num(m, "step_time_s") or 0.0)
                        for m in train
                        if m["step"] > resumed and _num(m, "time") and _num(m, "time") > (exit_time or 0)
                    ),
                    None,
                )
            out.append(
                Restart(
                    attempt=e.get("attempt"),
                    reason=str((last_exit or {}).get("reason", "unknown")),
                    exit_time=exit_time or 0.0,
                    resumed_from_step=resumed,
                    steps_lost=lost,
                    latency_s=back - exit_time if back is not None and exit_time is not None else None,
                )
            )
            last_exit = None
    return out


def _dur(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.1f} s"
    return f"{seconds / 60:.1f} min" if seconds < 7200 else f"{seconds / 3600:.2f} h"


def render_report(report: Report) -> str:
    """A short text summary for a terminal."""
    r = report
    wall = r.wall_s or 1.0
    loss = f"final loss {r.final_loss:.4f}" if r.final_loss is not None else "no train loss logged"
    if r.final_eval_loss is not None:
        loss += f", eval loss {r.final_eval_loss:.4f}"
    rows = [
        ("wall time", r.wall_s, "first to last event or metric"),
        ("useful training", r.useful_s, "step times of the steps that survived"),
        ("redone steps", r.redone_s, f"{r.redone_steps} steps lost to restarts x mean step time"),
        ("restart latency", r.restart_latency_s, f"{len(r.restarts)} restarts: exit -> training again"),
        ("checkpoint stalls", r.checkpoint_stall_s, "training paused while saving"),
        ("other", r.other_s, "startup, model load, evaluation, data"),
    ]
    lines = [f"Run report: {r.output_dir}", f"  {r.steps} steps, {loss}"]
    for name, secs, note in rows:
        lines.append(f"  {name:<18}{_dur(secs):>11}  {secs / wall:6.1%}  {note}")
    lines.append(f"  {'goodput':<18}{r.goodput:>11.1%}          useful / wall")
    causes = ", ".join(f"{k} {v}" for k, v in sorted(r.restarts_by_cause.items())) or "none"
    lines.append(f"  {'stops by cause':<18} {causes}")
    if r.tokens_per_second:
        lines.append(
            f"  {'throughput':<18} {r.tokens_per_second:,.0f} tokens/s over {r.tokens:,} tokens"
            + (f" ({r.world_size} GPUs)" if r.world_size > 1 else "")
        )
    if r.cost is not None:
        lost = r.cost * (1 - r.goodput)
        lines.append(
            f"  {'cost':<18} ${r.cost:,.2f} at ${r.price_per_hour:g}/GPU-hour x {r.world_size} GPU"
            f"{'s' if r.world_size > 1 else ''} x wall time; ${lost:,.2f} of it not training"
        )
    lines += render_startups(r.startups)
    lines += [f"  warning: {w}" for w in r.warnings]
    return "\n".join(lines)


def render_startups(startups: list[dict]) -> list[str]:
    """Start-up seconds by phase, a row per process start (fresh or resumed), and their median over the starts."""
    if not startups:
        return []
    # phases of this version, as far as some start recorded them (older versions had fewer), then any others
    seen = {k for e in startups for k in (e.get("phases") or {})}
    names = [p for p in PHASES if p in seen] + sorted(seen - set(PHASES))
    columns = [*names, "other", "total"]

    def row(label: str, values: list[float | None]) -> str:
        cells = "".join(f"{'-' if v is None else f'{v:.2f}':>{len(c) + 1}}" for c, v in zip(columns, values))
        return f"    {label:<18}{cells}"

    def values(e: dict) -> list[float | None]:
        return [_num(e.get("phases") or {}, name) for name in names] + [_num(e, "other_s"), _num(e, "total_s")]

    lines = [f"  {'start-up (s)':<20}" + "".join(f"{c:>{len(c) + 1}}" for c in columns)]
    table = [values(e) for e in startups]
    for e, v in zip(startups, table):
        resumed = e.get("resumed_from")
        lines.append(row("fresh" if resumed is None else f"resumed from {resumed}", v))
    if len(table) > 1:
        medians = [statistics.median(col) if (col := [x for x in c if x is not None]) else None for c in zip(*table)]
        lines.append(row(f"median of {len(table)}", medians))
    return lines


def plot_report(output_dir: Path, png_path: Path) -> Path:
    """PNG: loss (train, eval) vs step with restart marks, and tokens/s over wall time with downtime shaded."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    report = build_report(output_dir)
    metrics = read_jsonl(RunDir(output_dir).metrics, [])
    train = sorted(
        (m for m in metrics if _num(m, "loss") is not None and isinstance(m.get("step"), int)), key=lambda m: m["step"]
    )
    evals = sorted((m for m in metrics if _num(m, "eval_loss") is not None), key=lambda m: m.get("step", 0))
    fig, (ax_loss, ax_tps) = plt.subplots(2, 1, figsize=(10, 7), dpi=100)
    ax_loss.plot([m["step"] for m in train], [m["loss"] for m in train], lw=1.2, label="train loss")
    if evals:
        ax_loss.plot([m["step"] for m in evals], [m["eval_loss"] for m in evals], "o-", ms=4, label="eval loss")
    for i, rs in enumerate(report.restarts):
        if rs.resumed_from_step is not None:
            ax_loss.axvline(
                rs.resumed_from_step, color="tab:red", ls="--", lw=1, label="restart (resumed step)" if i == 0 else None
            )
            ax_loss.annotate(
                rs.reason,
                (rs.resumed_from_step, 1),
                xycoords=("data", "axes fraction"),
                xytext=(3, -12),
                textcoords="offset points",
                fontsize=8,
                color="tab:red",
            )
    ax_loss.set_xlabel("step")
    ax_loss.set_ylabel("loss")
    ax_loss.set_title(f"{Path(output_dir).name}: goodput {report.goodput:.0%}, {len(report.restarts)} restarts")
    ax_loss.legend(loc="upper right", fontsize=8)
    ax_loss.grid(alpha=0.3)

    timed = [m for m in train if _num(m, "time") and _num(m, "tokens_per_second") is not None]
    t0 = report.start_time
    unit, scale = ("hours", 3600) if report.wall_s > 3 * 3600 else ("minutes", 60)
    ax_tps.plot(
        [(m["time"] - t0) / scale for m in timed], [m["tokens_per_second"] for m in timed], ".", ms=3, label="tokens/s"
    )
    for i, rs in enumerate(report.restarts):
        if rs.latency_s is not None:
            ax_tps.axvspan(
                (rs.exit_time - t0) / scale,
                (rs.exit_time + rs.latency_s - t0) / scale,
                color="tab:red",
                alpha=0.15,
                label="down (exit -> training again)" if i == 0 else None,
            )
    ax_tps.set_xlim(left=0)
    ax_tps.set_xlabel(f"wall time since the run started ({unit})")
    ax_tps.set_ylabel("tokens/s")
    ax_tps.set_ylim(bottom=0)
    ax_tps.legend(loc="lower right", fontsize=8)
    ax_tps.grid(alpha=0.3)
    fig.tight_layout()
    png_path = Path(png_path)
    png_path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png_path)
    plt.close(fig)
    return png_path
