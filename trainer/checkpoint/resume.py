"""What a run resumes from (rank 0 decides), and the rules that keep committed work from being lost doing it.

- Starting over is explicit: `--resume never` over committed checkpoints (local or remote) is refused unless
  `--archive-existing` moves them to checkpoints/archived/.
- A fresh pod never trains from step 0 over progress it cannot see: if the remote cannot be reached (or a newer
  remote checkpoint cannot be pulled) and nothing local can be resumed, the run exits 69 (resumable) instead.
- After the choice, the output dir holds one lineage: checkpoints of other lineages are archived, never deleted.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from trainer.checkpoint import lineage
from trainer.checkpoint.lineage import Lineage
from trainer.checkpoint.manifest import Manifest, Parent, new_run_id
from trainer.checkpoint.store import CheckpointStore
from trainer.errors import CheckpointError, ConfigError, CorruptCheckpoint, StorageWait, UnsupportedCheckpoint
from trainer.remote.objects import StorageUnavailable
from trainer.remote.store import RemoteStore

log = logging.getLogger(__name__)
WAIT_POLL_S = (5.0, 60.0)  # backoff between tries while the remote is unreachable at start: first, most


@dataclass
class Choice:
    """The checkpoint to load (None: a fresh start) and the lineage the run's next checkpoints record."""

    path: Path | None
    manifest: Manifest | None
    lineage: Lineage


def fresh() -> Choice:
    return Choice(None, None, Lineage(new_run_id(), None, 1))


def resumed(path: Path, manifest: Manifest, branch: bool) -> Choice:
    """Continue the checkpoint's run, or (branch) start a new segment whose parent is that checkpoint. Checkpoints
    written before lineage existed get a run id now."""
    run_id = manifest.run_id if (manifest.run_id and not branch) else new_run_id()
    return Choice(path, manifest, Lineage(run_id, Parent(manifest.run_id, manifest.step), manifest.order + 1))


def guard_start_over(
    store: CheckpointStore, remote: RemoteStore | None, archive_existing: bool, say: Callable[[str], None]
) -> None:
    """`--resume never`: refuse (exit 2) when committed checkpoints exist, or archive them when asked to."""
    local = store.committed_steps()
    remote_steps: list[int] = []
    if remote is not None:
        try:
            remote_steps = remote.committed_steps(deadline=remote.deadline(60))
        except StorageUnavailable as e:
            raise StorageWait(
                f"--resume never: cannot list {remote.uri} ({e}), which may hold committed checkpoints "
                f"that starting over would later archive; exiting 69 to try again when it answers "
                f"(or unset checkpoint.remote)"
            ) from None
    if not (local or remote_steps):
        return
    where = " and ".join(
        x
        for x in (
            f"{len(local)} in {store.root}" if local else "",
            f"{len(remote_steps)} in {remote.uri}" if remote_steps else "",
        )
        if x
    )
    newest = max(local + remote_steps)
    if not archive_existing:
        raise ConfigError(
            f"--resume never: there are committed checkpoints ({where}; newest step {newest}); "
            f"resume them with --resume auto, or start over with --resume never --archive-existing "
            f"(moves them to checkpoints/archived/), or use another --output-dir"
        )
    for step in local:
        store.archive(step)
    if remote_steps:
        manifests, problems = remote.committed(deadline=remote.deadline(60))
        for step, manifest in sorted(manifests.items()):
            remote.archive_checkpoint(step, manifest)
        for problem in problems:  # unreadable or of a newer format: left where they are
            log.warning("--archive-existing: not moved: %s", problem)
    say(f"--archive-existing: moved {where} checkpoint(s) to checkpoints/archived/; starting over")


def choose(
    mode: str,
    store: CheckpointStore,
    remote: RemoteStore | None,
    remote_wait_s: float,
    say: Callable[[str], None],
    beat: Callable[[], None],
) -> Choice:
    """Rank 0: what `--resume auto|never|PATH` resumes from."""
    if mode == "never":
        return fresh()
    if mode != "auto":
        path = Path(mode)  # verified by the CLI
        manifest = Manifest.load(path)
        untrusted = store.signer.problem(manifest) if store.signer is not None else None
        if untrusted:
            raise ConfigError(f"--resume {path}: {untrusted}")
        local, _ = store.manifests()
        head = lineage.newest(local)
        is_head = head is not None and store.path(head).resolve() == path.resolve()
        return resumed(path, manifest, branch=not is_head)
    local = store.latest_valid(quarantine=True)
    local_manifest = Manifest.load(local[1]) if local else None
    if remote is None:
        return resumed(local[1], local_manifest, branch=False) if local else _fresh_unless_untrusted(store, None)
    remote_manifests = _wait_for_remote(remote, remote_wait_s, beat)
    if remote_manifests is None:
        if local:
            log.warning(
                "cannot reach %s for %.0f s; resuming the local checkpoint %s as a branch of its run (the "
                "remote's checkpoints are kept)",
                remote.uri,
                remote_wait_s,
                local[1],
            )
            return resumed(local[1], local_manifest, branch=True)
        raise StorageWait(
            f"{remote.uri}: not reachable for {remote_wait_s:.0f} s (checkpoint.remote_wait_s) and no "
            f"local checkpoint: it may hold this run's progress, so training does not start from step 0; "
            f"exiting 69 to try again later (--resume never starts without it)"
        )
    for step in _newer_first(remote_manifests, local_manifest):
        try:
            path = remote.pull(step, store.root, manifest=remote_manifests[step])
        except StorageUnavailable as e:
            raise StorageWait(
                f"{remote.uri}: pulling the newer checkpoint step {step} failed ({e}); training does "
                f"not start from {f'step {local[0]}' if local else 'step 0'} over it; exiting 69 to "
                f"try again later"
            ) from None
        except StorageWait:
            raise  # not enough disk for it: the message says how much
        except (CorruptCheckpoint, UnsupportedCheckpoint) as e:  # a fact about the remote copy: the previous one
            log.warning("remote checkpoint step %d is unusable (%s); trying the previous one", step, e)
            continue
        except (CheckpointError, OSError) as e:  # a problem on this machine: the newer checkpoint is still good
            raise StorageWait(
                f"{remote.uri}: the newer checkpoint step {step} could not be pulled here ({e}); "
                f"training does not go back to an older one over it; exiting 69 to try again later "
                f"(fix the local problem, or use --resume PATH to choose)"
            ) from None
        say(f"pulled checkpoint step {step} from {remote.uri}")
        return resumed(path, remote_manifests[step], branch=False)
    return resumed(local[1], local_manifest, branch=False) if local else _fresh_unless_untrusted(store, remote)


