"""Run logs: metrics.jsonl (one object a line, integer step), events.jsonl, and console progress."""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path

from trainer.durable import replace_file


def _append_line(path: Path, obj: dict) -> None:
    # one write() of a short line with O_APPEND: whole lines even with two writers (trainer and supervisor)
    line = (json.dumps(obj, sort_keys=False) + "\n").encode()
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, line)
    finally:
        os.close(fd)


def read_jsonl(path: Path, warnings: list[str] | None = None) -> list[dict]:
    """JSON objects, one a line; a torn or corrupt line (a killed writer leaves one) is skipped, and said in
    `warnings` when the caller passes a list to show them."""
    try:
        lines = Path(path).read_text(errors="replace").splitlines()
    except FileNotFoundError:
        return []
    out = []
    for i, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except ValueError:
            if warnings is not None:
                kind = "torn last line" if i == len(lines) else "corrupt"
                warnings.append(f"{path}: line {i} is not valid JSON ({kind}); skipped")
            continue
        if isinstance(obj, dict):
            out.append(obj)
    return out


class MetricsLog:
    """`metrics.jsonl`: written by rank 0; rewound to the checkpoint's copy on resume. Each record written also goes
    to `sink` when there is one (the experiment trackers), after the line is on the disk."""

    def __init__(self, path: Path, enabled: bool, sink: Callable[[dict], None] | None = None):
        self.path, self.enabled, self.sink = path, enabled, sink

    def write(self, **fields) -> None:
        if self.enabled:
            obj = {"time": round(time.time(), 3), **fields}
            _append_line(self.path, obj)
            if self.sink is not None:
                self.sink(obj)

    def rewind(self, saved_copy: str | None, step: int) -> None:
        """Make the file hold exactly the lines up to `step` (from the checkpoint's copy when there is one)."""
        if not self.enabled:
            return
        if saved_copy is not None:
            lines = [ln for ln in saved_copy.splitlines() if ln.strip()]
        else:
            lines = [json.dumps(o) for o in read_jsonl(self.path) if int(o.get("step", 0)) <= step]
        replace_file(self.path, "".join(ln + "\n" for ln in lines).encode())

    def text(self) -> str:
        return self.path.read_text() if self.enabled and self.path.exists() else ""


class EventLog:
    """`events.jsonl`, shared by the supervisor and the trainer's rank 0."""

    def __init__(self, path: Path, source: str, enabled: bool = True):
        self.path, self.source, self.enabled = path, source, enabled

    def emit(self, event: str, **fields) -> dict:
        obj = {"time": round(time.time(), 3), "event": event, "source": self.source, **fields}
        if self.enabled:
            _append_line(self.path, obj)
        return obj


class Console:
    """A progress bar on a terminal, plain lines otherwise; only rank 0 prints."""

    def __init__(self, enabled: bool, total: int, initial: int):
        self.enabled = enabled
        self.bar = None
        if enabled and sys.stderr.isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=total, initial=initial, unit="step", dynamic_ncols=True, leave=True)

    def line(self, text: str) -> None:
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.write(text)
        else:
            print(text, flush=True)

    def advance(self, n: int = 1, **postfix) -> None:
        if self.bar is not None:
            self.bar.update(n)
            if postfix:
                self.bar.set_postfix(postfix, refresh=False)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
