"""Experiment trackers (logging.report_to): one tracker run per output dir, continued across restarts.

The tracker runs' ids are kept in `<output_dir>/trackers.json`; a restarted process reattaches to them (W&B
`resume="allow"`, MLflow `start_run(run_id)`, TensorBoard `purge_step`) and sends every step exactly once: the
steps a tracker lacks up to the checkpoint are sent again from metrics.jsonl, those it already holds are not sent
twice. A restart is a `restarts` value (how many so far) on the first step logged after it, not a new run. A
tracker that is not installed or fails costs one warning and the run goes on without it. Rank 0 only.
"""

from __future__ import annotations

import json
import logging
import queue
import re
import threading
import uuid
from collections.abc import Callable
from pathlib import Path

from trainer.durable import replace_file
from trainer.errors import ConfigError
from trainer.metrics import read_jsonl
from trainer.remote.uri import has_credentials
from trainer.run_dir import TRACKERS_FILE, RunDir
from trainer.tracker_backends import BACKENDS

log = logging.getLogger(__name__)

_SECRET = re.compile(r"key|token|secret|password|passwd|credential", re.IGNORECASE)
# what spot-trainer sets itself: given in init_kwargs, a restart could not continue the same run
_OWN_KWARGS = {
    "wandb": {"id", "resume", "resume_from", "fork_from", "project", "name", "tags", "config"},
    "mlflow": {"run_id", "experiment_name", "run_name", "tags"},
    "tensorboard": {"purge_step", "log_dir", "logdir"},
}
_SKIP = {"step", "time"}
KEY = "key"  # trackers.json: this output dir's tracker key (tracker_backends)


def check_logging(lg) -> None:
    """ConfigError for init_kwargs that hold a secret or a key spot-trainer sets itself."""
    for tracker, kwargs in lg.init_kwargs.items():
        for key, value in kwargs.items():
            where = f"logging.init_kwargs.{tracker}.{key}"
            if _SECRET.search(str(key)):
                raise ConfigError(
                    f"{where}: secrets are not accepted in the config (it is copied into checkpoints and sent to the "
                    f"trackers); set them in the environment (WANDB_API_KEY, MLFLOW_TRACKING_TOKEN, ...)"
                )
            if key in _OWN_KWARGS[tracker]:
                raise ConfigError(
                    f"{where}: set by spot-trainer (logging.project/run_name/tags, or kept across restarts)"
                )
            if isinstance(value, str) and "://" in value and has_credentials(value):
                raise ConfigError(f"{where}: the URI holds credentials; give them in the environment instead")


def _quiet(e: BaseException) -> str:
    """An error in one line, without credentials a URL in it may carry."""
    text = (str(e).strip().splitlines() or [""])[0][:300]
    return f"{type(e).__name__}: " + re.sub(r"//[^/\s@]+@", "//***@", text)


class TrackerRun:
    """One tracker's run in this process: started or reattached, sent the steps it lacks, then each new step once."""

    def __init__(
        self,
        backend,
        saved: dict | None,
        step: int,
        history: list[dict],
        config: dict,
        marker: dict,
        save: Callable[[str, dict], None],
        key: str,
    ):
        self.backend, self.name, self.saved, self.step, self.key = backend, backend.name, saved, step, key
        self.history, self.config, self.marker, self.save = history, config, marker, save
        self.held = -1  # the last step the tracker holds, known once started

    def start(self) -> None:
        state, self.held = self.backend.start(self.saved, self.step, self.key)
        self.save(self.name, state)
        if self.saved is None:
            self.backend.log_config(self.config)
        for rec in self.history:  # what the tracker lacks up to the checkpoint (lost with a killed process)
            if rec["step"] > self.held and (values := _values(rec)):
                self.backend.log(values, rec["step"])
        self.history = []

    def log(self, values: dict, step: int) -> None:
        if step > self.held:  # what it holds already is what this process computes again
            self.backend.log({**values, **self.marker}, step)
            self.marker = {}

    def close(self) -> None:
        self.backend.close()