def _fresh_unless_untrusted(store: CheckpointStore, remote: RemoteStore | None) -> Choice:
    """Step 0, unless checkpoints exist that only the signing key refused: a wrong or rotated key must not restart
    a run from step 0 over its work (a forgery next to good checkpoints falls back to those; this is none at all)."""
    signer = store.signer
    if signer is None:
        return fresh()
    refused = [s for s, v in store.manifests()[1].items() if v.untrusted]
    refused_remote = list(getattr(remote, "untrusted_steps", []) if remote is not None else [])
    if refused or refused_remote:
        where = ", ".join(
            x
            for x in (
                f"local steps {refused}" if refused else "",
                f"remote steps {refused_remote}" if refused_remote else "",
            )
            if x
        )
        raise ConfigError(
            f"checkpoint.sign_key_env: every checkpoint here ({where}) is unsigned or not signed with the key in "
            f"{signer.env} (key id {signer.key_id}), so none is trusted and training would start from step 0 over "
            f"them; set the key they were signed with, or start over with --resume never --archive-existing"
        )
    return fresh()


def _newer_first(remote: dict[int, Manifest], local: Manifest | None) -> list[int]:
    """Remote checkpoints that are newer work than the local one, newest first."""
    return [s for s in lineage.recency(remote) if local is None or lineage.is_newer(remote[s], local, remote)]


def _wait_for_remote(remote: RemoteStore, wait_s: float, beat: Callable[[], None]) -> dict[int, Manifest] | None:
    """The remote's committed manifests, trying for up to `wait_s` seconds; None if it never answered."""
    end, pause = time.monotonic() + wait_s, WAIT_POLL_S[0]
    while True:
        try:
            manifests, problems = remote.committed(deadline=remote.deadline(min(60.0, max(1.0, wait_s))))
        except StorageUnavailable as e:
            left = end - time.monotonic()
            if left <= 0:
                return None
            log.warning(
                "cannot reach %s (%s); trying again in %.0f s (%.0f s left)", remote.uri, e, min(pause, left), left
            )
            until = time.monotonic() + min(pause, left)
            while time.monotonic() < until:
                beat()  # the supervisor must not take the wait for a hang
                time.sleep(min(1.0, max(0.0, until - time.monotonic())))
            pause = min(pause * 2, WAIT_POLL_S[1])
            continue
        for p in problems:
            log.warning("remote checkpoint skipped: %s", p)
        return manifests


def keep_one_lineage(
    store: CheckpointStore, remote: RemoteStore | None, choice: Choice, say: Callable[[str], None]
) -> None:
    """Rank 0, after the choice: archive local (and remote) checkpoints that are not on the resumed lineage."""
    if choice.manifest is None:
        return
    head = choice.manifest.step
    local, _ = store.manifests()
    inside = store.path(head).resolve() == choice.path.resolve()
    if not inside and head in local:  # a checkpoint from elsewhere; the same step here is another one
        store.archive(head)
        local.pop(head)
    on_line = lineage.members(head, {**local, head: choice.manifest})
    moved = sorted(s for s in local if s not in on_line)
    for s in moved:
        store.archive(s, local[s].run_id)
    if moved:
        say(f"archived checkpoints {moved} of another lineage to {store.root / 'archived'}")
    if remote is not None:
        try:
            remote_manifests, _ = remote.committed(deadline=remote.deadline(60))
        except StorageUnavailable as e:
            log.warning(
                "cannot reach %s to archive the other lineage there now (%s); its retention does it after "
                "the next upload",
                remote.uri,
                e,
            )
            return
        on_remote = lineage.members(head, {**remote_manifests, head: choice.manifest})
        for s, m in sorted(remote_manifests.items()):
            if s not in on_remote or (s == head and m != choice.manifest):
                remote.archive_checkpoint(s, m)
