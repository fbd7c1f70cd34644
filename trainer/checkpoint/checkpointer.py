"""The checkpoint component the training loop holds: resume, periodic and emergency saves, `final/`, uploads.

The loop calls `resume()` once, `maybe_save()` after every step, `emergency()` on an agreed stop and `finish()`
at the end; interval, retention, the background writer and the uploader live in here. Built with what it needs
(config, run dir, accelerator, model and optimizer, logs, a heartbeat callback); it reads nothing of its caller.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from pathlib import Path

import torch

from trainer import model as model_lib
from trainer.checkpoint import model_state, resume, signing
from trainer.checkpoint.final import write_final
from trainer.checkpoint.manifest import Manifest, check
from trainer.checkpoint.optimizer_state import _torch_optimizer, load_optimizer_state, optimizer_snapshot
from trainer.checkpoint.progress import Progress
from trainer.checkpoint.snapshot_copy import SnapshotCopy, copy_tensor
from trainer.checkpoint.store import CheckpointStore, Snapshot, read_json, read_tensors
from trainer.checkpoint.writer import CheckpointWriter, out_of_space
from trainer.config.schema import Config
from trainer.distributed import agree_int
from trainer.errors import CheckpointError, ConfigError, StorageWait
from trainer.liveness import Heartbeat, Ranks
from trainer.metrics import EventLog, MetricsLog
from trainer.remote.objects import CredentialsRefused, StorageUnavailable, UploadInterrupted
from trainer.remote.store import RemoteStore
from trainer.run_dir import FINAL_DIR, MANIFEST_NAME, METRICS_FILE, RunDir
from trainer.schedule import warmup_steps

log = logging.getLogger(__name__)


def open_remote(cfg: Config, is_main: bool) -> RemoteStore | None:
    """Rank 0's remote store, checked now: bad credentials or a missing bucket fail before any work (exit 2)."""
    if not (cfg.checkpoint.remote and is_main):
        return None
    from trainer.remote.store import open_store

    remote = open_store(cfg.checkpoint.remote, cfg.checkpoint.s3, signing.from_config(cfg.checkpoint))
    try:
        remote.check(deadline=remote.deadline(60))  # a typo'd endpoint: within 60 s
    except StorageUnavailable as e:  # down, not wrong: resume() waits for it (checkpoint.remote_wait_s)
        log.warning("cannot reach %s now (%s); checking again before resuming", remote.uri, e)
    return remote


