"""The checkpoint half of the training run: resume (local or remote), snapshots, the background writer's
callbacks, uploads and `final/`. Mixed into `loop.Trainer`, whose setup() creates the attributes used here
(cfg, acc, store, rank, world, model, optimizer, metrics, events, pos, ...).
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path

import torch

from . import batches, model as model_lib, train_state
from .checkpoint import CheckpointWriter, Snapshot, read_json, read_tensors
from .errors import ConfigError
from .optimizer_state import load_optimizer_state, optimizer_snapshot

log = logging.getLogger(__name__)


class CheckpointingMixin:
    def _setup_checkpointing(self) -> None:
        self.writer = CheckpointWriter(self.store, self.rank, self._on_commit, self._on_checkpoint_failed)
        self.disk_full_seen = False
        self.last_ckpt_time = time.monotonic()
        remote = self.cfg.checkpoint.remote
        if remote and self.is_main:
            from .uploader import CheckpointUploader
            from .storage import open_store

            self.remote = open_store(remote, self.cfg.checkpoint.s3)
            # bad credentials or a missing bucket: one line, exit 2, before any work (a typo'd endpoint: within 60 s)
            self.remote.check(deadline=self.remote.deadline(60))
            keep = self.cfg.checkpoint.remote_keep_last or self.cfg.checkpoint.keep_last
            self.uploader = CheckpointUploader(self.remote, keep_last=keep, on_uploaded=self._on_uploaded)
        else:
            self.remote = None

    # ------------------------------------------------------------------ resume

    def _find_resume(self) -> Path | None:
        if self.resume == "never":
            return None
        if self.resume != "auto":
            return Path(self.resume)  # verified by the CLI
        local = self.store.latest_valid(discard_broken=self.is_main)  # only rank 0 deletes: ranks share the dir
        local_step = local[0] if local else -1
        if self.remote is not None or (self.cfg.checkpoint.remote and not self.is_main):
            pulled = self._pull_remote(local_step)
            if pulled is not None:
                return pulled
        return local[1] if local else None

    def _pull_remote(self, local_step: int) -> Path | None:
        """Rank 0 pulls a newer remote checkpoint (fresh pod); the others wait and use it."""
        path = None
        if self.is_main:
            from .storage import StorageUnavailable

            try:
                got = self.remote.pull_latest(self.store.root, newer_than=local_step)
            except StorageUnavailable as e:  # the remote is down: a local checkpoint is better than waiting
                log.warning("cannot reach %s (%s); resuming from local checkpoints", self.cfg.checkpoint.remote, e)
                got = None
            if got is not None:
                path = got[1]
                self.console_line(f"pulled checkpoint step {got[0]} from {self.cfg.checkpoint.remote}")
        self.acc.wait_for_everyone()
        if not self.is_main:
            local = self.store.latest_valid(deep=False)
            path = local[1] if local and local[0] > local_step else None
        return path

    def _resume(self) -> None:
        path = self._find_resume()
        if path is None:
            if self.is_main and self.resume == "never" and self.store.committed_steps():
                log.warning("--resume never: starting over; older checkpoints in %s stay until retention "
                            "removes them", self.store.root)
            self.metrics.rewind("", 0)
            return
        state = read_json(path, "trainer_state.json")
        self._check_compatible(path, state)
        train_state.load_trainable_state(self.raw_model, read_tensors(path, "model.safetensors"), str(path))
        # any layout (one file, or per-rank ZeRO partitions) onto any world size, by parameter name
        load_optimizer_state(self.acc, self.model, self.optimizer, path)
        rng_file = path / f"rng-rank{self.rank:05d}.json"
        if state["world_size"] == self.world and rng_file.exists():
            train_state.set_rng_state(read_json(path, rng_file.name))
        else:  # another world size: fresh per-rank streams, derived from the step so it is still reproducible
            torch.manual_seed(self.cfg.train.seed + 1000 * state["step"] + self.rank)
        self.step = state["step"]
        self.pos = batches.Position(state["epoch"], state["epoch_offset"])
        self.samples_seen, self.tokens_seen = state["samples_seen"], state["tokens_seen"]
        saved = (path / "metrics.jsonl").read_text() if (path / "metrics.jsonl").exists() else None
        self.metrics.rewind(saved, self.step)
        self.saved_step = self.step
        self.console_line(f"resumed from {path} (step {self.step}/{self.total_steps})")

    def _check_compatible(self, path: Path, state: dict) -> None:
        gb = state.get("global_batch")
        if gb is not None and gb != self.plan.global_batch:
            raise ConfigError(f"{path}: saved with global batch {gb}, this run has {self.plan.global_batch} "
                              f"(micro {self.cfg.train.micro_batch_size} x accum {self.grad_accum} x "
                              f"{self.world} processes); set train.global_batch_size={gb} to resume it")
        if state.get("n_rows") not in (None, len(self.rows)):
            raise ConfigError(f"{path}: saved with {state['n_rows']} training rows, the data now has "
                              f"{len(self.rows)}; resume with the same data or use --resume never")

    # ------------------------------------------------------------------ checkpoints

    def _snapshot(self, kind: str, rng: tuple | None = None, copy: bool = True) -> Snapshot:
        """copy=False (a synchronous write): the live tensors, not copies; nothing changes them until it is done."""
        snap = Snapshot(step=self.step, rank=self.rank, world_size=self.world, kind=kind)
        tensors, meta = optimizer_snapshot(self.acc, self.model, self.optimizer, copy)  # every rank: ZeRO partitions
        snap.tensors.update(tensors)
        snap.json.update(meta)
        snap.json[f"rng-rank{self.rank:05d}.json"] = train_state.rng_json(rng or train_state.capture_rng())
        if self.is_main:
            snap.tensors["model.safetensors"] = train_state.trainable_state(self.raw_model, copy)
            snap.json["trainer_state.json"] = {
                "step": self.step, "epoch": self.pos.epoch, "epoch_offset": self.pos.offset,
                "samples_seen": self.samples_seen, "tokens_seen": self.tokens_seen, "world_size": self.world,
                "micro_batch_size": self.cfg.train.micro_batch_size, "grad_accum": self.grad_accum,
                "global_batch": self.plan.global_batch, "n_rows": len(self.rows), "total_steps": self.total_steps,
                "method": self.cfg.model.method}
            snap.json["scheduler.json"] = {"kind": self.cfg.train.lr_scheduler, "step": self.step,
                                           "total_steps": self.total_steps, "warmup_steps": self.warmup,
                                           "base_lr": self.cfg.train.lr}
            snap.text["config.yaml"] = self.cfg.to_yaml()
            snap.text["metrics.jsonl"] = self.metrics.text()
        return snap

    def _on_commit(self, snap: Snapshot, path: Path, seconds: float) -> None:
        """Rank 0, writer thread: log, hand to the uploader, apply retention."""
        stall = snap.extra.get("stall_s")
        self.events.emit("checkpoint", step=snap.step, kind=snap.kind, stall_s=stall, commit_s=round(seconds, 3))
        if self.uploader is not None:
            self.uploader.submit(path)
        self.store.prune(1 if self.disk_full_seen else self.cfg.checkpoint.keep_last, protect=self._uploading())

    def _on_checkpoint_failed(self, snap: Snapshot, err: BaseException) -> None:
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

    def _checkpoint_due(self) -> bool:
        c = self.cfg.checkpoint
        if c.every_steps and self.step % c.every_steps == 0:
            return True
        return bool(c.every_minutes) and time.monotonic() - self.last_ckpt_time >= 60 * c.every_minutes

    def save_checkpoint(self, kind: str = "periodic", sync: bool = False, rng: tuple | None = None) -> None:
        # Decided from this run's own history, not from the disk: rank 0 commits in the background, so ranks
        # reading committed_steps() could disagree, and rank 0 would wait for a marker that never comes.
        if self.step == self.saved_step:
            return
        self.saved_step = self.step
        t0 = time.monotonic()
        # one snapshot in RAM at a time: if the previous checkpoint is still being written, wait for it (every
        # rank does, so they stay in step) instead of queueing copies of the whole state
        self.writer.wait()
        waited = time.monotonic() - t0
        if waited > 1.0 and kind == "periodic":
            log.warning("checkpoint at step %d waited %.1f s for the previous one to finish writing; checkpoints "
                        "come faster than the disk takes them: raise checkpoint.every_steps/every_minutes",
                        self.step, waited)
        snap = self._snapshot(kind, rng, copy=not sync)
        snap.extra["stall_s"] = round(time.monotonic() - t0, 4)
        if waited > 0.05:
            snap.extra["waited_for_previous_s"] = round(waited, 3)
        (self.writer.write_now if sync else self.writer.submit)(snap)
        self.last_ckpt_time = time.monotonic()

    # ------------------------------------------------------------------ the loop

    def _wait_uploads(self, timeout: float | None) -> None:
        if self.uploader is None:
            return
        # wait in slices, touching the heartbeat, so the supervisor never takes a long upload for a hang
        end = None if timeout is None else time.monotonic() + timeout
        done = False
        while not done:
            left = 30.0 if end is None else min(30.0, max(0.0, end - time.monotonic()))
            done = self.uploader.wait(left)
            self._heartbeat()
            if end is not None and time.monotonic() >= end:
                break
        if not done:
            log.warning("upload not finished within %s s; the checkpoint is committed locally and will be "
                        "uploaded on the next start", None if timeout is None else round(timeout, 1))

    def _write_final(self) -> None:
        """`final/`: adapter or full weights + tokenizer, loadable with transformers/peft, manifest last."""
        if not self.is_main:
            self.acc.wait_for_everyone()
            return
        import json
        import shutil

        from .manifest import build_manifest, write_manifest

        final = self.output_dir / "final"
        tmp = self.output_dir / ".final.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        self.raw_model.save_pretrained(tmp, safe_serialization=True)
        self.tokenizer.save_pretrained(tmp)
        (tmp / "spot_trainer.json").write_text(json.dumps({
            "method": self.cfg.model.method, "step": self.step,
            "base_model": model_lib.base_model_path(self.cfg, self.output_dir),
            "config": self.cfg.to_dict()}, indent=1))
        write_manifest(tmp, build_manifest(tmp, self.step, world_size=self.world, kind="final"))
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        if self.remote is not None:
            from .storage import StorageUnavailable

            self._wait_uploads(None)
            try:
                self.remote.upload_dir(final, "final")
                self.console_line(f"final/ uploaded to {self.cfg.checkpoint.remote}")
            except StorageUnavailable as e:
                log.warning("final/ not uploaded (%s); it is complete locally: `spot-trainer export %s --to %s` "
                            "uploads it later", e, self.output_dir, self.cfg.checkpoint.remote)
        self.acc.wait_for_everyone()

    # ------------------------------------------------------------------ cleanup
