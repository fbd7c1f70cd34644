"""The checkpoint component the training loop holds: resume, periodic and emergency saves, `final/`, uploads.

The loop calls `resume()` once, `maybe_save()` after every step, `emergency()` on an agreed stop and `finish()`
at the end; interval, retention, the background writer and the uploader live in here. Built with what it needs
(config, run dir, accelerator, model and optimizer, logs, a heartbeat callback); it reads nothing of its caller.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from collections.abc import Callable
from pathlib import Path

import torch

from trainer import model as model_lib
from trainer.checkpoint import model_state
from trainer.checkpoint.manifest import build_manifest, write_manifest
from trainer.checkpoint.optimizer_state import load_optimizer_state, optimizer_snapshot
from trainer.checkpoint.progress import Progress
from trainer.checkpoint.store import CheckpointStore, Snapshot, read_json, read_tensors
from trainer.checkpoint.writer import CheckpointWriter, out_of_space
from trainer.config.schema import Config
from trainer.errors import CheckpointError, ConfigError
from trainer.metrics import EventLog, MetricsLog
from trainer.remote.objects import StorageUnavailable
from trainer.remote.store import RemoteStore
from trainer.run_dir import FINAL_DIR, FINAL_META, METRICS_FILE, RunDir
from trainer.schedule import warmup_steps

log = logging.getLogger(__name__)


def open_remote(cfg: Config, is_main: bool) -> RemoteStore | None:
    """Rank 0's remote store, checked now: bad credentials or a missing bucket fail before any work (exit 2)."""
    if not (cfg.checkpoint.remote and is_main):
        return None
    from trainer.remote.store import open_store

    remote = open_store(cfg.checkpoint.remote, cfg.checkpoint.s3)
    remote.check(deadline=remote.deadline(60))  # a typo'd endpoint: within 60 s
    return remote


