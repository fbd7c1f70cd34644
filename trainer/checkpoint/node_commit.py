"""Committing a checkpoint through the bucket when every node has an output dir of its own
(distributed.shared_output_dir=false: SkyPilot clusters, plain cloud VMs with local disks).

Every rank writes its files into its node's `.tmp-step-XXXXXXXX/` as usual. Then, in the writer thread:

1. rank 0 sets aside whatever is committed remotely at that step (another lineage's checkpoint is archived, never
   replaced) and tells the nodes to go on;
2. each node's first rank waits for its node's ranks, uploads their files (no manifest) and reports them
   (path, size, sha256) to rank 0 through the process group's store;
3. rank 0 waits for every node's report (bounded), checks that every listed file is in the bucket at its size,
   and writes the manifest there, last: the checkpoint is committed in the bucket, which holds the truth.

A node keeps its own files as `.pull-step-XXXXXXXX/` (the newest checkpoint.keep_last of them): a restart on the
same machine pulls only what it lacks (the pull reuses files whose sha256 matches). A failed upload or a node that
does not report in time leaves the checkpoint uncommitted (an event, training goes on); the previous one stands.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from collections.abc import Callable
from pathlib import Path

from trainer.checkpoint.manifest import FileEntry, Manifest, build_manifest, library_versions
from trainer.checkpoint.store import CheckpointStore, Snapshot
from trainer.errors import CheckpointError, SpotTrainerError
from trainer.liveness import Ranks
from trainer.remote.objects import StorageUnavailable
from trainer.remote.pull import pull_dir
from trainer.remote.store import RemoteStore
from trainer.run_dir import PULL_PREFIX, parse_step_dirname

log = logging.getLogger(__name__)

_POLL_S = 0.05
_FAILED = "!"
_SKIP = "skip"


class NodeCommit:
    """The writer's commit step on every rank with own output dirs; returns where rank 0's node keeps its files
    once the checkpoint is committed in the bucket, else None."""

    def __init__(
        self,
        store: CheckpointStore,
        remote: RemoteStore | None,
        ranks: Ranks,
        keep_last: int | None,
        remote_keep_last: int | None,
        wait_s: float,
        on_event: Callable[..., None],
    ):
        self.store, self.remote, self.ranks = store, remote, ranks
        self.keep_last, self.remote_keep_last, self.wait_s = keep_last, remote_keep_last, wait_s
        self.on_event = on_event
        self.committed: set[int] = set()  # rank 0: steps committed in the bucket by this process

    @property
    def here(self) -> range:
        """The ranks of this node: their files land in this node's dir."""
        return range(self.ranks.leader, self.ranks.leader + self.ranks.local_world)

    def _key(self, snap: Snapshot, what: str) -> str:
        return self.ranks.shared_key(f"ckpt/{snap.step}/{snap.kind}/{what}")

    # ------------------------------------------------------------------ the writer's calls

    def __call__(self, snap: Snapshot) -> Path | None:
        if not self.ranks.is_leader:
            return None
        try:
            return self._commit(snap)
        except Exception as e:  # the bucket, this node's disk, the store: the checkpoint is not committed
            why = f"{_FAILED}{type(e).__name__}: {e}"[:400]
            if self.ranks.rank == 0:  # the nodes still waiting to upload stop waiting
                self._set(self._key(snap, "ready"), why)
            else:
                self._report(snap, why)
            self._failed(snap, e)
            return None

    def failed(self, snap: Snapshot) -> None:
        """This rank could not write its files: its node's first rank tells rank 0 (rank 0 the other nodes) at once,
        so nobody waits for a timeout."""
        if not self.ranks.is_leader:
            return  # its .failed marker tells its node's first rank
        why = f"{_FAILED}rank {self.ranks.rank} could not write its files"
        try:
            self._set(self._key(snap, "ready" if self.ranks.rank == 0 else f"node/{self.ranks.rank}"), why)
        except Exception as e:
            log.warning("could not tell the other nodes that step %d failed here: %s", snap.step, e)
        self._drop_caches()

    # ------------------------------------------------------------------ the steps

    def _commit(self, snap: Snapshot) -> Path | None:
        tmp = self.store.tmp_path(snap.step)
        files = self._node_files(snap, tmp)
        if self.ranks.rank == 0:
            if self.remote.clear_step(snap.step, snap.lineage.run_id if snap.lineage else None):
                self._set(self._key(snap, "ready"), _SKIP)  # this very checkpoint is committed there already
                self.committed.add(snap.step)
                shutil.rmtree(tmp, ignore_errors=True)
                return None
            self._set(self._key(snap, "ready"), "1")
        elif self._wait_ready(snap) == _SKIP:
            shutil.rmtree(tmp, ignore_errors=True)
            return None
        self.remote.upload_files(tmp, snap.step, files)
        kept = self._keep(snap.step, tmp)
        if self.ranks.rank != 0:
            self._report(snap, json.dumps([[f.path, f.size, f.sha256] for f in files]))
            return None
        manifest = self._manifest(snap, files + self._reports(snap))
        self.remote.commit_manifest(manifest)
        self.committed.add(snap.step)
        if snap.kind != "emergency":  # the grace period is for the commit, retention waits for the next start
            self._prune_remote(snap.step)
        return kept

    def _node_files(self, snap: Snapshot, tmp: Path) -> list[FileEntry]:
        """Wait for this node's ranks' done markers; the node's files, hashed while they were written."""
        known = self.store.wait_for_ranks(snap, self.here, self.wait_s)
        return build_manifest(tmp, snap.step, known=known).files

    def _wait_ready(self, snap: Snapshot) -> str:
        key = self._key(snap, "ready")
        deadline = time.monotonic() + self.wait_s
        while not self._check(key):
            if time.monotonic() > deadline:
                raise CheckpointError(f"rank 0 did not open step {snap.step} for upload within {self.wait_s:.0f} s")
            time.sleep(_POLL_S)
        said = self.ranks.store.get(key).decode("utf-8", "replace")
        if said.startswith(_FAILED):
            raise CheckpointError(f"rank 0 gave up on step {snap.step}: {said[1:]}")
        return said

    def _reports(self, snap: Snapshot) -> list[FileEntry]:
        """Rank 0: every other node's files, as it reported them (bounded: a node that never reports fails it)."""
        out: list[FileEntry] = []
        deadline = time.monotonic() + self.wait_s
        for leader in self.ranks.leaders[1:]:
            key = self._key(snap, f"node/{leader}")
            while not self._check(key):
                if time.monotonic() > deadline:
                    raise CheckpointError(
                        f"step {snap.step}: the node of rank {leader} did not report its upload within "
                        f"{self.wait_s:.0f} s; not committed"
                    )
                time.sleep(_POLL_S)
            text = self.ranks.store.get(key).decode("utf-8", "replace")
            if text.startswith(_FAILED):
                raise CheckpointError(f"step {snap.step}: the node of rank {leader} failed: {text[1:]}")
            try:
                out += [FileEntry(str(p), int(n), str(h)) for p, n, h in json.loads(text)]
            except (ValueError, TypeError) as e:
                raise CheckpointError(f"step {snap.step}: the node of rank {leader} sent a bad report ({e})") from None
        return out

    def _manifest(self, snap: Snapshot, files: list[FileEntry]) -> Manifest:
        seen: dict[str, FileEntry] = {}
        for f in files:
            if f.path in seen and seen[f.path] != f:
                raise CheckpointError(f"step {snap.step}: two nodes wrote {f.path} differently; not committed")
            seen[f.path] = f
        # every rank's files, or the checkpoint could not be resumed on this world size (a node missing, a node
        # layout that is not what the ranks think it is)
        missing = [r for r in range(snap.world_size) if f"rng-rank{r:05d}.json" not in seen]
        if missing:
            raise CheckpointError(f"step {snap.step}: no files of ranks {missing[:8]}; not committed")
        lin = snap.lineage
        m = Manifest(
            step=snap.step,
            files=[seen[p] for p in sorted(seen)],
            world_size=snap.world_size,
            kind=snap.kind,
            extra=snap.extra,
            versions=library_versions(),
            run_id=lin.run_id if lin else None,
            seq=lin.seq if lin else None,
            parent=lin.parent if lin else None,
        )
        # the same checks a manifest read from the bucket gets (a path that escapes the dir, a bad size or hash)
        return Manifest.from_json(m.to_json(), where=f"step {snap.step}'s manifest")

    def _keep(self, step: int, tmp: Path) -> Path:
        """This node's files of `step` become its pull cache; older caches beyond checkpoint.keep_last go."""
        kept = pull_dir(self.store.root, step)
        if kept.exists():
            shutil.rmtree(kept)
        os.replace(tmp, kept)
        older = sorted(s for s in self._cached() if s < step)  # a cache of a later step is another lineage's
        for s in older[: max(0, len(older) - max(0, (self.keep_last or 2) - 1))]:
            shutil.rmtree(pull_dir(self.store.root, s), ignore_errors=True)
        return kept

    def _cached(self) -> list[int]:
        return [
            s
            for p in self.store.root.glob(f"{PULL_PREFIX}step-*")
            if (s := parse_step_dirname(p.name.removeprefix(PULL_PREFIX))) is not None
        ]

    def _drop_caches(self) -> None:
        """A write failed here (a full disk?): the pull caches are only copies of the bucket's; they go first."""
        for s in self._cached():
            shutil.rmtree(pull_dir(self.store.root, s), ignore_errors=True)

    def _prune_remote(self, step: int) -> None:
        keep = self.remote_keep_last or self.keep_last
        if not keep:
            return
        try:
            deleted, archived = self.remote.prune(keep, head=step)
        except (SpotTrainerError, StorageUnavailable) as e:  # retention waits for the next commit
            log.warning("remote retention after step %d: %s", step, e)
            return
        if deleted or archived:
            self.on_event("remote_prune", step=step, deleted=deleted, archived=archived)

    def _failed(self, snap: Snapshot, err: BaseException) -> None:
        self.on_event("checkpoint_failed", step=snap.step, kind=snap.kind, error=str(err)[:300], pruned=[])
        log.warning("checkpoint at step %d not committed in the bucket: %s; training goes on", snap.step, err)
        self.store.abandon(snap)  # once this node's ranks are done or failed with it (bounded)
        if isinstance(err, OSError) or "No space left" in str(err):
            self._drop_caches()

    # ------------------------------------------------------------------ the store (never a blocking get)

    def _report(self, snap: Snapshot, value: str) -> None:
        self._set(self._key(snap, f"node/{self.ranks.rank}"), value)

    def _set(self, key: str, value: str) -> None:
        self.ranks.store.set(key, value)

    def _check(self, key: str) -> bool:
        return bool(self.ranks.store.check([key]))
