"""The training run: setup() -> train() -> cleanup(), on Accelerate.

Exactness: the sample order is a function of (seed, epoch), the LR a function of the step, and every other
piece of state (weights, optimizer, RNG, data position) is in the checkpoint, so a resumed run computes
bitwise the same updates as an uninterrupted one.
"""

from __future__ import annotations

import resource
import time
from contextlib import nullcontext
from dataclasses import dataclass

import torch

from trainer import batches, evaluate
from trainer import model as model_lib
from trainer.checkpoint import model_state
from trainer.checkpoint.checkpointer import Checkpointer, open_remote
from trainer.checkpoint.progress import Progress
from trainer.checkpoint.resume import guard_start_over
from trainer.checkpoint.store import CheckpointStore
from trainer.config.schema import Config
from trainer.data import prepare_data
from trainer.errors import EXIT_OK, EXIT_PREEMPTED, ConfigError, SpotTrainerError
from trainer.liveness import Heartbeat, Ranks
from trainer.metrics import Console, EventLog, MetricsLog
from trainer.model_mirror import ModelMirror, config_only_in_mirror, model_config_for_load
from trainer.run_dir import NOTICES_FILE, RunDir
from trainer.run_lock import RunLock
from trainer.schedule import lr_at, warmup_steps
from trainer.spot.notices import PROVIDERS, NoticeMemory
from trainer.spot.stop import Decision, StopSignal, agree
from trainer.startup import StartupTimer
from trainer.trackers import Trackers


@dataclass
class StepResult:
    """What one optimizer step measured (summed over ranks)."""

    loss: float
    lr: float
    grad_norm: float
    tokens: int
    seconds: float


