"""Moving remote checkpoints aside instead of deleting them: another lineage's to checkpoints/archived/<run id>/,
one whose manifest does not read to checkpoints/corrupt/.

A move copies the files (server-side), then the manifest, and only then uncommits the source (its manifest goes
first) and deletes its files: at every moment the checkpoint is committed in one place at least. Interrupted, it is
finished by the next try. Only `delete_archived` (`ckpt prune --archived`) ever deletes an archived checkpoint, and
nothing moves or deletes a checkpoint in a newer version's format.
"""

from __future__ import annotations

import logging

from trainer.checkpoint.manifest import Manifest
from trainer.errors import CheckpointError, UnsupportedCheckpoint
from trainer.remote.calls import Budget, Calls
from trainer.remote.layout import Listing, archived_rel, archived_step, ckpt_rel, corrupt_rel, manifest_rel
from trainer.remote.objects import Missing, ObjectStore
from trainer.run_dir import LEGACY_RUN, step_dirname

log = logging.getLogger(__name__)


class Archiver:
    """Moves checkpoints of one remote store aside."""

    def __init__(self, uri: str, objects: ObjectStore, calls: Calls):
        self.uri, self.objects, self.calls = uri, objects, calls

    def archive(self, step: int, manifest: Manifest, raw: bytes, budget: Budget) -> str:
        """Move checkpoints/step-X (committed with `raw`) to archived/<run id>/; the archived dir's path."""
        key, name = manifest.run_id or LEGACY_RUN, step_dirname(step)
        for n in range(1000):
            dst = archived_rel(key, name if n == 0 else f"{name}.{n}")
            there = self._read(manifest_rel(dst), budget)
            if there is None or there == raw:  # free, or this very move done before (interrupted): finish it
                self.move(ckpt_rel(step), dst, raw, budget)
                return dst
            # another archived copy (even of the same run and step): kept, the next name is tried
        raise CheckpointError(
            f"{self.uri}/{archived_rel(key, name)}: 1000 archived copies of this step; not "
            f"archived: delete some with `spot-trainer ckpt prune --archived`"
        )

    def quarantine(self, step: int, raw: bytes, budget: Budget) -> str:
        """Move checkpoints/step-X, whose manifest does not read, to corrupt/ (kept for a person to look at)."""
        dst = corrupt_rel(step, raw)
        self.move(ckpt_rel(step), dst, raw, budget)
        return dst

    def move(self, src: str, dst: str, raw: bytes, budget: Budget) -> None:
        """Copy src/ to dst/ (manifest last), then uncommit and delete src/; safe to repeat after an interruption."""
        src_man, dst_man = manifest_rel(src), manifest_rel(dst)
        now = self._read(src_man, budget)
        done = self._read(dst_man, budget) == raw
        if now is None and done:  # copied and uncommitted before: only the source's files are left
            self._delete_tree(src, budget)
            return
        if now != raw:
            raise CheckpointError(f"{self.uri}/{src}: changed while being moved aside (another writer?); not moved")
        if not done:
            objects = self.calls.call(self.objects.list, f"{src}/", deadline=budget.at)
            files = [(rel, n) for rel, n in sorted(objects.items()) if rel != src_man]
            budget.allow(sum(n for _, n in files))
            try:
                for rel, n in files:
                    self.calls.call(self.objects.copy, rel, dst + rel[len(src) :], deadline=self.calls.sized(n, budget))
                self.calls.call(self.objects.copy, src_man, dst_man, deadline=budget.at)  # last: committed there
            except Missing as e:
                raise CheckpointError(f"{self.uri}/{e.args[0]}: vanished while being moved aside; not moved") from None
        self.calls.call(self.objects.delete, [src_man], deadline=budget.at)  # uncommitted only once safe elsewhere
        self._delete_tree(src, budget)

    def archived(self, listing: Listing, deadline: float | None) -> dict[str, dict[int, Manifest]]:
        """run id ('legacy' for checkpoints without one) -> step -> manifest of the archived checkpoints."""
        out: dict[str, dict[int, Manifest]] = {}
        for key, dirs in sorted(listing.archived.items()):
            for name, committed in sorted(dirs.items()):
                m = self._manifest(archived_rel(key, name), deadline) if committed else None
                if m is not None:
                    out.setdefault(key, {})[archived_step(name)] = m
        return out

    def delete_archived(self, listing: Listing, run_id: str | None, deadline: float | None) -> list[str]:
        """Delete archived checkpoints (of one run id, or all), manifest first; never one in a newer format."""
        gone = []
        for key, dirs in sorted(listing.archived.items()):
            if run_id is not None and key != run_id:
                continue
            for name, committed in sorted(dirs.items()):
                rel = archived_rel(key, name)
                if committed and self._unsupported(rel, deadline):
                    log.warning("%s/%s: written by a newer spot-trainer; kept (upgrade to delete it)", self.uri, rel)
                    continue
                self.calls.retry(f"delete of {rel}", lambda b, r=rel: self._delete_dir(r, b), deadline)
                gone.append(f"{self.uri}/{rel}")
        return gone

    # ---------------------------------------------------------------- internals

    def _read(self, rel: str, budget: Budget) -> bytes | None:
        return self.calls.call(self.objects.read, rel, deadline=budget.at)

    def _manifest(self, rel: str, deadline: float | None) -> Manifest | None:
        raw = self.calls.retry(f"read of {rel}", lambda b: self._read(manifest_rel(rel), b), deadline)
        if raw is None:
            return None
        try:
            return Manifest.from_json(raw.decode("utf-8", "replace"), where=f"{self.uri}/{manifest_rel(rel)}")
        except CheckpointError as e:
            log.warning("archived checkpoint skipped: %s", e)
            return None

    def _unsupported(self, rel: str, deadline: float | None) -> bool:
        raw = self.calls.retry(f"read of {rel}", lambda b: self._read(manifest_rel(rel), b), deadline)
        try:
            if raw is not None:
                Manifest.from_json(raw.decode("utf-8", "replace"))
        except UnsupportedCheckpoint:
            return True
        except CheckpointError:
            pass  # a damaged archived copy may go: the user asked for the archive to be deleted
        return False

    def _delete_dir(self, rel: str, budget: Budget) -> None:
        self.calls.call(self.objects.delete, [manifest_rel(rel)], deadline=budget.at)
        self._delete_tree(rel, budget)

    def _delete_tree(self, rel: str, budget: Budget) -> None:
        rest = self.calls.call(self.objects.list, f"{rel}/", deadline=budget.at)
        self.calls.call(self.objects.delete, sorted(rest), deadline=budget.at)
