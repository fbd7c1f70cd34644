"""The experiment trackers, one class each over accelerate's tracker classes: start (new or reattached), log, close.

`start(saved, step, key)` returns what to keep in trackers.json and the last step the tracker already holds, so
the caller sends each step exactly once: TensorBoard drops what a killed process logged after the checkpoint
(`purge_step`); W&B and MLflow keep everything, so what they hold is asked of them (the W&B server, the offline
files of the run, MLflow's metric history) and the steps they lack are sent again from metrics.jsonl.

`key` is this output dir's tracker key, kept in trackers.json before any tracker starts: a process killed after a
tracker created its run but before its id was saved leaves a run that the restart finds by it (the W&B run id is
the key; an MLflow run carries it as a tag), so a restart never opens a second run.
"""

from __future__ import annotations

import json
import os
import struct
import zlib
from pathlib import Path
from typing import Protocol

from trainer.config.schema import Config
from trainer.run_dir import MLRUNS_DIR, TENSORBOARD_DIR, RunDir

DEFAULT_PROJECT = "spot-trainer"
KEY_TAG = "spot_trainer.key"


class Backend(Protocol):
    name: str

    def start(self, saved: dict | None, step: int, key: str) -> tuple[dict, int]:
        """Open a new tracker run (`saved` None) or reattach to it; (what to keep, last step it holds or -1)."""

    def log_config(self, config: dict) -> None: ...

    def log(self, values: dict, step: int) -> None: ...

    def close(self) -> None: ...


def _names(cfg: Config, run: RunDir) -> tuple[str, str]:
    lg = cfg.logging
    return lg.project or DEFAULT_PROJECT, lg.run_name or run.root.resolve().name


class TensorBoard:
    name = "tensorboard"

    def __init__(self, cfg: Config, run: RunDir):
        self.cfg, self.run, self.tracker = cfg, run, None

    def start(self, saved: dict | None, step: int, key: str) -> tuple[dict, int]:
        from accelerate.tracking import TensorBoardTracker

        # event files are flushed at every log, so a reattached run holds every step up to its checkpoint; the
        # START event at purge_step hides, when read, whatever a killed process wrote from that step on
        held = step if saved is not None else -1
        kw = {**self.cfg.logging.init_kwargs.get("tensorboard", {}), "purge_step": held + 1}
        self.tracker = TensorBoardTracker("", str(self.run.root / TENSORBOARD_DIR), **kw)
        self.tracker.start()
        return {"log_dir": TENSORBOARD_DIR}, held

    def log_config(self, config: dict) -> None:
        import yaml

        text = "".join(f"    {line}\n" for line in yaml.safe_dump(config, sort_keys=False).splitlines())
        self.tracker.writer.add_text("config", text, global_step=0)
        self.tracker.writer.flush()

    def log(self, values: dict, step: int) -> None:
        self.tracker.log(values, step=step)  # flushed

    def close(self) -> None:
        self.tracker.finish()


class WandB:
    name = "wandb"

    def __init__(self, cfg: Config, run: RunDir):
        self.cfg, self.run, self.tracker = cfg, run, None

    def start(self, saved: dict | None, step: int, key: str) -> tuple[dict, int]:
        import wandb  # noqa: F401  (missing: the caller warns and goes on without it)
        from accelerate.tracking import WandBTracker

        lg = self.cfg.logging
        project, name = _names(self.cfg, self.run)
        run_id = saved["run_id"] if saved else key  # a run a killed process created under the key is the same run
        kw = dict(lg.init_kwargs.get("wandb", {}))
        if "WANDB_DIR" not in os.environ:
            kw.setdefault("dir", str(self.run.root))  # wandb/ (offline runs, logs) inside the output dir
        self.tracker = WandBTracker(project, id=run_id, resume="allow", name=name, tags=lg.tags or None, **kw)
        self.tracker.start()
        wb = self.tracker.run
        held = wb.step - 1  # online: the server's next step after a resume (0 for a new run)
        if wb.offline:  # resuming is not possible offline: each process writes a file of its own
            current = Path(wb.settings.sync_file).resolve()
            files = Path(wb.settings.sync_dir).parent.glob(f"offline-run-*/run-{run_id}.wandb")
            held = max([-1] + [s for f in files if f.resolve() != current for s in wandb_history_steps(f)])
        return {"run_id": run_id}, held

    def log_config(self, config: dict) -> None:
        self.tracker.store_init_configuration(config)

    def log(self, values: dict, step: int) -> None:
        self.tracker.log(values, step=step)

    def close(self) -> None:
        self.tracker.finish()