class Trainer:
    def __init__(self, cfg: Config, resume: str = "auto", archive_existing: bool = False):
        self.cfg, self.resume, self.archive_existing = cfg, resume, archive_existing
        self.startup = StartupTimer()  # this process's start-up phases: the `startup` event after the first step
        self.run = RunDir(cfg.output_dir)
        self.stop = StopSignal()
        self.progress = Progress()
        self.checkpointer: Checkpointer | None = None
        self.watcher = None
        self.notice_memory = NoticeMemory(self.run.root / NOTICES_FILE)
        self.acc = None
        self.lock: RunLock | None = None
        self.trackers: Trackers | None = None
        self.mirror: ModelMirror | None = None  # model.mirror, on the rank that writes the output dir
        self.model_cfg = cfg  # what the tokenizer and model load from (the mirror's copy on a fresh pod)
        self._checkpoint_agreed = False  # a vote during this step asked for a checkpoint after it
        self._stepping = False  # inside the optimizer step: weights or moments partly updated
        self._notices_saved_at: int | None = None  # the step whose checkpoint the voted-for notices wait for
        self._notice_ids: list[str] = []  # notices this process voted a checkpoint for, remembered once it is saved

    # ------------------------------------------------------------------ setup

    def setup(self) -> None:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()  # our own progress line is enough; keeps logs one line per event
        self.startup.imports_done()
        with self.startup.phase("device_init"):  # the Accelerator; on a GPU, CUDA's initialisation
            self._setup_distributed()
        with self.startup.phase("preflight"):  # before anything is loaded or written: a run that cannot fit says so
            self._check_memory()
        with self.startup.phase("output"):
            self._setup_output()
            started = time.monotonic()  # checkpoint.every_minutes counts from here
            # first: a remote with bad credentials fails before any work (with own output dirs, every node uploads)
            remote = self._open_remote()
            if self.resume == "never" and self.is_main:  # starting over is explicit: refused over committed work
                guard_start_over(CheckpointStore(self.run.root), remote, self.archive_existing, self.say)
        with self.startup.phase("mirror"):
            self._setup_mirror(remote)
        with self.startup.phase("data"):
            self._setup_data()
            self._check_same_run()
        with self.startup.phase("model_load"):
            self._setup_model()
        if self.mirror is not None and self.is_main:
            self.mirror.start_upload()  # in the background, if the bucket has no copy yet
        with self.startup.phase("optimizer"):
            self._setup_optimizer()
        self.checkpointer = Checkpointer(
            self.cfg,
            self.run,
            self.acc,
            self.model,
            self.optimizer,
            remote=remote,
            events=self.events,
            metrics=self.metrics,
            heartbeat=self.heartbeat,
            say=self.say,
            ranks=self.ranks,
            stop_requested=lambda: self.stop.requested,
            started=started,
        )
        fresh = Progress(
            world_size=self.world,
            micro_batch_size=self.cfg.train.micro_batch_size,
            grad_accum=self.grad_accum,
            global_batch=self.plan.global_batch,
            n_rows=len(self.rows),
            total_steps=self.total_steps,
            method=self.cfg.model.method,
        )
        if self.cfg.model.mirror:  # the checkpoint pulled beside the base model is committed before resume() looks
            wait = self.mirror.wait_prefetch if self.mirror is not None else lambda: None
            self.ranks.main_only("prefetch", wait, self.heartbeat)
        with self.startup.phase("resume"):
            resumed = self.checkpointer.resume(self.resume, fresh)
        self.progress = resumed or fresh
        self.startup.resumed_from = resumed.step if resumed is not None else None
        # rank 0; after the resume, which rewound metrics.jsonl to the checkpoint: the steps a tracker lacks
        self.trackers = Trackers.open(self.cfg, self.run, self.progress.step, self.resume != "never", self.is_main)
        self.metrics.sink = self.trackers.log
        self._setup_stop()

    def _setup_distributed(self) -> None:
        from trainer.distributed import local_world_size, make_accelerator, resolve_grad_accum, world_size_from_env

        self.grad_accum = resolve_grad_accum(self.cfg, world_size_from_env())
        self.acc = make_accelerator(self.cfg, self.grad_accum)
        self.rank, self.world = self.acc.process_index, self.acc.num_processes
        self.is_main = self.acc.is_main_process
        self.device = self.acc.device
        self.ranks = Ranks(
            self.rank,
            self.world,
            self.cfg.distributed.timeout_s,
            lambda: self.stop.requested,
            local_rank=self.acc.local_process_index,
            local_world=local_world_size(self.world),
        )
        # own output dirs (distributed.shared_output_dir=false): each node's supervisor watches its node's files
        self.per_node = not self.cfg.distributed.shared_output_dir and self.world > 1
        self.writes_dir = self.is_main or (self.per_node and self.ranks.is_leader)
        self.heartbeat = Heartbeat(self.run, enabled=self.writes_dir)
        torch.manual_seed(self.cfg.train.seed)

    def _open_remote(self):
        """The remote store (rank 0's; with own output dirs every node's first rank's). With own output dirs a
        failure on one node stops every rank with its one line, instead of the others waiting in a collective."""
        if not self.per_node:
            return open_remote(self.cfg, self.writes_dir)
        from trainer.spot.stop import agree

        if self.resume not in ("auto", "never"):
            raise ConfigError(
                f"--resume {self.resume}: with distributed.shared_output_dir=false every node resumes from the "
                f"bucket; use --resume auto (or pull that checkpoint into checkpoint.remote first)"
            )
        remote, failure = None, None
        try:
            remote = open_remote(self.cfg, self.writes_dir)
        except SpotTrainerError as e:  # wrong credentials, a missing bucket: this node's one line, exit 2
            failure = e
        if agree(failure is not None, False, self.acc).stop:
            raise failure or ConfigError("another node cannot use checkpoint.remote; its output says why")
        return remote

    def _check_memory(self) -> None:
        """Every rank checks its own GPU; if one cannot fit, every rank stops with exit 2 (none waits for it)."""
        from trainer import preflight
        from trainer.spot.stop import agree

        vocab = len(model_lib.load_tokenizer(self.cfg)) if model_lib.is_builtin(self.cfg) else None
        try:
            if not config_only_in_mirror(self.cfg, self.run):
                preflight.check_fits(self.cfg, self.device, self.world, vocab)
            failure = None
        except ConfigError as e:
            failure = e
        if agree(failure is not None, False, self.acc).stop:
            raise failure or ConfigError("another rank's GPU cannot fit this run; its output says why")

    def _setup_output(self) -> None:
        self.run.root.mkdir(parents=True, exist_ok=True)

        def own() -> None:
            self.lock = RunLock(self.run.root).acquire()  # one trainer per output dir
            CheckpointStore(self.run.root).clean_stale()

        self.ranks.main_only("lock", own, per_node=self.per_node)
        self.heartbeat(phase="setup", force=True)  # alive from here on, for the supervisor's hang_timeout
        if self.per_node:  # each node's dir is its own; the nodes meet in checkpoint.remote
            self.ranks.check_own_dirs(self.run)
        else:  # every node writes its ranks' files here: it must be one directory
            self.ranks.check_shared_dir(self.run)
        self.metrics = MetricsLog(self.run.metrics, enabled=self.is_main)
        # own output dirs: every node's events (a preemption's, an OOM's) tell its own supervisor the exit reason
        self.events = EventLog(self.run.events, "trainer", enabled=self.writes_dir)

    def _setup_mirror(self, remote) -> None:
        """model.mirror: where the base model is not on this disk, it comes from the bucket (model_mirror.py)."""
        if not self.cfg.model.mirror:
            return
        if remote is not None and self.writes_dir:
            self.mirror = ModelMirror(self.cfg, self.run, remote, self.say, prefetch=not self.per_node)

        def fetch() -> None:  # the node's writer; the others wait, then load from where it put the copy
            if self.mirror is not None:
                self.mirror.fetch(self.resume)

        self.ranks.main_only("mirror", fetch, self.heartbeat, per_node=self.per_node)
        self.model_cfg = model_config_for_load(self.cfg, self.run)

    def _check_same_run(self) -> None:
        """Every rank has the same config and the same data (with own output dirs each node reads its own files): one
        all-reduce of a fingerprint, or every rank stops with one line instead of training apart or hanging at the
        end on a different step count."""
        if self.world == 1:
            return
        import hashlib
        import json

        from trainer.distributed import agree_int

        same = {k: v for k, v in self.cfg.to_dict().items() if k not in ("output_dir", "supervisor")}
        tokens = sum(len(r["input_ids"]) for r in self.rows)
        text = json.dumps([same, len(self.rows), tokens, self.total_steps], sort_keys=True, default=str)
        mine = int(hashlib.sha256(text.encode()).hexdigest()[:15], 16)
        if agree_int(0, self.acc, any_rank=mine) != agree_int(0, self.acc, any_rank=-mine) * -1:
            raise ConfigError(
                f"the ranks disagree on the config or the data ({len(self.rows)} rows, {self.total_steps} steps "
                f"here): give every node the same config, data.path and model"
            )

    def _setup_data(self) -> None:
        self.tokenizer = model_lib.load_tokenizer(self.model_cfg)

        def tokenize() -> None:  # rank 0 tokenizes and caches; the others then read the cache
            self.data = prepare_data(self.cfg, self.tokenizer, self.run.cache)

        self.ranks.main_only("data", tokenize, self.heartbeat, per_node=self.per_node)
        if not self.writes_dir:
            self.data = prepare_data(self.cfg, self.tokenizer, self.run.cache)
        rows = self.data.train
        if self.cfg.data.packing:
            rows = batches.pack_rows(rows, self.cfg.data.max_length, self.cfg.train.seed)
        self.rows = rows
        t = self.cfg.train
        self.plan = batches.BatchPlan(len(rows), t.seed, t.micro_batch_size, self.grad_accum, self.world)
        if self.plan.steps_per_epoch == 0:
            raise ConfigError(
                f"data.path {self.cfg.data.path}: {len(rows)} rows is fewer than one global batch "
                f"({self.plan.global_batch}); lower train.micro_batch_size or grad_accum"
            )
        self.total_steps = t.max_steps or max(1, int(t.epochs * self.plan.steps_per_epoch))
        self.warmup = warmup_steps(self.total_steps, t.warmup_steps, t.warmup_ratio)

    def _setup_model(self) -> None:
        torch.manual_seed(self.cfg.train.seed)
        if model_lib.is_builtin(self.cfg):
            self.ranks.main_only("model", self._materialize, per_node=self.per_node)
        self.heartbeat(phase="model")
        stage = (
            self.mirror.stage_4bit
            if self.mirror is not None and self.is_main and self.mirror.wants_4bit_copy()
            else None
        )
        self.model = model_lib.build_model(self.model_cfg, self.tokenizer, self.device, self.run.root, stage)
        # the same init on every rank (above), then a stream of its own for dropout on each rank
        torch.manual_seed(self.cfg.train.seed + 7919 * self.rank)

    def _materialize(self) -> None:
        model_lib.materialize_builtin(self.cfg, self.tokenizer, self.run.root)

    def _make_optimizer(self, params):
        t = self.cfg.train
        kw = dict(lr=t.lr, betas=(t.adam_beta1, t.adam_beta2), eps=t.adam_eps, weight_decay=t.weight_decay)
        if t.optimizer == "adamw":
            return torch.optim.AdamW(params, fused=self.device.type == "cuda" or None, **kw)
        import bitsandbytes as bnb

        cls = {
            "adamw_8bit": bnb.optim.AdamW8bit,
            "paged_adamw_8bit": bnb.optim.PagedAdamW8bit,
            "paged_adamw": bnb.optim.PagedAdamW,
        }[t.optimizer]
        return cls(params, **kw)

    def _setup_optimizer(self) -> None:
        self.heartbeat(phase="optimizer")
        params = [p for _, p in model_lib.trainable_parameters(self.model)]
        self.optimizer = self._make_optimizer(params)
        self.model, self.optimizer = self.acc.prepare(self.model, self.optimizer)
        self.raw_model = self.acc.unwrap_model(self.model)
        self.params = [p for _, p in model_lib.trainable_parameters(self.raw_model)]

    def _setup_stop(self) -> None:
        self.stop.install()
        if self.acc.local_process_index == 0 and self.cfg.preemption.watch != "none":
            from trainer.spot.notices import NoticeWatcher

            p = self.cfg.preemption
            self.watcher = NoticeWatcher(
                self.stop,
                mode=p.watch,
                poll_seconds=p.poll_seconds,
                endpoints=dict.fromkeys(PROVIDERS, p.metadata_url) if p.metadata_url else None,
                memory=self.notice_memory,
            )
            self.watcher.start()

    # ------------------------------------------------------------------ helpers

    def say(self, text: str) -> None:
        if self.is_main:
            print(text, flush=True)

    def _tick(self) -> bool:
        """Inside a long rank-0-only phase (eval): beat, and say whether a stop was requested (end it now)."""
        self.heartbeat()
        return self.stop.requested or self.ranks.peer_stop()  # a stop on another node counts too

    def _vote(self) -> Decision:
        """Every rank's vote before a micro-batch: stop (a signal or notice seen here), checkpoint after this step
        (rank 0's clock; a notice seen here). The result is the same on every rank."""
        notices = self.stop.take_checkpoint_request()
        if notices is not None:
            self._notice_ids += notices
        clock = self.checkpointer.due_by_clock()
        d = agree(self.stop.requested, clock or notices is not None, self.acc)
        if d.checkpoint and not self._checkpoint_agreed and self.is_main:
            why = "checkpoint.every_minutes" if clock else "a cloud notice (rebalance recommendation)"
            self.events.emit("checkpoint_requested", step=self.progress.step + 1, reason=why)
        self._checkpoint_agreed |= d.checkpoint
        return d

    def _reduce(self, values: list[float]) -> list[float]:
        if self.world == 1:
            return values
        t = torch.tensor(
            values, dtype=torch.float64 if self.device.type == "cpu" else torch.float32, device=self.device
        )
        torch.distributed.all_reduce(t)
        return t.tolist()

    def _evaluate(self) -> dict:
        """Eval on rank 0 (the others wait for it outside any collective); {} if there is none or a stop ended it."""
        out: dict = {}

        def run() -> None:
            try:
                self._eval_into(out)
            except evaluate.Interrupted:
                out.clear()
                self.say(f"eval at step {self.progress.step} interrupted: a stop was requested")
                self.events.emit("eval_interrupted", step=self.progress.step, reason=self.stop.reason)
            except torch.OutOfMemoryError:  # generation batches are not in plan's memory model: skip, keep training
                out.clear()
                if self.device.type == "cuda":
                    torch.cuda.empty_cache()
                self.say(f"eval at step {self.progress.step} skipped: out of GPU memory (lower eval.max_samples)")
                self.events.emit("eval_interrupted", step=self.progress.step, reason="out of memory")

        if self.data.eval or self.data.eval_prompts:
            self.ranks.main_only("eval", run, self.heartbeat, beat_file=False)  # eval beats per batch itself
            self.heartbeat(phase="train")
        return out

    def _eval_into(self, out: dict) -> None:
        """Eval loss (and exact match) into `out`, logged; raises evaluate.Interrupted when a stop ends it."""
        e, t0 = self.cfg.eval, time.monotonic()
        cuda = [torch.cuda.current_device()] if self.device.type == "cuda" else []
        with torch.random.fork_rng(devices=cuda):
            out["eval_loss"] = evaluate.eval_loss(
                self.raw_model,
                self.data.eval,
                self.tokenizer.pad_token_id,
                self.cfg.train.micro_batch_size,
                self.device,
                tick=self._tick,
            )
            if e.generate and self.data.eval_prompts:
                out["eval_exact_match"] = evaluate.exact_match(
                    self.raw_model,
                    self.tokenizer,
                    self.data.eval_prompts,
                    e.max_new_tokens,
                    max(self.cfg.train.micro_batch_size, 32),
                    self.device,
                    tick=self._tick,
                )
        self.metrics.write(step=self.progress.step, **out)
        self.events.emit("eval", step=self.progress.step, seconds=round(time.monotonic() - t0, 3))
        em = out.get("eval_exact_match")
        self.say(
            f"eval step {self.progress.step}: loss {out['eval_loss']:.4f}"
            + (f", exact match {em:.1%}" if em is not None else "")
        )

    # ------------------------------------------------------------------ the loop

    def train(self) -> int:
        """Run to the end (exit 0) or to an agreed stop (emergency checkpoint, exit 75)."""
        p = self.progress
        self.events.emit("train_start", step=p.step, world_size=self.world, total_steps=self.total_steps)
        eval_before = self._evaluate() if p.step == 0 and self.cfg.eval.before_training else {}
        console = Console(self.is_main, self.total_steps, p.step)
        self.heartbeat(step=p.step, phase="train", force=True)
        self.model.train()  # from_pretrained returns eval mode: dropout and checkpointing would be off
        while p.step < self.total_steps:
            rng_at_step_start = model_state.capture_rng()  # raw copies; made JSON only if a stop needs them
            try:
                result = self.startup.first_step(self._train_step)
            except torch.OutOfMemoryError:
                console.close()
                return self._out_of_memory(rng_at_step_start)
            if result is None:
                console.close()
                return self._preempted(rng_at_step_start)
            self._after_step(result, console)
            startup = self.startup.fields()  # once per process, after its first step
            if startup is not None and self.is_main:
                self.events.emit("startup", step=p.step, **startup)
        console.close()
        return self._finish(eval_before)

    def _train_step(self) -> StepResult | None:
        """One optimizer step over this rank's micro-batches; None if the ranks agreed to stop before it ended."""
        t, p = self.cfg.train, self.progress
        t0 = time.monotonic()
        micro_rows, next_pos = self.plan.step_rows(p.position, self.rank)
        micro = [batches.collate([self.rows[i] for i in mb], self.tokenizer.pad_token_id) for mb in micro_rows]
        # real tokens = the rows' lengths: exact for packed rows too, and when the pad id is also eos
        n_targets, n_tokens = self._reduce(
            [
                sum(batches.count_targets(b["labels"]) for b in micro),
                sum(len(self.rows[i]["input_ids"]) for mb in micro_rows for i in mb),
            ]
        )
        lr = lr_at(p.step, self.total_steps, t.lr, t.lr_scheduler, self.warmup)
        for g in self.optimizer.param_groups:
            g["lr"] = lr
        loss_sum = 0.0
        for m, batch in enumerate(micro):
            if self._vote().stop:
                self.optimizer.zero_grad(set_to_none=True)
                return None
            loss_sum += self._micro_step(batch, last=m == len(micro) - 1, n_targets=n_targets)
        self._stepping = True  # from here the state is no longer the last completed step's (an OOM must not save it)
        grad_norm = self.acc.clip_grad_norm_(self.params, t.max_grad_norm or float("inf"))
        # a checkpoint's background copy of the state finishes first: the checkpointer's step pre-hook waits for it
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self._stepping = False
        p.advance(next_pos, self.plan.global_batch, int(n_tokens))
        (loss,) = self._reduce([loss_sum])
        return StepResult(loss, lr, float(grad_norm), int(n_tokens), time.monotonic() - t0)

    def _micro_step(self, batch: dict, last: bool, n_targets: float) -> float:
        """Forward and backward of one micro-batch; its loss (this rank's share of the step's mean)."""
        batch = {k: v.to(self.device) for k, v in batch.items()}
        self._micro_tokens = batch["input_ids"].numel()  # for the out-of-memory report
        ctx = self.acc.no_sync(self.model) if (self.world > 1 and not last) else nullcontext()
        # under DeepSpeed the engine steps inside the last micro-batch's backward
        self.acc.sync_gradients = last
        # under DeepSpeed the optimizer steps inside the last micro-batch's backward (the checkpointer's step
        # pre-hook waits there for a checkpoint's background copy)
        self._stepping = last and self.acc.distributed_type == "DEEPSPEED"
        with ctx, self.acc.autocast():
            out = self.model(**batch, num_items_in_batch=max(1, int(n_targets)), use_cache=False)
            # the loss is sum / targets of the whole step; DDP averages over ranks and backward()
            # divides by grad_accum (accelerate, or the DeepSpeed engine): undo both
            loss = out.loss * (self.world * self.grad_accum)
            micro_loss = out.loss.detach()
            del out  # the fp32 logits (tokens x vocab) need not live through backward
        self.acc.backward(loss)
        return float(micro_loss)

    def _after_step(self, r: StepResult, console: Console) -> None:
        """Log the step, beat, evaluate and checkpoint when due."""
        cfg, p = self.cfg, self.progress
        rec = dict(
            step=p.step,
            loss=round(r.loss, 6),
            lr=r.lr,
            grad_norm=round(r.grad_norm, 6),
            tokens=r.tokens,
            tokens_per_second=round(r.tokens / r.seconds, 1),
            step_time_s=round(r.seconds, 4),
            memory_gb=_memory_gb(self.device),
            epoch=round(p.epoch + p.epoch_offset / len(self.rows), 4),
            samples_seen=p.samples_seen,
        )
        self.metrics.write(**rec)
        self.heartbeat(step=p.step, phase="train")
        console.advance(1, loss=f"{r.loss:.3f}")
        last = p.step == self.total_steps
        if p.step % cfg.train.log_every_steps == 0 or last:
            console.line(
                f"step {p.step}/{self.total_steps} loss {r.loss:.4f} lr {r.lr:.2e} "
                f"grad_norm {r.grad_norm:.3f} {rec['tokens_per_second']:.0f} tok/s"
            )
        if cfg.eval.every_steps and p.step % cfg.eval.every_steps == 0 and not last:
            self._evaluate()
        agreed, self._checkpoint_agreed = self._checkpoint_agreed, False
        if self.checkpointer.maybe_save(p, last=last, agreed=agreed) and self._notice_ids:
            self._notices_saved_at = p.step
        self._remember_notices()

    def _remember_notices(self) -> None:
        """Once the checkpoint voted for a notice is committed, remember the notice: a restart seeing it again does not
        checkpoint again (a kill before the commit leaves it unremembered, and the restart takes it)."""
        step = self._notices_saved_at
        if step is not None and self._notice_ids and self.checkpointer.committed(step):
            self.notice_memory.remember(self._notice_ids)
            self._notice_ids, self._notices_saved_at = [], None

    def _finish(self, eval_before: dict) -> int:
        eval_after = self._evaluate()
        if eval_before and eval_after and eval_before.get("eval_loss") is not None:
            em = (
                ""
                if eval_before.get("eval_exact_match") is None
                else f", exact match {eval_before['eval_exact_match']:.1%} -> {eval_after['eval_exact_match']:.1%}"
            )
            self.say(
                f"eval before -> after training: loss {eval_before['eval_loss']:.4f} -> "
                f"{eval_after['eval_loss']:.4f}{em}"
            )
        if not self.checkpointer.finish(self.progress, self.tokenizer):
            self.checkpointer.upload_urgently(self.progress.step)  # the last step's checkpoint, before final/
            self.checkpointer.wait_uploads(self.stop.grace_left(self.cfg.preemption.grace_seconds))
            self.events.emit("preempt", step=self.progress.step, reason=self.stop.reason, stop_to_commit_s=0.0)
            self.events.emit("train_end", step=self.progress.step, status="preempted")
            self.say(f"stopped while uploading final/; exiting {EXIT_PREEMPTED} (preempted, resumable)")
            return EXIT_PREEMPTED
        self.checkpointer.wait_uploads(None)
        if self.mirror is not None:
            self.mirror.wait_upload()  # a short run still leaves the base model's copy behind
        self.events.emit("train_end", step=self.progress.step, status="done")
        return EXIT_OK

    def _preempted(self, rng: tuple) -> int:
        """Agreed stop: commit the state at the last completed step locally, then upload with the grace left."""
        step, t0 = self.progress.step, time.monotonic()
        self.say(f"stop requested ({self.stop.reason}): emergency checkpoint at step {step}")
        if not self.checkpointer.emergency(self.progress, rng):
            newest = self.checkpointer.store.committed_steps()
            self.events.emit("train_end", step=step, status="preempted")
            self.say(
                f"emergency checkpoint at step {step} not written: the disk is full; the run resumes from "
                f"{f'step {newest[-1]}' if newest else 'the start'}; exiting {EXIT_PREEMPTED} "
                f"(preempted, resumable)"
            )
            return EXIT_PREEMPTED
        commit_s = time.monotonic() - t0
        if self._notice_ids:  # the emergency checkpoint, committed, covers the notices voted for
            self._notices_saved_at = step
        self._remember_notices()
        self.events.emit("preempt", step=step, reason=self.stop.reason, stop_to_commit_s=round(commit_s, 3))
        self.checkpointer.wait_uploads(self.stop.grace_left(self.cfg.preemption.grace_seconds))
        self.events.emit("train_end", step=step, status="preempted")
        self.say(
            f"checkpoint step {step} committed in {commit_s:.2f} s; exiting {EXIT_PREEMPTED} (preempted, resumable)"
        )
        return EXIT_PREEMPTED

    def _out_of_memory(self, rng: tuple) -> int:
        """A CUDA OOM inside a step: one line (step, micro-batch tokens, peak, plan's suggestion), the state of the
        last completed step committed (one process; with several, a rank cannot stop the others' collectives, and
        the newest periodic checkpoint stands), exit EXIT_OOM so the supervisor does not rerun the same config."""
        import gc

        from trainer.preflight import OutOfMemory, oom_message

        self.optimizer.zero_grad(set_to_none=True)
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
        step = self.progress.step
        vocab = len(self.tokenizer) if model_lib.is_builtin(self.cfg) else None
        # the weights and optimizer are the last completed step's unless the OOM hit the optimizer step itself
        safe = self.world == 1 and step > 0 and not self._stepping
        committed = safe and self.checkpointer.emergency(self.progress, rng)
        newest = self.checkpointer.store.committed_steps()
        if committed:
            saved = f"step {step} is checkpointed"
        else:
            saved = f"the newest checkpoint is step {newest[-1]}" if newest else "no checkpoint yet"
        tokens = getattr(self, "_micro_tokens", 0)
        message = oom_message(self.cfg, self.device, self.world, step + 1, tokens, vocab, saved)
        self.events.emit("oom", step=step + 1, committed_step=step if committed else None, message=message[:500])
        self.events.emit("train_end", step=step, status="oom")
        raise OutOfMemory(message)

    def cleanup(self) -> None:
        self.stop.uninstall()
        if self.trackers is not None:
            self.trackers.close()
        if self.watcher is not None:
            self.watcher.close()
        if self.checkpointer is not None:
            self.checkpointer.close()
        if self.acc is not None:
            from trainer.distributed import release

            # drop the model first: a gloo worker freeing DDP work at interpreter exit can SIGABRT
            self.model = self.raw_model = self.optimizer = self.params = None
            if self.checkpointer is not None:
                self.checkpointer.model = self.checkpointer.raw_model = self.checkpointer.optimizer = None
            release(self.acc)
        if self.lock is not None:  # last: the writer may commit and prune until closed above
            self.lock.release()


def _memory_gb(device: torch.device) -> float:
    if device.type == "cuda":
        return round(torch.cuda.max_memory_allocated(device) / 2**30, 3)
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 3)  # Linux: KiB


def run_training(cfg: Config, resume: str = "auto", archive_existing: bool = False) -> int:
    trainer = Trainer(cfg, resume, archive_existing)
    try:
        trainer.setup()
        return trainer.train()
    finally:
        trainer.cleanup()
