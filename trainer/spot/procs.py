"""Processes as /proc shows them: start times (to tell a live pid from a reused one) and descendants.

Standard library only; empty answers where /proc is missing.
"""

from __future__ import annotations

import os


def stat_fields(pid: int) -> list[str] | None:
    try:
        with open(f"/proc/{pid}/stat") as f:
            text = f.read()
    except OSError:
        return None
    return text[text.rindex(")") + 2 :].split()  # fields from 'state' on (the name may hold spaces)


def start_time(pid: int) -> int | None:
    st = stat_fields(pid)
    return int(st[19]) if st else None


def descendants(pid: int) -> set[tuple[int, int]]:
    """(pid, start time) of every process below `pid`, read from /proc (empty where /proc is missing)."""
    children: dict[int, list[int]] = {}
    try:
        pids = [int(d) for d in os.listdir("/proc") if d.isdigit()]
    except OSError:
        return set()
    for p in pids:
        st = stat_fields(p)
        if st:
            children.setdefault(int(st[1]), []).append(p)
    out, todo = set(), [pid]
    while todo:
        for c in children.get(todo.pop(), []):
            start = start_time(c)
            if start is not None and (c, start) not in out:
                out.add((c, start))
                todo.append(c)
    return out
