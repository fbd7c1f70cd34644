"""The training run: setup() -> train() -> cleanup(), on Accelerate.

Exactness: the sample order is a function of (seed, epoch), the LR a function of the step, and every other
piece of state (weights, optimizer, RNG, data position) is in the checkpoint, so a resumed run computes
bitwise the same updates as an uninterrupted one.
"""

from __future__ import annotations

import os
import resource
import time
from pathlib import Path

import torch

from . import batches, evaluate, model as model_lib, train_state
from .checkpoint import CheckpointStore, Snapshot, out_of_space
from .config import Config
from .data import prepare_data
from .errors import EXIT_OK, EXIT_PREEMPTED, CheckpointError, ConfigError
from .loop_checkpoints import CheckpointingMixin
from .metrics import Console, EventLog, MetricsLog
from .preemption import StopSignal, agreed_stop
from .schedule import lr_at, warmup_steps


class Trainer(CheckpointingMixin):
    def __init__(self, cfg: Config, resume: str = "auto"):
        self.cfg, self.resume = cfg, resume
        self.output_dir = Path(cfg.output_dir)
        self.step = 0  # optimizer steps completed
        self.saved_step = -1  # step of the newest checkpoint this run wrote or resumed from
        self.pos = batches.Position()
        self.samples_seen = self.tokens_seen = 0
        self.stop = StopSignal()
        self.uploader = None
        self.watcher = None

    # ------------------------------------------------------------------ setup

    def setup(self) -> None:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()  # our own progress line is enough; keeps logs one line per event
        self._setup_distributed()
        self._setup_output()
        self._setup_checkpointing()  # first: a remote with bad credentials fails before any work
        self._setup_data()
        self._setup_model()
        self._setup_optimizer()
        self._resume()
        if self.uploader is not None:  # committed locally but not remotely (died mid-upload): upload now
            self.uploader.sync_pending(self.store.root)
        self._setup_stop()

    def _setup_distributed(self) -> None:
        from .distributed import make_accelerator, resolve_grad_accum, world_size_from_env

        self.grad_accum = resolve_grad_accum(self.cfg, world_size_from_env())
        self.acc = make_accelerator(self.cfg, self.grad_accum)
        self.rank, self.world = self.acc.process_index, self.acc.num_processes
        self.is_main = self.acc.is_main_process
        self.device = self.acc.device
        torch.manual_seed(self.cfg.train.seed)

    def _setup_output(self) -> None:
        self.output_dir.mkdir(parents=True, exist_ok=True)
        self.store = CheckpointStore(self.output_dir)
        if self.is_main:
            self.store.clean_stale()
        self.metrics = MetricsLog(self.output_dir / "metrics.jsonl", enabled=self.is_main)
        self.events = EventLog(self.output_dir / "events.jsonl", "trainer", enabled=self.is_main)
        self.acc.wait_for_everyone()

    def _setup_data(self) -> None:
        self.tokenizer = model_lib.load_tokenizer(self.cfg)
        cache = self.output_dir / "cache"
        if self.is_main:  # rank 0 tokenizes and caches; the others then read the cache
            self.data = prepare_data(self.cfg, self.tokenizer, cache)
        self.acc.wait_for_everyone()
        if not self.is_main:
            self.data = prepare_data(self.cfg, self.tokenizer, cache)
        rows = self.data.train
        if self.cfg.data.packing:
            rows = batches.pack_rows(rows, self.cfg.data.max_length, self.cfg.train.seed)
        self.rows = rows
        t = self.cfg.train
        self.plan = batches.BatchPlan(len(rows), t.seed, t.micro_batch_size, self.grad_accum, self.world)
        if self.plan.steps_per_epoch == 0:
            raise ConfigError(f"data.path {self.cfg.data.path}: {len(rows)} rows is fewer than one global batch "
                              f"({self.plan.global_batch}); lower train.micro_batch_size or grad_accum")
        self.total_steps = t.max_steps or max(1, int(t.epochs * self.plan.steps_per_epoch))
        self.warmup = warmup_steps(self.total_steps, t.warmup_steps, t.warmup_ratio)

    def _setup_model(self) -> None:
        torch.manual_seed(self.cfg.train.seed)
        if self.is_main and model_lib.is_builtin(self.cfg):
            model_lib.materialize_builtin(self.cfg, self.tokenizer, self.output_dir)
        self.acc.wait_for_everyone()
        self.model = model_lib.build_model(self.cfg, self.tokenizer, self.device, self.output_dir)
        # the same init on every rank (above), then a stream of its own for dropout on each rank
        torch.manual_seed(self.cfg.train.seed + 7919 * self.rank)

    def _make_optimizer(self, params):
        t = self.cfg.train
        kw = dict(lr=t.lr, betas=(t.adam_beta1, t.adam_beta2), eps=t.adam_eps, weight_decay=t.weight_decay)
        if t.optimizer == "adamw":
            return torch.optim.AdamW(params, fused=self.device.type == "cuda" or None, **kw)
        import bitsandbytes as bnb

        cls = {"adamw_8bit": bnb.optim.AdamW8bit, "paged_adamw_8bit": bnb.optim.PagedAdamW8bit,
               "paged_adamw": bnb.optim.PagedAdamW}[t.optimizer]
        return cls(params, **kw)

    def _setup_optimizer(self) -> None:
        params = [p for _, p in model_lib.trainable_parameters(self.model)]
        self.optimizer = self._make_optimizer(params)
        self.model, self.optimizer = self.acc.prepare(self.model, self.optimizer)
        self.raw_model = self.acc.unwrap_model(self.model)

    def _setup_stop(self) -> None:
        self.stop.install()
        if self.acc.local_process_index == 0 and self.cfg.preemption.watch != "none":
            from .cloud_notice import NoticeWatcher

            self.watcher = NoticeWatcher(self.stop, mode=self.cfg.preemption.watch,
                                         poll_seconds=self.cfg.preemption.poll_seconds)
            self.watcher.start()

    def console_line(self, text: str) -> None:
        if self.is_main:
            print(text, flush=True)

    def _reduce(self, values: list[float]) -> list[float]:
        if self.world == 1:
            return values
        t = torch.tensor(values, dtype=torch.float64 if self.device.type == "cpu" else torch.float32,
                         device=self.device)
        torch.distributed.all_reduce(t)
        return t.tolist()

    def _evaluate(self) -> dict:
        out = {}
        if self.is_main and (self.data.eval or self.data.eval_prompts):
            e = self.cfg.eval
            cuda = [torch.cuda.current_device()] if self.device.type == "cuda" else []
            with torch.random.fork_rng(devices=cuda):
                out["eval_loss"] = evaluate.eval_loss(self.raw_model, self.data.eval, self.tokenizer.pad_token_id,
                                                      self.cfg.train.micro_batch_size, self.device)
                if e.generate and self.data.eval_prompts:
                    out["eval_exact_match"] = evaluate.exact_match(
                        self.raw_model, self.tokenizer, self.data.eval_prompts, e.max_new_tokens,
                        max(self.cfg.train.micro_batch_size, 32), self.device)
            self.metrics.write(step=self.step, **out)
            em = out.get("eval_exact_match")
            self.console_line(f"eval step {self.step}: loss {out['eval_loss']:.4f}"
                              + (f", exact match {em:.1%}" if em is not None else ""))
        self.acc.wait_for_everyone()
        return out

    def _heartbeat(self) -> None:
        if self.is_main:
            # replaced atomically, so the supervisor never reads it half written
            tmp = self.output_dir / ".heartbeat.tmp"
            tmp.write_text(f"{self.step}\n")
            os.replace(tmp, self.output_dir / "heartbeat")

    def train(self) -> int:
        """Run to the end (exit 0) or to an agreed stop (emergency checkpoint, exit 75)."""
        cfg, t = self.cfg, self.cfg.train
        self.events.emit("train_start", step=self.step, world_size=self.world, total_steps=self.total_steps)
        if self.step == 0 and cfg.eval.before_training:
            self.eval_before = self._evaluate()
        console = Console(self.is_main, self.total_steps, self.step)
        self._heartbeat()
        params = [p for _, p in model_lib.trainable_parameters(self.raw_model)]
        pad = self.tokenizer.pad_token_id
        self.model.train()  # from_pretrained returns eval mode: dropout and checkpointing would be off
        while self.step < self.total_steps:
            rng_at_step_start = train_state.capture_rng()  # raw copies; made JSON only if a stop needs them
            t0 = time.monotonic()
            micro_rows, next_pos = self.plan.step_rows(self.pos, self.rank)
            micro = [batches.collate([self.rows[i] for i in mb], pad) for mb in micro_rows]
            # real tokens = the rows' lengths: exact for packed rows too, and when the pad id is also eos
            n_targets, n_tokens = self._reduce([sum(batches.count_targets(b["labels"]) for b in micro),
                                                sum(len(self.rows[i]["input_ids"]) for mb in micro_rows for i in mb)])
            lr = lr_at(self.step, self.total_steps, t.lr, t.lr_scheduler, self.warmup)
            for g in self.optimizer.param_groups:
                g["lr"] = lr
            loss_sum = 0.0
            stopped = False
            for m, batch in enumerate(micro):
                if agreed_stop(self.stop.requested, self.acc):
                    stopped = True
                    break
                batch = {k: v.to(self.device) for k, v in batch.items()}
                last = m == len(micro) - 1
                ctx = self.acc.no_sync(self.model) if (self.world > 1 and not last) else _null()
                # under DeepSpeed the engine steps inside the last micro-batch's backward
                self.acc.sync_gradients = last
                with ctx, self.acc.autocast():
                    out = self.model(**batch, num_items_in_batch=max(1, int(n_targets)), use_cache=False)
                    # the loss is sum / targets of the whole step; DDP averages over ranks and backward()
                    # divides by grad_accum (accelerate, or the DeepSpeed engine): undo both
                    loss = out.loss * (self.world * self.grad_accum)
                    micro_loss = out.loss.detach()
                    del out  # the fp32 logits (tokens x vocab) need not live through backward
                self.acc.backward(loss)
                loss_sum += float(micro_loss)
            if stopped:
                self.optimizer.zero_grad(set_to_none=True)
                return self._preempted(rng_at_step_start, console)
            grad_norm = self.acc.clip_grad_norm_(params, t.max_grad_norm or float("inf"))
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
            self.step += 1
            self.pos = next_pos
            self.samples_seen += self.plan.global_batch
            self.tokens_seen += int(n_tokens)
            (loss,) = self._reduce([loss_sum])
            dt = time.monotonic() - t0
            rec = dict(step=self.step, loss=round(loss, 6), lr=lr, grad_norm=round(float(grad_norm), 6),
                       tokens=int(n_tokens), tokens_per_second=round(n_tokens / dt, 1), step_time_s=round(dt, 4),
                       memory_gb=_memory_gb(self.device),
                       epoch=round(self.pos.epoch + self.pos.offset / len(self.rows), 4),
                       samples_seen=self.samples_seen)
            self.metrics.write(**rec)
            self._heartbeat()
            console.advance(1, loss=f"{loss:.3f}")
            if self.step % t.log_every_steps == 0 or self.step == self.total_steps:
                console.line(f"step {self.step}/{self.total_steps} loss {loss:.4f} lr {lr:.2e} "
                             f"grad_norm {float(grad_norm):.3f} {rec['tokens_per_second']:.0f} tok/s")
            if cfg.eval.every_steps and self.step % cfg.eval.every_steps == 0 and self.step < self.total_steps:
                self._evaluate()
            if self._checkpoint_due() or self.step == self.total_steps:
                self.save_checkpoint("periodic" if self.step < self.total_steps else "final")
            elif self.stop.checkpoint_soon:  # e.g. an AWS rebalance recommendation: save now, keep training
                self.save_checkpoint("periodic")
                self.stop.checkpoint_taken()
        console.close()
        self.eval_after = self._evaluate()
        before = getattr(self, "eval_before", None)
        if before and self.eval_after and before.get("eval_loss") is not None:
            em = ("" if before.get("eval_exact_match") is None else
                  f", exact match {before['eval_exact_match']:.1%} -> {self.eval_after['eval_exact_match']:.1%}")
            self.console_line(f"eval before -> after training: loss {before['eval_loss']:.4f} -> "
                              f"{self.eval_after['eval_loss']:.4f}{em}")
        self.writer.wait()
        self._write_final()
        self._wait_uploads(None)
        self.events.emit("train_end", step=self.step, status="done")
        return EXIT_OK

    def _preempted(self, rng: tuple, console: Console) -> int:
        """Agreed stop: commit the state at the last completed step locally, then upload with the grace left."""
        console.close()
        t0 = time.monotonic()
        self.console_line(f"stop requested ({self.stop.reason}): emergency checkpoint at step {self.step}")
        try:
            self.save_checkpoint("emergency", sync=True, rng=rng)
            self.writer.wait()
        except (CheckpointError, OSError) as e:
            if not out_of_space(e):
                raise
            if self.is_main:
                self.store.abandon(Snapshot(step=self.step, rank=self.rank, world_size=self.world))
            newest = self.store.committed_steps()
            self.events.emit("checkpoint_failed", step=self.step, kind="emergency", error=str(e)[:300], pruned=[])
            self.events.emit("train_end", step=self.step, status="preempted")
            self.console_line(f"emergency checkpoint at step {self.step} not written: the disk is full; the run "
                              f"resumes from {f'step {newest[-1]}' if newest else 'the start'}; exiting "
                              f"{EXIT_PREEMPTED} (preempted, resumable)")
            return EXIT_PREEMPTED
        commit_s = time.monotonic() - t0
        self.events.emit("preempt", step=self.step, reason=self.stop.reason, stop_to_commit_s=round(commit_s, 3))
        self._wait_uploads(self.stop.grace_left(self.cfg.preemption.grace_seconds))
        self.events.emit("train_end", step=self.step, status="preempted")
        self.console_line(f"checkpoint step {self.step} committed in {commit_s:.2f} s; exiting {EXIT_PREEMPTED} "
                          f"(preempted, resumable)")
        return EXIT_PREEMPTED

    def cleanup(self) -> None:
        self.stop.uninstall()
        if self.watcher is not None:
            self.watcher.close()
        if getattr(self, "writer", None) is not None:
            self.writer.close()
        if self.uploader is not None:
            self.uploader.close()
        if getattr(self, "acc", None) is not None:
            from .distributed import release

            # drop the model first: a gloo worker freeing DDP work at interpreter exit can SIGABRT
            self.model = self.raw_model = self.optimizer = None
            release(self.acc)


class _null:
    def __enter__(self):
        return self

    def __exit__(self, *a):
        return False


def _memory_gb(device: torch.device) -> float:
    if device.type == "cuda":
        return round(torch.cuda.max_memory_allocated(device) / 2**30, 3)
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 3)  # Linux: KiB


def run_training(cfg: Config, resume: str = "auto") -> int:
    trainer = Trainer(cfg, resume)
    try:
        trainer.setup()
        return trainer.train()
    finally:
        trainer.cleanup()