class Checkpointer:
    def __init__(self, cfg: Config, run: RunDir, acc, model, optimizer, *, remote: RemoteStore | None,
                 events: EventLog, metrics: MetricsLog, heartbeat: Callable[[], None], say: Callable[[str], None],
                 started: float | None = None):
        self.cfg, self.run, self.acc = cfg, run, acc
        self.model, self.optimizer = model, optimizer
        self.raw_model = acc.unwrap_model(model)
        self.rank, self.world, self.is_main = acc.process_index, acc.num_processes, acc.is_main_process
        self.remote, self.events, self.metrics, self.heartbeat, self.say = remote, events, metrics, heartbeat, say
        self.store = CheckpointStore(run.root)
        self.saved_step = -1  # the newest checkpoint this run wrote or resumed from
        self.disk_full_seen = False
        self.last_save_time = time.monotonic() if started is None else started  # every_minutes counts from here
        self.uploader = None
        if remote is not None:
            from trainer.remote.uploader import CheckpointUploader

            keep = cfg.checkpoint.remote_keep_last or cfg.checkpoint.keep_last
            self.uploader = CheckpointUploader(remote, keep_last=keep, on_uploaded=self._on_uploaded)
        self.writer = CheckpointWriter(self.store, self.rank, self._on_commit, self._on_failed)

    # ------------------------------------------------------------------ resume

    def resume(self, mode: str, fresh: Progress) -> Progress | None:
        """Load the checkpoint `mode` names (auto | never | a path) into model and optimizer; its Progress or None.

        `fresh` is this run's geometry at step 0; a checkpoint saved with another global batch or other data is
        refused with the setting that would resume it.
        """
        path = self._find(mode)
        progress = None
        if path is None:
            if self.is_main and mode == "never" and self.store.committed_steps():
                log.warning("--resume never: starting over; older checkpoints in %s stay until retention "
                            "removes them", self.store.root)
            self.metrics.rewind("", 0)
        else:
            progress = self._load(path, fresh)
        if self.uploader is not None:  # committed locally but not remotely (died mid-upload): upload now
            self.uploader.sync_pending(self.store.root)
        return progress

    def _find(self, mode: str) -> Path | None:
        if mode == "never":
            return None
        if mode != "auto":
            return Path(mode)  # verified by the CLI
        local = self.store.latest_valid(discard_broken=self.is_main)  # only rank 0 deletes: ranks share the dir
        local_step = local[0] if local else -1
        if self.cfg.checkpoint.remote:
            pulled = self._pull_remote(local_step)
            if pulled is not None:
                return pulled
        return local[1] if local else None

    def _pull_remote(self, local_step: int) -> Path | None:
        """Rank 0 pulls a newer remote checkpoint (fresh pod); the others wait and use it."""
        path = None
        if self.is_main:
            try:
                got = self.remote.pull_latest(self.store.root, newer_than=local_step)
            except StorageUnavailable as e:  # the remote is down: a local checkpoint is better than waiting
                log.warning("cannot reach %s (%s); resuming from local checkpoints", self.cfg.checkpoint.remote, e)
                got = None
            if got is not None:
                path = got[1]
                self.say(f"pulled checkpoint step {got[0]} from {self.cfg.checkpoint.remote}")
        self.acc.wait_for_everyone()
        if not self.is_main:
            local = self.store.latest_valid(deep=False)
            path = local[1] if local and local[0] > local_step else None
        return path

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
        return fresh.resumed(saved)

    def _check_compatible(self, path: Path, saved: Progress, fresh: Progress) -> None:
        gb = saved.global_batch
        if gb is not None and gb != fresh.global_batch:
            raise ConfigError(f"{path}: saved with global batch {gb}, this run has {fresh.global_batch} "
                              f"(micro {fresh.micro_batch_size} x accum {fresh.grad_accum} x "
                              f"{fresh.world_size} processes); set train.global_batch_size={gb} to resume it")
        if saved.n_rows not in (None, fresh.n_rows):
            raise ConfigError(f"{path}: saved with {saved.n_rows} training rows, the data now has "
                              f"{fresh.n_rows}; resume with the same data or use --resume never")

    # ------------------------------------------------------------------ saving

    def due(self, step: int) -> bool:
        """A periodic checkpoint is due after `step` (checkpoint.every_steps / every_minutes)."""
        c = self.cfg.checkpoint
        if c.every_steps and step % c.every_steps == 0:
            return True
        return bool(c.every_minutes) and time.monotonic() - self.last_save_time >= 60 * c.every_minutes

    def maybe_save(self, progress: Progress, *, last: bool = False) -> bool:
        """Save after this step if one is due or it is the last step; True if it did."""
        if not (last or self.due(progress.step)):
            return False
        self.save(progress, "final" if last else "periodic")
        return True

    def save(self, progress: Progress, kind: str = "periodic", sync: bool = False, rng: tuple | None = None) -> None:
        # Decided from this run's own history, not from the disk: rank 0 commits in the background, so ranks
        # reading committed_steps() could disagree, and rank 0 would wait for a marker that never comes.
        if progress.step == self.saved_step:
            return
        self.saved_step = progress.step
        t0 = time.monotonic()
        # one snapshot in RAM at a time: if the previous checkpoint is still being written, wait for it (every
        # rank does, so they stay in step) instead of queueing copies of the whole state
        self.writer.wait()
        waited = time.monotonic() - t0
        if waited > 1.0 and kind == "periodic":
            log.warning("checkpoint at step %d waited %.1f s for the previous one to finish writing; checkpoints "
                        "come faster than the disk takes them: raise checkpoint.every_steps/every_minutes",
                        progress.step, waited)
        snap = self._snapshot(progress, kind, rng, copy=not sync)
        snap.extra["stall_s"] = round(time.monotonic() - t0, 4)
        if waited > 0.05:
            snap.extra["waited_for_previous_s"] = round(waited, 3)
        (self.writer.write_now if sync else self.writer.submit)(snap)
        self.last_save_time = time.monotonic()

    def emergency(self, progress: Progress, rng: tuple) -> bool:
        """Commit the state at the last completed step now; False if the disk is full."""
        try:
            self.save(progress, "emergency", sync=True, rng=rng)
            self.writer.wait()
        except (CheckpointError, OSError) as e:
            if not out_of_space(e):
                raise
            if self.is_main:
                self.store.abandon(Snapshot(step=progress.step, rank=self.rank, world_size=self.world))
            self.events.emit("checkpoint_failed", step=progress.step, kind="emergency", error=str(e)[:300],
                             pruned=[])
            return False
        return True

    def _snapshot(self, progress: Progress, kind: str, rng: tuple | None, copy: bool) -> Snapshot:
        """copy=False (a synchronous write): the live tensors, not copies; nothing changes them until it is done."""
        snap = Snapshot(step=progress.step, rank=self.rank, world_size=self.world, kind=kind)
        tensors, meta = optimizer_snapshot(self.acc, self.model, self.optimizer, copy)  # every rank: ZeRO partitions
        snap.tensors.update(tensors)
        snap.json.update(meta)
        snap.json[f"rng-rank{self.rank:05d}.json"] = model_state.rng_json(rng or model_state.capture_rng())
        if self.is_main:
            t = self.cfg.train
            snap.tensors["model.safetensors"] = model_state.trainable_state(self.raw_model, copy)
            snap.json["trainer_state.json"] = progress.to_json()
            snap.json["scheduler.json"] = {
                "kind": t.lr_scheduler, "step": progress.step, "total_steps": progress.total_steps,
                "warmup_steps": warmup_steps(progress.total_steps, t.warmup_steps, t.warmup_ratio), "base_lr": t.lr}
            snap.text["config.yaml"] = self.cfg.to_yaml()
            snap.text[METRICS_FILE] = self.metrics.text()
        return snap

    # ------------------------------------------------------------------ the writer's and uploader's callbacks

    def _on_commit(self, snap: Snapshot, path: Path, seconds: float) -> None:
        """Rank 0, writer thread: log, hand to the uploader, apply retention."""
        stall = snap.extra.get("stall_s")
        self.events.emit("checkpoint", step=snap.step, kind=snap.kind, stall_s=stall, commit_s=round(seconds, 3))
        if self.uploader is not None:
            self.uploader.submit(path)
        self.store.prune(1 if self.disk_full_seen else self.cfg.checkpoint.keep_last, protect=self._uploading())

    def _on_failed(self, snap: Snapshot, err: BaseException) -> None:
        """Writer thread, every rank: a checkpoint did not fit on the disk. Training goes on; rank 0 keeps only
        the newest committed checkpoint (and those still uploading) to make room for the next one."""
        if not self.is_main:
            return
        self.disk_full_seen = True  # from now on keep only the newest: 2 on the disk at most, while writing
        freed = self.store.prune(1, protect=self._uploading())
        newest = self.store.committed_steps()
        self.events.emit("checkpoint_failed", step=snap.step, kind=snap.kind, error=str(err)[:300], pruned=freed)
        log.warning("checkpoint at step %d not written: the disk is full (%s); training goes on, the newest "
                    "committed checkpoint is %s%s, and only the newest is kept from now on; free space or lower "
                    "checkpoint.keep_last", snap.step, str(err).splitlines()[0][:160],
                    f"step {newest[-1]}" if newest else "none",
                    f" (deleted older checkpoints {freed} to make room)" if freed else "")

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
            self.heartbeat()
            if end is not None and time.monotonic() >= end:
                break
        if not done:
            log.warning("upload not finished within %s s; the checkpoint is committed locally and will be "
                        "uploaded on the next start", None if timeout is None else round(timeout, 1))

    def finish(self, progress: Progress, tokenizer) -> None:
        """After the last step: wait for the writes, write `final/` (rank 0), upload it with the newest checkpoint."""
        self.writer.wait()
        if self.is_main:
            self._write_final(progress, tokenizer)
        self.acc.wait_for_everyone()

    def _write_final(self, progress: Progress, tokenizer) -> None:
        """`final/`: adapter or full weights + tokenizer, loadable with transformers/peft, manifest last."""
        final = self.run.final
        tmp = self.run.root / ".final.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        self.raw_model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        (tmp / FINAL_META).write_text(json.dumps({
            "method": self.cfg.model.method, "step": progress.step,
            "base_model": model_lib.base_model_path(self.cfg, self.run.root),
            "config": self.cfg.to_dict()}, indent=1))
        write_manifest(tmp, build_manifest(tmp, progress.step, world_size=self.world, kind="final"))
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        if self.remote is not None:
            self.wait_uploads(None)
            try:
                self.remote.upload_dir(final, FINAL_DIR)
                self.say(f"final/ uploaded to {self.cfg.checkpoint.remote}")
            except StorageUnavailable as e:
                log.warning("final/ not uploaded (%s); it is complete locally: `spot-trainer export %s --to %s` "
                            "uploads it later", e, self.run.root, self.cfg.checkpoint.remote)

    def close(self) -> None:
        self.writer.close()
        if self.uploader is not None:
            self.uploader.close()