class Checkpointer:
    def __init__(
        self,
        cfg: Config,
        run: RunDir,
        acc,
        model,
        optimizer,
        *,
        remote: RemoteStore | None,
        events: EventLog,
        metrics: MetricsLog,
        heartbeat: Heartbeat,
        say: Callable[[str], None],
        ranks: Ranks,
        stop_requested: Callable[[], bool] = lambda: False,
        started: float | None = None,
        copy: Callable[[torch.Tensor, torch.Tensor], None] = copy_tensor,
    ):
        self.cfg, self.run, self.acc = cfg, run, acc
        self.model, self.optimizer = model, optimizer
        self.raw_model = acc.unwrap_model(model)
        self.rank, self.world, self.is_main = acc.process_index, acc.num_processes, acc.is_main_process
        self.remote, self.events, self.metrics, self.heartbeat, self.say = remote, events, metrics, heartbeat, say
        self.ranks, self.stop_requested = ranks, stop_requested
        self.store = CheckpointStore(run.root, signing.from_config(cfg.checkpoint))  # signs, trusts only signed
        self.saved_step = -1  # the newest step this run resumed from or handed to the writer (all ranks alike)
        self.lineage = None  # rank 0: what the next checkpoint records (resume() sets it)
        self.disk_full_seen = False
        self.last_save_time = time.monotonic() if started is None else started  # every_minutes counts from here
        self.uploader = None
        self.node_commit = None
        # distributed.shared_output_dir=false: each node has a dir of its own; checkpoints commit in the bucket
        self.per_node = not cfg.distributed.shared_output_dir and self.world > 1
        if self.per_node:
            from trainer.checkpoint.node_commit import NodeCommit

            self.store.ranks_here = range(ranks.leader, ranks.leader + ranks.local_world)
            self.node_commit = NodeCommit(
                self.store,
                remote,
                ranks,
                keep_last=cfg.checkpoint.keep_last,
                remote_keep_last=cfg.checkpoint.remote_keep_last,
                wait_s=cfg.distributed.timeout_s + cfg.checkpoint.s3.deadline_s,
                on_event=self.events.emit,
            )
        elif remote is not None:
            from trainer.remote.uploader import CheckpointUploader

            keep = cfg.checkpoint.remote_keep_last or cfg.checkpoint.keep_last
            self.uploader = CheckpointUploader(
                remote,
                keep_last=keep,
                on_uploaded=self._on_uploaded,
                on_event=self.events.emit,
                stop=stop_requested,  # a stop leaves periodic uploads for the next start; never an emergency's
            )
        self.writer = CheckpointWriter(self.store, self.rank, self._on_commit, self._on_failed, self.node_commit)
        # a periodic snapshot's tensors are copied in the background; the next optimizer step waits for the copy
        # (a step pre-hook: under DeepSpeed the step runs inside the last micro-batch's backward, not in the loop)
        self.copier, self._copying = SnapshotCopy(copy), None
        self._step_hook = _torch_optimizer(optimizer).register_step_pre_hook(lambda *_: self.before_optimizer_step())

    # ------------------------------------------------------------------ resume

    def resume(self, mode: str, fresh: Progress) -> Progress | None:
        """Load the checkpoint `mode` names (auto | never | a path) into model and optimizer; its Progress or None.

        Rank 0 decides (local, or pulled from the remote on a fresh pod) and every rank loads the same step.
        `fresh` is this run's geometry at step 0; a checkpoint saved with another global batch or other data is
        refused with the setting that would resume it.
        """
        chosen: dict = {}

        def choose() -> int:  # rank 0; the others wait for its answer without sitting in a collective
            try:
                choice = resume.choose(
                    mode, self.store, self.remote, self.cfg.checkpoint.remote_wait_s, self.say, self.heartbeat
                )
                if self.per_node and choice.path is not None:  # the other nodes pull it: the bucket must hold it
                    self.remote.upload_checkpoint(choice.path)  # a no-op when it does
            except StorageWait as e:
                self.events.emit("storage_wait", error=str(e)[:300])
                raise
            if choice.path is not None:  # refused before anything is moved aside: nothing touched
                saved = Progress.from_json(
                    read_json(choice.path, "trainer_state.json"), str(choice.path / "trainer_state.json")
                )
                self._check_compatible(choice.path, saved, fresh)
            resume.keep_one_lineage(self.store, self.remote, choice, self.say)
            self.store.clean_stale(pulls=True)
            self.lineage = choice.lineage
            chosen["path"] = choice.path
            return choice.manifest.step if choice.manifest else -1

        step = self.ranks.main_only("resume", choose, self.heartbeat)
        if self.per_node and step >= 0:  # every other node pulls the chosen step from the bucket
            self.ranks.main_only("pull", lambda: self._pull_here(step), self.heartbeat, per_node=True)
            if self.is_main:  # committed there: an emergency save of this step before the next one is not needed
                self.node_commit.committed.add(step)
        path = chosen.get("path")
        progress = None
        if step < 0:
            self.metrics.rewind("", 0)
        else:
            if not self.is_main:
                path = Path(mode) if mode not in ("auto", "never") else self.store.path(step)
            progress = self._load(path, fresh)
        if self.uploader is not None:  # committed locally but not remotely (died mid-upload): upload now
            self.uploader.sync_pending(self.store.root)
        return progress

    def _pull_here(self, step: int) -> None:
        """The first rank of a node other than rank 0's: the checkpoint rank 0 chose, pulled into this node's dir
        (files this node wrote itself are reused when their sha256 matches)."""
        if self.rank == 0:
            return
        local = self.store.path(step)
        if (local / MANIFEST_NAME).is_file():  # pulled by an earlier start: used if it is that very checkpoint, whole
            try:
                same = Manifest.load(local) == self.remote.get_manifest(step)
            except CheckpointError:
                same = False
            if same and check(local, deep=True, signer=self.store.signer).ok:
                return
            moved = self.store.archive(step)  # another lineage's (or a damaged) copy: kept aside, never pulled over
            log.warning("%s is not the checkpoint rank 0 chose; moved to %s", local, moved)
        try:
            self.remote.pull(step, self.store.root)
        except StorageWait as e:
            self.events.emit("storage_wait", error=str(e)[:300])
            raise
        self.store.clean_stale(pulls=True)
        self.store.prune(self.cfg.checkpoint.keep_last, head=step)  # copies of earlier starts' pulls

    def _load(self, path: Path, fresh: Progress) -> Progress:
        saved = Progress.from_json(read_json(path, "trainer_state.json"), str(path / "trainer_state.json"))
        self._check_compatible(path, saved, fresh)
        model_state.load_trainable_state(self.raw_model, read_tensors(path, "model.safetensors"), str(path))
        # any layout (one file, or per-rank ZeRO partitions) onto any world size, by parameter name
        load_optimizer_state(self.acc, self.model, self.optimizer, path)
        rng_file = path / f"rng-rank{self.rank:05d}.json"
        if saved.world_size == self.world and rng_file.exists():
            model_state.set_rng_state(read_json(path, rng_file.name))
        else:  # another world size: fresh per-rank streams, derived from the step so it is still reproducible
            torch.manual_seed(self.cfg.train.seed + 1000 * saved.step + self.rank)
        saved_metrics = (path / METRICS_FILE).read_text() if (path / METRICS_FILE).exists() else None
        self.metrics.rewind(saved_metrics, saved.step)
        self.saved_step = saved.step
        self.say(f"resumed from {path} (step {saved.step}/{fresh.total_steps})")
        return fresh.resumed(saved, where=str(path / "trainer_state.json"))

    def _check_compatible(self, path: Path, saved: Progress, fresh: Progress) -> None:
        gb = saved.global_batch
        if gb is not None and gb != fresh.global_batch:
            raise ConfigError(
                f"{path}: saved with global batch {gb}, this run has {fresh.global_batch} "
                f"(micro {fresh.micro_batch_size} x accum {fresh.grad_accum} x "
                f"{fresh.world_size} processes); set train.global_batch_size={gb} to resume it"
            )
        if saved.n_rows not in (None, fresh.n_rows):
            raise ConfigError(
                f"{path}: saved with {saved.n_rows} training rows, the data now has "
                f"{fresh.n_rows}; resume with the same data or use --resume never"
            )

    # ------------------------------------------------------------------ saving

    def due_by_steps(self, step: int) -> bool:
        """checkpoint.every_steps says to save after `step`: every rank computes the same, no vote needed."""
        every = self.cfg.checkpoint.every_steps
        return bool(every) and step % every == 0

    def due_by_clock(self) -> bool:
        """checkpoint.every_minutes have passed since the last save, by this process's clock. Only rank 0's counts:
        the loop votes it, so every rank saves the same step (the others' clocks are never asked)."""
        minutes = self.cfg.checkpoint.every_minutes
        return bool(minutes) and self.is_main and time.monotonic() - self.last_save_time >= 60 * minutes

    def maybe_save(self, progress: Progress, *, last: bool = False, agreed: bool = False) -> bool:
        """Save after this step if it is the last, every_steps says so, or the ranks agreed to (clock, notice)."""
        if not (last or agreed or self.due_by_steps(progress.step)):
            return False
        if self.per_node and not last and self._node_upload_busy(progress.step):
            return False
        self.save(progress, "final" if last else "periodic")
        return True

    def _node_upload_busy(self, step: int) -> bool:
        """Own output dirs: a node still uploading the previous checkpoint skips this one, and so does every rank
        (one vote), instead of the training thread waiting for the bucket."""
        busy = bool(agree_int(0, self.acc, any_rank=int(self.writer.busy)))
        if busy and self.is_main:
            log.warning(
                "checkpoint at step %d skipped: a node is still uploading the previous one; the bucket takes "
                "checkpoints slower than they come: raise checkpoint.every_steps/every_minutes",
                step,
            )
            self.events.emit("checkpoint_skipped", step=step, reason="previous upload in flight")
        return busy

    def save(self, progress: Progress, kind: str = "periodic", sync: bool = False, rng: tuple | None = None) -> None:
        # Decided from this run's own history, not from the disk: rank 0 commits in the background, so ranks
        # reading committed_steps() could disagree, and rank 0 would wait for a marker that never comes.
        if progress.step == self.saved_step:
            return
        self.saved_step = progress.step
        t0 = time.monotonic()
        # one snapshot in RAM at a time: if the previous checkpoint is still being written, wait for it (every
        # rank does, so they stay in step) instead of queueing copies of the whole state
        self._wait_writer()
        waited = time.monotonic() - t0
        if waited > 1.0 and kind == "periodic":
            log.warning(
                "checkpoint at step %d waited %.1f s for the previous one to finish writing; checkpoints "
                "come faster than the disk takes them: raise checkpoint.every_steps/every_minutes",
                progress.step,
                waited,
            )
        snap = self._snapshot(progress, kind, rng, copy=False)  # references; a synchronous write uses them as they are
        if not sync:  # copied in the background; handed to the writer once done (before_optimizer_step)
            self.copier.start(snap.tensors)
        snap.extra["stall_s"] = round(time.monotonic() - t0, 4)
        if waited > 0.05:
            snap.extra["waited_for_previous_s"] = round(waited, 3)
        if sync:
            self.writer.write_now(snap)
        else:
            self._copying = snap
        self.last_save_time = time.monotonic()

    def before_optimizer_step(self) -> None:
        """Right before every optimizer step (its pre-hook, on every rank): the running snapshot copy is finished
        first, since the step changes what it copies; the snapshot then goes to the writer. No collective."""
        snap, self._copying = self._copying, None
        if snap is None:
            return
        waited = self.copier.wait()
        snap.tensors = self.copier.copied
        snap.extra["copy_wait_s"] = round(waited, 4)  # the stall this checkpoint added to the next step
        snap.extra["copy_s"] = round(self.copier.copy_s, 4)
        if self.is_main:
            self.events.emit(
                "checkpoint_copy", step=snap.step, copy_wait_s=snap.extra["copy_wait_s"], copy_s=snap.extra["copy_s"]
            )
        self.writer.submit(snap)

    def emergency(self, progress: Progress, rng: tuple) -> bool:
        """Commit the state at the last completed step now; True only when its manifest is on the disk.

        A background write still running (maybe of this very step) is waited for first; if this step's write did
        not commit (a full disk), it is written again after retention made room.
        """
        try:
            self._wait_writer()
        except (CheckpointError, OSError) as e:
            if not out_of_space(e):
                raise
        if agree_int(int(self.is_main and self.committed(progress.step)), self.acc):
            self.upload_urgently(progress.step)  # committed as a periodic one: the stop must not leave it local
            return True
        if self.saved_step == progress.step and self.is_main:  # its background write failed: make room first
            self.store.prune(1, protect=self._uploading())
        self.saved_step = -1
        try:
            self.save(progress, "emergency", sync=True, rng=rng)
            self._wait_writer()
        except (CheckpointError, OSError) as e:
            if not out_of_space(e):
                raise
            if self.is_main:
                self.store.abandon(Snapshot(step=progress.step, rank=self.rank, world_size=self.world))
            self.events.emit("checkpoint_failed", step=progress.step, kind="emergency", error=str(e)[:300], pruned=[])
            return False
        return bool(agree_int(int(self.is_main and self.committed(progress.step)), self.acc))

    def upload_urgently(self, step: int) -> None:
        """Rank 0: the committed checkpoint of `step` goes first and is never interrupted by the stop."""
        if self.uploader is not None and self.is_main and self.committed(step):
            self.uploader.urgent(self.store.path(step))

    def _wait_writer(self) -> None:
        """The writer is idle (its error, if any, raised here). The heartbeat says so while it writes, for at most
        supervisor.hang_timeout: a write stuck longer (a hung mount) stops the beats, and the supervisor restarts."""
        self.before_optimizer_step()  # a snapshot still being copied is written too
        t0 = time.monotonic()
        while not self.writer.wait(timeout=1.0):
            if time.monotonic() - t0 < self.cfg.supervisor.hang_timeout:
                self.heartbeat(phase="checkpoint-write")
        self.heartbeat(phase="train")

    def committed(self, step: int) -> bool:
        """Rank 0: the checkpoint of `step` is committed on the disk (its manifest exists), or with own output dirs
        in the bucket."""
        if self.node_commit is not None:
            return step in self.node_commit.committed
        return (self.store.path(step) / MANIFEST_NAME).is_file()

    def _snapshot(self, progress: Progress, kind: str, rng: tuple | None, copy: bool) -> Snapshot:
        """copy=False (a synchronous write): the live tensors, not copies; nothing changes them until it is done."""
        snap = Snapshot(step=progress.step, rank=self.rank, world_size=self.world, kind=kind, lineage=self.lineage)
        tensors, meta = optimizer_snapshot(self.acc, self.model, self.optimizer, copy)  # every rank: ZeRO partitions
        snap.tensors.update(tensors)
        snap.json.update(meta)
        snap.json[f"rng-rank{self.rank:05d}.json"] = model_state.rng_json(rng or model_state.capture_rng())
        if self.is_main:
            t = self.cfg.train
            snap.tensors["model.safetensors"] = model_state.trainable_state(self.raw_model, copy)
            snap.json["trainer_state.json"] = progress.to_json()
            snap.json["scheduler.json"] = {
                "kind": t.lr_scheduler,
                "step": progress.step,
                "total_steps": progress.total_steps,
                "warmup_steps": warmup_steps(progress.total_steps, t.warmup_steps, t.warmup_ratio),
                "base_lr": t.lr,
            }
            snap.text["config.yaml"] = self.cfg.to_yaml()
            snap.text[METRICS_FILE] = self.metrics.text()
        return snap

    # ------------------------------------------------------------------ the writer's and uploader's callbacks

    def _on_commit(self, snap: Snapshot, path: Path, seconds: float) -> None:
        """Rank 0, writer thread: log, hand to the uploader, apply retention."""
        stall = snap.extra.get("stall_s")
        self.lineage = snap.lineage.after(snap.step)  # the next checkpoint descends from this one
        self.events.emit(
            "checkpoint",
            step=snap.step,
            kind=snap.kind,
            stall_s=stall,
            copy_wait_s=snap.extra.get("copy_wait_s"),  # what the next optimizer step waited for the background copy
            commit_s=round(seconds, 3),
            run_id=snap.lineage.run_id,
            seq=snap.lineage.seq,
        )
        if self.uploader is not None:
            self.uploader.submit(path)
        self.store.prune(
            1 if self.disk_full_seen else self.cfg.checkpoint.keep_last, head=snap.step, protect=self._uploading()
        )

    def _on_failed(self, snap: Snapshot, err: BaseException) -> None:
        """Writer thread, every rank: a checkpoint did not fit on the disk. Training goes on; rank 0 keeps only
        the newest committed checkpoint (and those still uploading) to make room for the next one."""
        if not self.is_main:
            return
        self.disk_full_seen = True  # from now on keep only the newest: 2 on the disk at most, while writing
        freed, _ = self.store.prune(1, protect=self._uploading())
        newest = self.store.committed_steps()
        self.events.emit("checkpoint_failed", step=snap.step, kind=snap.kind, error=str(err)[:300], pruned=freed)
        log.warning(
            "checkpoint at step %d not written: the disk is full (%s); training goes on, the newest "
            "committed checkpoint is %s%s, and only the newest is kept from now on; free space or lower "
            "checkpoint.keep_last",
            snap.step,
            str(err).splitlines()[0][:160],
            f"step {newest[-1]}" if newest else "none",
            f" (deleted older checkpoints {freed} to make room)" if freed else "",
        )

    def _uploading(self) -> set[int]:
        """Steps still on their way to the remote: retention must not delete them locally yet."""
        return set(self.uploader.pending_steps) if self.uploader is not None else set()

    def _on_uploaded(self, step: int, seconds: float, nbytes: int) -> None:
        self.events.emit("upload", step=step, seconds=round(seconds, 3), bytes=nbytes)

    # ------------------------------------------------------------------ the end

    def wait_uploads(self, timeout: float | None) -> None:
        """Wait for queued uploads (at most `timeout` s), touching the heartbeat, so the supervisor never takes a
        long upload for a hang."""
        if self.uploader is None:
            return
        end = None if timeout is None else time.monotonic() + timeout
        done = False
        while not done:
            left = 30.0 if end is None else min(30.0, max(0.0, end - time.monotonic()))
            done = self.uploader.wait(left)
            self.heartbeat(phase="upload")
            if (end is not None and time.monotonic() >= end) or self.uploader.gave_up_waiting:
                break  # paused (credentials refused) for checkpoint.s3.deadline_s of waiting: not forever
        if not done:
            log.warning(
                "upload not finished %s; the checkpoint is committed locally and will be uploaded on the next start",
                f"within {timeout:.1f} s" if timeout is not None else "(uploads paused: the credentials are refused)",
            )

    def finish(self, progress: Progress, tokenizer) -> bool:
        """After the last step: wait for the writes, write `final/` (rank 0), upload it with the newest checkpoint.
        False (on every rank) if a stop ended the upload: the run is then preempted, not done."""
        self._wait_writer()
        return not self.ranks.main_only("final", lambda: self._write_final(progress, tokenizer), self.heartbeat)

    def _write_final(self, progress: Progress, tokenizer) -> int:
        """`final/`: adapter or full weights + tokenizer, loadable with transformers/peft, manifest last.

        1 if a stop ended its upload (the run is then preempted: the next start writes and uploads it again), else 0.
        """
        meta = {
            "method": self.cfg.model.method,
            "step": progress.step,
            "base_model": model_lib.base_model_path(self.cfg, self.run.root),
            "config": self.cfg.to_dict(),
        }
        run_id = self.lineage.run_id if self.lineage else None
        final = write_final(
            self.run, self.raw_model, tokenizer, meta, progress.step, self.world, run_id, self.store.signer
        )
        if self.remote is None:
            return 0
        self.wait_uploads(None)
        try:
            self.remote.upload_dir(final, FINAL_DIR, stop=lambda: self.stop_requested() or self.ranks.peer_stop())
            self.say(f"final/ uploaded to {self.cfg.checkpoint.remote}")
        except UploadInterrupted:
            self.say("final/ upload interrupted by the stop request; the next start uploads it")
            return 1
        except (StorageUnavailable, CredentialsRefused) as e:
            log.warning(
                "final/ not uploaded (%s); it is complete locally: `spot-trainer export %s --to %s` uploads it later",
                e,
                self.run.root,
                self.cfg.checkpoint.remote,
            )
        return 0

    def close(self) -> None:
        self._step_hook.remove()
        self.writer.close()
        if self.uploader is not None:
            self.uploader.close()
