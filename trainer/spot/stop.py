"""Stop requests: SIGTERM/SIGINT and cloud notices set a flag; the training loop decides when to stop.

Signal handlers here only record what happened. Everything else (finishing the step, the emergency
checkpoint, the upload) happens in the loop, where it is safe to do, and all ranks agree on the same
step through `agreed_stop`.
"""

from __future__ import annotations

import signal
import threading
import time
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

    def request_checkpoint(self, reason: str) -> None:
        """Ask for an early checkpoint without stopping (e.g. an AWS rebalance recommendation)."""
        self._checkpoint_reason = reason
        self._checkpoint_soon.set()

    def checkpoint_taken(self) -> None:
        """The loop saved a checkpoint: clear `checkpoint_soon`."""
        self._checkpoint_soon.clear()

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


def agreed_stop(local_flag: bool, accelerator: Any = None) -> bool:
    """True on every rank if any rank wants to stop (one 1-element all-reduce MAX); no-op when not distributed."""
    import torch
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return bool(local_flag)
    if accelerator is not None and getattr(accelerator, "device", None) is not None:
        device = accelerator.device
    elif dist.get_backend() == "nccl":
        device = torch.device("cuda", torch.cuda.current_device())
    else:
        device = torch.device("cpu")
    flag = torch.tensor([1 if local_flag else 0], dtype=torch.int32, device=device)
    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    return bool(flag.item())