class MLflow:
    name = "mlflow"
    blocking = True  # every call is a request to the tracking server: run on a thread of its own

    def __init__(self, cfg: Config, run: RunDir):
        self.cfg, self.run, self.tracker, self.found = cfg, run, None, False

    def start(self, saved: dict | None, step: int, key: str) -> tuple[dict, int]:
        import mlflow
        from accelerate.tracking import MLflowTracker

        lg = self.cfg.logging
        kw = dict(lg.init_kwargs.get("mlflow", {}))
        uri = kw.pop("tracking_uri", None) or os.environ.get("MLFLOW_TRACKING_URI")
        uri = uri or (self.run.root.resolve() / MLRUNS_DIR).as_uri()
        if uri.startswith("file:") or "://" not in uri:  # MLflow 3 wants this opt-in for a file store
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
        mlflow.set_tracking_uri(uri)
        project, name = _names(self.cfg, self.run)
        tags = {t: "true" for t in lg.tags}
        experiment = os.environ.get("MLFLOW_EXPERIMENT_NAME", project)  # as accelerate's MLflowTracker reads it
        found = self._run_with_key(mlflow, experiment, key, tags, kw.get("logging_dir")) if not saved else None
        run_id = saved["run_id"] if saved else found
        self.found = run_id is not None
        tags = {**tags, KEY_TAG: key}  # on the run; the experiment (made above) holds the user's tags only
        self.tracker = MLflowTracker(experiment_name=project, run_id=run_id, tags=tags, run_name=name, **kw)
        self.tracker.start()
        if run_id is None:  # MLFLOW_TAGS in the environment replaces the tags given: the key goes on after
            mlflow.set_tag(KEY_TAG, key)
            return {"run_id": self.tracker.active_run.info.run_id}, -1
        history = mlflow.MlflowClient().get_metric_history(run_id, "loss")
        return {"run_id": run_id}, max([-1] + [m.step for m in history])

    @staticmethod
    def _run_with_key(mlflow, project: str, key: str, tags: dict, artifacts: str | None) -> str | None:
        """The run a killed process of this output dir created before it could save the run's id, if any; makes
        the experiment if there is none."""
        try:
            experiment = mlflow.get_experiment_by_name(project)
            if experiment is None:
                mlflow.create_experiment(project, artifact_location=artifacts, tags=tags or None)
                return None
            runs = mlflow.MlflowClient().search_runs(
                [experiment.experiment_id], f"tags.`{KEY_TAG}` = '{key}'", max_results=2
            )
        except Exception:  # noqa: BLE001 (a file store with a run a kill left half-written: a new run, as before)
            return None
        return runs[0].info.run_id if len(runs) == 1 else None

    def log_config(self, config: dict) -> None:
        if not self.found:  # a found run has them (MLflow refuses a parameter logged twice with another value)
            self.tracker.store_init_configuration(_flatten(config))

    def log(self, values: dict, step: int) -> None:
        self.tracker.log(values, step=step)

    def close(self) -> None:
        self.tracker.finish()


BACKENDS = {"tensorboard": TensorBoard, "wandb": WandB, "mlflow": MLflow}


def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict) and v:
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v if isinstance(v, (int, float, str, bool)) or v is None else json.dumps(v)
    return out


# ---------------------------------------------------------------- W&B's run file, read back

_BLOCK, _HEADER = 32768, 7  # a LevelDB log: 32 KiB blocks of records, each (crc32, length, type) + data
_FULL, _FIRST, _MIDDLE, _LAST = 1, 2, 3, 4


def wandb_records(path: str | os.PathLike):
    """The records (serialized wandb Record protos) of a `.wandb` file, up to a torn or damaged tail."""
    data = Path(path).read_bytes()
    if data[:4] != b":W&B":
        return
    pos, parts = _HEADER, []  # the file's own 7-byte header opens the first block
    while pos + _HEADER <= len(data):
        left = _BLOCK - pos % _BLOCK
        if left < _HEADER:  # the tail of a block too short for a record header is padding
            pos += left
            continue
        crc, length, kind = struct.unpack("<IHB", data[pos : pos + _HEADER])
        chunk = data[pos + _HEADER : pos + _HEADER + length]
        if kind == 0 or len(chunk) < length or zlib.crc32(chunk, zlib.crc32(bytes([kind]))) != crc:
            return  # zeros past the last write, or a record cut by a kill
        pos += _HEADER + length
        if kind == _FULL:
            yield chunk
        elif kind == _FIRST:
            parts = [chunk]
        elif kind == _MIDDLE:
            parts.append(chunk)
        elif kind == _LAST:
            yield b"".join(parts + [chunk])
            parts = []


def wandb_history(path: str | os.PathLike) -> list[dict]:
    """The history rows of a `.wandb` file ({"_step": ..., key: value}), in the order written."""
    from wandb.proto import wandb_internal_pb2

    rows = []
    for raw in wandb_records(path):
        rec = wandb_internal_pb2.Record()
        rec.ParseFromString(raw)
        if rec.WhichOneof("record_type") == "history":
            rows.append({i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in rec.history.item})
    return rows


def wandb_history_steps(path: str | os.PathLike) -> list[int]:
    return [int(r["_step"]) for r in wandb_history(path) if "_step" in r]
