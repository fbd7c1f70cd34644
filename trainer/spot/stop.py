"""Stop requests: SIGTERM/SIGINT and cloud notices set a flag; the training loop decides when to stop.

Signal handlers here only record what happened. Everything else (finishing the step, the emergency
checkpoint, the upload) happens in the loop, where it is safe to do. Every rank acts on one agreed decision per
micro-batch (`agree`: stop, checkpoint after this step), never on what it alone saw or its own clock, so every rank
stops at the same step and writes the same checkpoints.
"""

from __future__ import annotations

import signal
import threading
import time
from dataclasses import dataclass
from typing import Any

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


class StopSignal:
    """A flag that says "stop soon": why, since when, and by when the machine goes away."""

    def __init__(self) -> None:
        self._requested = threading.Event()
        self._reason: str | None = None
        self._deadline: float | None = None  # unix time the machine goes away, if a notice said so
        self._monotonic: float | None = None
        self._wall: float | None = None
        self._checkpoint_soon = threading.Event()
        self._checkpoint_reason: str | None = None
        self._checkpoint_ids: list[str] = []  # the notices asking for it (remembered once acted on)
        self._lock = threading.Lock()  # the watcher thread adds requests while the loop takes them
        self._previous: dict[int, Any] = {}
        self._sigint_count = 0

    # ------------------------------------------------------------ signals

    def install(self) -> StopSignal:
        """Catch SIGTERM and SIGINT (main thread only); a second SIGINT raises KeyboardInterrupt."""
        for sig in STOP_SIGNALS:
            if sig not in self._previous:
                self._previous[sig] = signal.signal(sig, self._on_signal)
        return self

    def uninstall(self) -> None:
        """Put back the handlers that were there before `install`."""
        for sig, previous in self._previous.items():
            signal.signal(sig, previous if previous is not None else signal.SIG_DFL)
        self._previous.clear()

    def _on_signal(self, signum: int, frame) -> None:
        # Only plain assignments here: the handler can run between any two bytecodes of the loop,
        # including while another thread holds a lock this code would need.
        name = signal.Signals(signum).name
        if signum == signal.SIGINT:
            self._sigint_count += 1
            if self._sigint_count >= 2:
                # Ctrl-C twice: the person wants out now, not after a checkpoint.
                signal.signal(signal.SIGINT, signal.default_int_handler)
                raise KeyboardInterrupt
        self._record(name, None)

    # ------------------------------------------------------------ requests

    def request(self, reason: str, deadline: float | None = None) -> None:
        """Ask the loop to stop (cloud notices); `deadline` is the unix time the machine goes away."""
        self._record(reason, deadline)

    def _record(self, reason: str, deadline: float | None) -> None:
        if deadline is not None and (self._deadline is None or deadline < self._deadline):
            self._deadline = deadline
        if not self._requested.is_set():
            self._reason = reason
            self._wall = time.time()
            self._monotonic = time.monotonic()
            self._requested.set()

    def request_checkpoint(self, reason: str, notice_id: str | None = None) -> None:
        """Ask for an early checkpoint without stopping (e.g. an AWS rebalance recommendation)."""
        with self._lock:
            self._checkpoint_reason = reason
            if notice_id is not None:
                self._checkpoint_ids.append(notice_id)
            self._checkpoint_soon.set()

    def take_checkpoint_request(self) -> list[str] | None:
        """The pending checkpoint request, cleared: the ids of the notices behind it ([] if none), or None if none
        is pending. The loop takes it when it votes, so a request that arrives later waits for the next vote."""
        with self._lock:
            if not self._checkpoint_soon.is_set():
                return None
            ids, self._checkpoint_ids = self._checkpoint_ids, []
            self._checkpoint_soon.clear()
            return ids

    def checkpoint_taken(self) -> None:
        """Clear `checkpoint_soon` (and forget which notices asked)."""
        self.take_checkpoint_request()

    # ------------------------------------------------------------ state

    @property
    def requested(self) -> bool:
        return self._requested.is_set()

    @property
    def reason(self) -> str | None:
        return self._reason

    @property
    def deadline(self) -> float | None:
        return self._deadline

    @property
    def requested_at(self) -> float | None:
        """Unix time of the first stop request."""
        return self._wall

    @property
    def checkpoint_soon(self) -> bool:
        return self._checkpoint_soon.is_set()

    @property
    def checkpoint_reason(self) -> str | None:
        return self._checkpoint_reason

    def grace_left(self, default_grace: float) -> float:
        """Seconds left before the machine goes away (>= 0): the notice's deadline, else the default grace."""
        if self._deadline is not None:
            return max(0.0, self._deadline - time.time())
        if self._monotonic is None:
            return float(default_grace)
        return max(0.0, default_grace - (time.monotonic() - self._monotonic))

    def wait(self, timeout: float | None = None) -> bool:
        """Block until a stop is requested or `timeout` passes; True if requested."""
        return self._requested.wait(timeout)


@dataclass(frozen=True)
class Decision:
    """What every rank does after one vote: the same on every rank."""

    stop: bool = False  # stop before this micro-batch (emergency checkpoint of the last completed step)
    checkpoint: bool = False  # checkpoint after this step (rank 0's clock, or a notice some rank saw)


def agree(stop: bool, checkpoint: bool = False, accelerator: Any = None) -> Decision:
    """One vote of every rank (a 2-element all-reduce MAX): each field is true everywhere if any rank voted for it.

    Ranks vote only what they alone can know: a signal or notice they saw, and (rank 0) its clock; what every rank
    computes alike (checkpoint.every_steps) needs no vote.
    """
    stop_, ckpt = _all_max([int(bool(stop)), int(bool(checkpoint))], accelerator)
    return Decision(bool(stop_), bool(ckpt))


def agreed_stop(local_flag: bool, accelerator: Any = None) -> bool:
    """True on every rank if any rank wants to stop; no-op when not distributed."""
    return agree(local_flag, False, accelerator).stop


def _all_max(values: list[int], accelerator: Any) -> list[int]:
    import torch
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return values
    if accelerator is not None and getattr(accelerator, "device", None) is not None:
        device = accelerator.device
    elif dist.get_backend() == "nccl":
        device = torch.device("cuda", torch.cuda.current_device())
    else:
        device = torch.device("cpu")
    t = torch.tensor(values, dtype=torch.int32, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t.tolist()