class Background:
    """A TrackerRun on a thread of its own, for a tracker whose calls are requests to a server (MLflow): a slow or
    hung server never holds up setup or a step. Its error, or falling `limit` records behind, is raised by the
    next log() or by close()."""

    def __init__(self, run: TrackerRun, limit: int = 100_000):
        self.run, self.name, self.limit = run, run.name, limit
        self.queue: queue.Queue = queue.Queue(limit)
        self.error: tuple[str, BaseException] | None = None
        self.thread = threading.Thread(target=self._work, name=f"tracker-{self.name}", daemon=True)
        self.thread.start()

    def start(self) -> None:
        pass  # started by the thread

    def log(self, values: dict, step: int) -> None:
        self._raise()
        try:
            self.queue.put_nowait((values, step))
        except queue.Full:
            self.error = ("fell behind", TimeoutError(f"{self.limit} records not sent yet"))
            self._raise()

    def close(self, timeout: float = 60.0) -> None:
        """Send what is queued and close the tracker, for at most `timeout` s."""
        try:
            self.queue.put(None, timeout=timeout)
        except queue.Full:
            pass
        self.thread.join(timeout)
        if self.thread.is_alive():
            raise TimeoutError(f"{self.queue.qsize()} records not sent in {timeout:.0f} s")
        self._raise()

    def _work(self) -> None:  # every call on this thread: MLflow's active run is one per thread
        try:
            self.run.start()
        except Exception as e:  # noqa: BLE001 (raised to the caller by the next log or close)
            self.error = ("could not start", e)
            _close_quietly(self.run)  # a half-started run
        while (item := self.queue.get()) is not None:
            if self.error is None:
                try:
                    self.run.log(*item)
                except Exception as e:  # noqa: BLE001
                    self.error = ("failed", e)
        if self.error is None:
            try:
                self.run.close()
            except Exception as e:  # noqa: BLE001
                self.error = ("could not close", e)

    def _raise(self) -> None:
        if self.error is not None:
            raise _Failed(*self.error)


class _Failed(Exception):
    def __init__(self, what: str, error: BaseException):
        super().__init__(what)
        self.what, self.error = what, error


class Trackers:
    """The trackers of this run: `log(record)` sends a metrics.jsonl record to each (the MetricsLog's sink)."""

    def __init__(self, run: RunDir):
        self.path = run.root / TRACKERS_FILE
        self.state: dict = {}
        self.runs: list[TrackerRun | Background] = []
        self.lock = threading.Lock()  # trackers.json is written by background starts too

    @classmethod
    def open(cls, cfg, run: RunDir, step: int, reattach: bool = True, enabled: bool = True) -> Trackers:
        """Start or reattach every tracker of logging.report_to; `step` is the step resumed from (0: fresh)."""
        self = cls(run)
        names = list(dict.fromkeys(cfg.logging.report_to))
        if not enabled or not names:
            return self
        self.state = _read(self.path) if reattach else {}
        marker = {}
        if self.state:  # a process of this run opened its trackers before: a restart
            self.state["restarts"] = int(self.state.get("restarts", 0)) + 1
            marker = {"restarts": self.state["restarts"]}
        key = self.state.get(KEY)
        if not (isinstance(key, str) and re.fullmatch(r"[0-9a-f]{16}", key)):
            key = uuid.uuid4().hex[:16]
        self._save(KEY, key)  # before any tracker starts: a run created under it is found again after a kill
        history = [r for r in read_jsonl(run.metrics) if isinstance(r.get("step"), int) and r["step"] <= step]
        for name in names:
            saved = self.state.get(name)
            saved = saved if isinstance(saved, dict) else None
            tracker = TrackerRun(BACKENDS[name](cfg, run), saved, step, history, cfg.to_dict(), marker, self._save, key)
            if getattr(tracker.backend, "blocking", False):
                self.runs.append(Background(tracker))
                continue
            try:
                tracker.start()
            except Exception as e:  # noqa: BLE001 (any tracker error: it must never cost the run)
                self._drop(tracker, "could not start", e)
                _close_quietly(tracker)  # a half-started run
                continue
            self.runs.append(tracker)
        return self

    def log(self, record: dict) -> None:
        """Send one record ({"step": ..., metric: value}) to every tracker still working."""
        step, values = record.get("step"), _values(record)
        if not isinstance(step, int) or not values:
            return
        for tracker in list(self.runs):
            try:
                tracker.log(values, step)
            except _Failed as e:
                self._drop(tracker, e.what, e.error)
            except Exception as e:  # noqa: BLE001
                self._drop(tracker, "failed", e)

    def close(self) -> None:
        for tracker in self.runs:
            try:
                tracker.close()
            except _Failed as e:
                log.warning("tracker %s %s (%s)", tracker.name, e.what, _quiet(e.error))
            except Exception as e:  # noqa: BLE001
                log.warning("tracker %s: could not close (%s)", tracker.name, _quiet(e))
        self.runs = []

    def _drop(self, tracker, what: str, e: BaseException) -> None:
        self.runs = [t for t in self.runs if t is not tracker]
        missing = isinstance(e, ImportError)
        log.warning(
            "tracker %s %s (%s); the run goes on without it%s",
            tracker.name,
            "is not installed" if missing else what,
            _quiet(e),
            " (pip install 'spot-trainer[trackers]')" if missing else "",
        )

    def _save(self, name: str, state) -> None:
        with self.lock:
            self.state[name] = state
            replace_file(self.path, (json.dumps(self.state, indent=1, sort_keys=True) + "\n").encode())


def _close_quietly(tracker: TrackerRun) -> None:
    try:
        tracker.close()
    except Exception:  # noqa: BLE001
        pass


def _values(record: dict) -> dict:
    return {
        k: v for k, v in record.items() if k not in _SKIP and isinstance(v, (int, float)) and not isinstance(v, bool)
    }


def _read(path: Path) -> dict:
    try:
        state = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return state if isinstance(state, dict) else {}
