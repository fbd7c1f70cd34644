"""Run lineage: which checkpoints belong to the run being trained, and which to a branch it left.

Every manifest records the run segment that wrote it (`run_id`, new at a fresh start and at every branch), its
commit number along the lineage (`seq`) and the checkpoint it descends from (`parent`). A segment never branches
inside itself, so its checkpoints are ordered by step; a branch starts a new segment whose first checkpoint points
at the one it was resumed from. The lineage of a checkpoint is its own segment up to it, then its parent's segment
up to the parent, and so on. Retention keeps the newest of the current lineage and moves the rest aside; it never
deletes a checkpoint of another lineage. Checkpoints written before lineage existed form one segment (run_id None)
ordered by step, as earlier versions treated them.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from trainer.checkpoint.manifest import Manifest, Parent


@dataclass(frozen=True)
class Lineage:
    """What the next checkpoint of this run records: its segment, its parent, and its commit number."""

    run_id: str
    parent: Parent | None
    seq: int

    def after(self, step: int) -> Lineage:
        """The lineage of the checkpoint after the one committed at `step`."""
        return Lineage(self.run_id, Parent(self.run_id, step), self.seq + 1)


def newest(manifests: Mapping[int, Manifest]) -> int | None:
    """The step of the head of the current lineage: a checkpoint no other one here descends from (ancestry decides
    first, so a pod with a fast clock cannot make an ancestor look newer), the tip committed last among several."""
    if not manifests:
        return None
    tips = [s for s in manifests if not any(s != o and s in members(o, manifests) for o in manifests)]
    return max(tips or manifests, key=lambda s: (manifests[s].created_at, manifests[s].order, s))


def recency(manifests: Mapping[int, Manifest]) -> list[int]:
    """Steps newest first: the current lineage from its head back, then the other lineages the same way."""
    left, out = dict(manifests), []
    while left:
        head = newest(left)
        line = sorted(members(head, left), key=lambda s: (left[s].order, s), reverse=True)
        out += line
        for s in line:
            del left[s]
    return out


def descends(a: Manifest, b: Manifest, pool: Mapping[int, Manifest]) -> bool:
    """`a` is on the lineage of `b` (b descends from a, or is a), following parents through `pool`."""
    run, limit, seen = b.run_id, b.step, set()
    while run not in seen:
        if run == a.run_id and a.step <= limit:
            return True
        seen.add(run)
        segment = [m for m in (*pool.values(), b) if m.run_id == run and m.step <= limit]
        if not segment:
            return False
        parent = min(segment, key=lambda m: m.step).parent
        if parent is None:
            return False
        run, limit = parent.run_id, parent.step
    return False


def is_newer(a: Manifest, b: Manifest, pool: Mapping[int, Manifest]) -> bool:
    """`a` is newer work than `b`: it descends from b; or neither descends from the other and it was committed later."""
    if a == b:
        return False
    if descends(b, a, pool):
        return True
    if descends(a, b, pool):
        return False
    return (a.created_at, a.order) > (b.created_at, b.order)


def members(head: int, manifests: Mapping[int, Manifest]) -> set[int]:
    """Steps (keys of `manifests`) on the lineage of the checkpoint at `head`: it and its ancestors that are there."""
    out: set[int] = set()
    run, limit = manifests[head].run_id, head
    seen: set[str | None] = set()
    while run not in seen:
        seen.add(run)
        segment = [s for s, m in manifests.items() if m.run_id == run and s <= limit]
        out.update(segment)
        if not segment:
            break
        parent = manifests[min(segment)].parent  # the segment's first checkpoint says where it came from
        if parent is None:
            break
        run, limit = parent.run_id, parent.step
    return out


def retention(
    manifests: Mapping[int, Manifest], head: int, keep_last: int, protect: set[int] = frozenset()
) -> tuple[list[int], list[int]]:
    """(steps to delete, steps to archive) for keeping the newest `keep_last` of the lineage of `head`.

    Never the head, never a protected step (being uploaded); checkpoints of other lineages are archived, not deleted.
    """
    lineage = members(head, manifests)
    ordered = sorted(lineage, key=lambda s: (manifests[s].order, s))
    keep = set(ordered[-max(1, keep_last) :]) | {head} | set(protect)
    delete = [s for s in ordered if s not in keep]
    archive = sorted(s for s in manifests if s not in lineage and s not in protect)
    return delete, archive
