"""The copy of a periodic checkpoint's tensors, made in the background while the next step computes.

Optimizer state and weights change only in the optimizer step (ZeRO-2 offload: the fp32 master partitions and
Adam moments in CPU RAM, then the bf16 weights copied from them; torch optimizers: the same, in `step()`).
Gradients, the only thing a forward/backward writes, are not saved. So `save()` only records references and
starts this copy; the Checkpointer waits for it right before the next optimizer step (its step pre-hook), and
only then hands the copies to the writer. Buffers are kept and reused while names, shapes and dtypes match:
re-allocating (and first-touching) 20 GB each checkpoint costs more than copying into memory already mapped.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

import torch

from trainer.errors import CheckpointError

Files = dict[str, dict[str, torch.Tensor]]  # file name -> tensor name -> tensor, as Snapshot.tensors


def copy_tensor(dst: torch.Tensor, src: torch.Tensor) -> None:
    """dst <- src; from a GPU into pinned memory without blocking (the copy thread waits on its stream)."""
    dst.copy_(src.detach(), non_blocking=src.is_cuda)


class SnapshotCopy:
    """One background copy at a time of a snapshot's tensors into buffers reused across checkpoints.

    `copy` does one tensor (dst, src); a test passes a slow one to see that the optimizer step waits for it.
    """

    def __init__(self, copy: Callable[[torch.Tensor, torch.Tensor], None] = copy_tensor):
        self.copy = copy
        self._buffers: dict[tuple[str, str], torch.Tensor] = {}
        self._thread: threading.Thread | None = None
        self.copied: Files = {}  # the finished copy, after wait(): the same names as what start() was given
        self._error: BaseException | None = None
        self.copy_s = 0.0  # how long the last copy took in its thread

    @property
    def running(self) -> bool:
        return self._thread is not None

    def start(self, live: Files) -> None:
        """Copy `live` in the background; nothing may change it before wait(). The writer must be done with the
        previous checkpoint's buffers: they are filled again."""
        if self._thread is not None:
            raise RuntimeError("a snapshot copy is still running; wait() for it first")
        ready = None
        gpu = next((t.device for ts in live.values() for t in ts.values() if t.is_cuda), None)
        if gpu is not None:  # what the GPU queued so far (the last step) is what gets copied
            ready = (gpu, torch.cuda.Event())
            ready[1].record(torch.cuda.current_stream(gpu))
        self._error, self.copied = None, {}
        self._thread = threading.Thread(target=self._run, args=(live, ready), name="checkpoint-copy", daemon=True)
        self._thread.start()

    def _buffer(self, key: tuple[str, str], src: torch.Tensor) -> torch.Tensor:
        buf = self._buffers.get(key)
        if buf is None or buf.shape != src.shape or buf.dtype != src.dtype or buf.is_pinned() != src.is_cuda:
            buf = torch.empty(src.shape, dtype=src.dtype, device="cpu", pin_memory=src.is_cuda)
            self._buffers[key] = buf
        return buf

    def _run(self, live: Files, ready) -> None:
        t0 = time.monotonic()
        try:  # allocating here too: pinning memory for GPU tensors takes a while the first time
            used = {(f, n) for f, ts in live.items() for n in ts}
            self._buffers = {k: v for k, v in self._buffers.items() if k in used}  # no longer saved: freed
            stream = None
            if ready is not None:  # a side stream: the copies overlap the next step's kernels
                stream = torch.cuda.Stream(device=ready[0])
                stream.wait_event(ready[1])
            copied: Files = {}
            for fname, tensors in live.items():
                out = copied[fname] = {}
                for name, src in tensors.items():
                    out[name] = self._buffer((fname, name), src)
                    if src.is_cuda:
                        with torch.cuda.stream(stream):
                            self.copy(out[name], src)
                    else:
                        self.copy(out[name], src)
            if stream is not None:
                stream.synchronize()
            self.copied = copied
        except BaseException as e:  # raised in the training thread by wait()
            self._error = e
        self.copy_s = time.monotonic() - t0

    def wait(self) -> float:
        """Until the running copy is done (its error raised here; `copied` holds it); the seconds this call waited."""
        if self._thread is None:
            return 0.0
        t0 = time.monotonic()
        self._thread.join()
        self._thread = None
        waited = time.monotonic() - t0
        if self._error is not None:
            err, self._error = self._error, None
            self._buffers.clear()
            raise CheckpointError(f"copying the checkpoint's tensors failed: {err}") from err
        return waited
