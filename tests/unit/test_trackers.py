"""trainer.trackers: one tracker run per output dir, each step sent once across restarts, failures cost one warning.

A "process" here is a Trackers opened on the run dir, fed by a MetricsLog as the loop feeds it; a killed one is
one that is never closed (TensorBoard) or whose tracker lost the tail (W&B, MLflow).
"""

from __future__ import annotations

import json
import logging
import sys
import threading
import time
from collections import Counter

import pytest

from trainer.config.loader import config_from_dict, load_config
from trainer.errors import ConfigError
from trainer.metrics import MetricsLog
from trainer.run_dir import RunDir
from trainer.trackers import Trackers


@pytest.fixture(autouse=True)
def accelerate_state():
    from accelerate import PartialState

    PartialState(cpu=True)  # the trainer's Accelerator makes it; accelerate's trackers log through it


def config(out, report_to, **logging_kw):
    return config_from_dict({"output_dir": str(out), "logging": {"report_to": report_to, **logging_kw}})


def process(cfg, resumed_from: int, steps, reattach: bool = True) -> Trackers:
    """Open the trackers as a process resumed at `resumed_from` does (metrics.jsonl rewound first), log `steps`."""
    run = RunDir(cfg.output_dir)
    run.root.mkdir(parents=True, exist_ok=True)
    metrics = MetricsLog(run.metrics, enabled=True)
    metrics.rewind(None, resumed_from)
    trackers = Trackers.open(cfg, run, resumed_from, reattach=reattach)
    metrics.sink = trackers.log
    for s in steps:
        metrics.write(step=s, loss=100.0 + s, lr=1e-3, tokens=7)
        if s % 4 == 0:
            metrics.write(step=s, eval_loss=50.0 + s)
    return trackers


def tb_scalars(out, tag):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(out / "tensorboard"))
    acc.Reload()
    return [(e.step, e.value) for e in acc.Scalars(tag)] if tag in acc.Tags()["scalars"] else []


# ---------------------------------------------------------------- config


def test_config_names_unknown_trackers_and_refuses_secrets(tmp_path):
    cfg = load_config(None, ["logging.report_to=[wandb, tensorboard]", "logging.init_kwargs.wandb.entity=team"])
    assert cfg.logging.report_to == ["wandb", "tensorboard"] and cfg.logging.init_kwargs == {
        "wandb": {"entity": "team"}
    }
    assert load_config(None, []).logging.report_to == []  # none by default
    cases = {
        "logging.report_to=[wandbb]": "logging.report_to[0]: 'wandbb' is not one of",
        "logging.init_kwargs.comet.x=1": "logging.init_kwargs: 'comet' is not one of",
        "logging.init_kwargs.wandb=3": "logging.init_kwargs.wandb: expected a mapping",
        "logging.init_kwargs.wandb.api_key=abc123": "logging.init_kwargs.wandb.api_key: secrets are not accepted",
        "logging.init_kwargs.wandb.id=x": "logging.init_kwargs.wandb.id: set by spot-trainer",
        "logging.init_kwargs.mlflow.tracking_uri=http://u:pw@host:5000": "the URI holds credentials",
    }
    for override, needle in cases.items():
        with pytest.raises(ConfigError) as e:
            load_config(None, [override])
        assert needle in str(e.value) and "\n" not in str(e.value), override
        assert "abc123" not in str(e.value) and "pw@" not in str(e.value)


# ---------------------------------------------------------------- TensorBoard


def test_tensorboard_killed_after_the_checkpoint_every_step_once(tmp_path):
    cfg = config(tmp_path, ["tensorboard"])
    process(cfg, 0, range(1, 8))  # killed at step 7 (never closed); its checkpoint is step 4
    process(cfg, 4, range(5, 11)).close()
    loss = tb_scalars(tmp_path, "loss")
    assert [s for s, _ in loss] == list(range(1, 11))
    assert [s for s, _ in tb_scalars(tmp_path, "eval_loss")] == [4, 8]
    assert tb_scalars(tmp_path, "restarts") == [(5, 1.0)]  # a marker on the first step after the restart
    assert json.loads((tmp_path / "trackers.json").read_text())["restarts"] == 1


def test_tensorboard_started_over_is_a_new_history(tmp_path):
    cfg = config(tmp_path, ["tensorboard"])
    process(cfg, 0, range(1, 8)).close()
    process(cfg, 0, range(1, 4), reattach=False).close()  # --resume never: step 1 again, the old steps hidden
    assert [s for s, _ in tb_scalars(tmp_path, "loss")] == [1, 2, 3]
    assert tb_scalars(tmp_path, "restarts") == []


# ---------------------------------------------------------------- MLflow


@pytest.fixture
def mlflow_store(tmp_path, monkeypatch):
    pytest.importorskip("mlflow")
    uri = (tmp_path / "mlruns").as_uri()
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    return uri


def mlflow_runs(uri):
    from mlflow import MlflowClient

    client = MlflowClient(uri)
    exps = client.search_experiments()
    runs = [r for e in exps for r in client.search_runs([e.experiment_id])]
    return client, runs


@pytest.mark.parametrize("held_by_killed", [7, 2], ids=["held-past-checkpoint", "tail-lost"])
def test_mlflow_one_run_each_step_once(tmp_path, mlflow_store, held_by_killed):
    cfg = config(tmp_path / "run", ["mlflow"], project="exp")
    first = process(cfg, 0, range(1, 8))
    first.close()
    client, (run,) = mlflow_runs(mlflow_store)
    if held_by_killed < 7:  # the killed process's tracker never got steps 3..7 (a lost connection, a buffer)
        (run_dir,) = (tmp_path / "mlruns").glob(f"*/{run.info.run_id}")
        path = run_dir / "metrics" / "loss"
        path.write_text("".join(ln + "\n" for ln in path.read_text().splitlines() if int(ln.split()[2]) <= 2))
    process(cfg, 4, range(5, 11)).close()
    client, runs = mlflow_runs(mlflow_store)
    assert [r.info.run_id for r in runs] == [run.info.run_id]  # the same run, reattached
    steps = [m.step for m in client.get_metric_history(run.info.run_id, "loss")]
    assert sorted(steps) == list(range(1, 11)), Counter(steps)
    restarts = client.get_metric_history(run.info.run_id, "restarts")
    assert [(m.step, m.value) for m in restarts] == [(5 if held_by_killed < 5 else 8, 1.0)]
    assert client.get_run(run.info.run_id).data.params["train.lr"] == "0.0002"  # the config, logged once


def forget(run_dir, tracker):
    """trackers.json as a process left it when killed after `tracker` created its run but before it saved its id."""
    path = run_dir / "trackers.json"
    state = json.loads(path.read_text())
    del state[tracker]
    path.write_text(json.dumps(state))


@pytest.mark.parametrize("env", [{}, {"MLFLOW_TAGS": '{"team": "x"}', "MLFLOW_EXPERIMENT_NAME": "other"}])
def test_mlflow_killed_before_its_run_id_was_saved_is_still_one_run(tmp_path, mlflow_store, monkeypatch, env):
    for k, v in env.items():  # accelerate's MLflowTracker reads these over what it is given
        monkeypatch.setenv(k, v)
    cfg = config(tmp_path / "run", ["mlflow"], project="exp")
    process(cfg, 0, range(1, 8)).close()
    forget(tmp_path / "run", "mlflow")
    process(cfg, 4, range(5, 11)).close()
    client, runs = mlflow_runs(mlflow_store)
    (run,) = runs  # found by the output dir's key, not a second run
    assert json.loads((tmp_path / "run" / "trackers.json").read_text())["mlflow"]["run_id"] == run.info.run_id
    steps = [m.step for m in client.get_metric_history(run.info.run_id, "loss")]
    assert sorted(steps) == list(range(1, 11)), Counter(steps)
    process(config(tmp_path / "other", ["mlflow"], project="exp"), 0, range(1, 3)).close()
    assert len(mlflow_runs(mlflow_store)[1]) == 2  # another output dir (another key) is another run


# ---------------------------------------------------------------- W&B (offline)


@pytest.fixture
def wandb_offline(tmp_path, monkeypatch):
    wandb = pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path / "wandb-dir"))
    monkeypatch.setenv("WANDB_SILENT", "true")
    (tmp_path / "wandb-dir").mkdir()
    yield tmp_path / "wandb-dir" / "wandb"
    wandb.teardown()  # its settings (WANDB_DIR) are read once a process; a trainer process has one run


def wandb_files(wandb_dir, run_id):
    return sorted(wandb_dir.glob(f"offline-run-*/run-{run_id}.wandb"))


@pytest.mark.slow
@pytest.mark.parametrize(
    "kept_by_killed, id_saved",
    [(7, True), (0, True), (7, False)],
    ids=["file-holds-past-checkpoint", "file-lost", "killed-before-the-id-was-saved"],
)
def test_wandb_offline_same_run_each_step_once(tmp_path, wandb_offline, kept_by_killed, id_saved):
    import wandb

    from trainer.tracker_backends import wandb_history, wandb_history_steps

    cfg = config(tmp_path / "run", ["wandb"])
    process(cfg, 0, range(1, 8)).close()
    wandb.teardown()  # its service writes the files; a trainer process exits here
    run_id = json.loads((tmp_path / "run" / "trackers.json").read_text())["wandb"]["run_id"]
    (first,) = wandb_files(wandb_offline, run_id)
    assert wandb_history_steps(first) == list(range(1, 8))
    if not kept_by_killed:  # SIGKILL before W&B flushed its file (it does every 15 s): the header only
        first.write_bytes(first.read_bytes()[:7])
    if not id_saved:
        forget(tmp_path / "run", "wandb")
    process(cfg, 4, range(5, 11)).close()
    wandb.teardown()
    assert json.loads((tmp_path / "run" / "trackers.json").read_text())["wandb"]["run_id"] == run_id
    files = wandb_files(wandb_offline, run_id)
    assert len(files) == 2
    steps = [s for f in files for s in wandb_history_steps(f)]
    assert sorted(steps) == list(range(1, 11)), Counter(steps)
    rows = {r["_step"]: r for f in files for r in wandb_history(f)}
    assert rows[4]["eval_loss"] == 54 and rows[4]["loss"] == 104  # the eval of a step, in the same row
    assert rows[5 if not kept_by_killed else 8]["restarts"] == 1


def test_wandb_file_reader_stops_at_a_torn_tail(tmp_path, wandb_offline):
    import wandb

    from trainer.tracker_backends import wandb_history_steps

    run = wandb.init(project="p", id="reader1")
    for s in range(1, 2001):
        run.log({"loss": 1.0 / s, f"k{s % 5}": s}, step=s)
    run.finish()
    wandb.teardown()
    (path,) = wandb_files(wandb_offline, "reader1")
    assert wandb_history_steps(path) == list(range(1, 2001))  # many 32 KiB blocks, records spanning them
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    steps = wandb_history_steps(path)
    assert steps == list(range(1, len(steps) + 1)) and 100 < len(steps) < 2000


# ---------------------------------------------------------------- failures: one warning, the run goes on


def test_missing_tracker_one_warning_the_others_go_on(tmp_path, monkeypatch, caplog):
    monkeypatch.setitem(sys.modules, "wandb", None)  # `import wandb` raises ImportError, as when not installed
    cfg = config(tmp_path, ["wandb", "tensorboard"])
    with caplog.at_level(logging.WARNING, logger="trainer.trackers"):
        process(cfg, 0, range(1, 5)).close()
    warnings = [r.getMessage() for r in caplog.records if r.name == "trainer.trackers"]
    assert len(warnings) == 1 and "tracker wandb is not installed" in warnings[0], warnings
    assert [s for s, _ in tb_scalars(tmp_path, "loss")] == [1, 2, 3, 4]
    assert "wandb" not in json.loads((tmp_path / "trackers.json").read_text())


def test_failing_tracker_at_start_and_at_log_costs_one_warning_each(tmp_path, monkeypatch, caplog):
    pytest.importorskip("mlflow")
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("")
    cfg = config(
        tmp_path / "run", ["mlflow", "tensorboard"], init_kwargs={"mlflow": {"tracking_uri": f"file://{blocker}/x"}}
    )
    with caplog.at_level(logging.WARNING, logger="trainer.trackers"):
        trackers = process(cfg, 0, range(1, 3))
        (tb,) = [t for t in trackers.runs if t.name == "tensorboard"]

        def broken(values, step):
            raise ConnectionError("http://user:hunter2@tracker.example/api: connection reset")

        monkeypatch.setattr(tb.backend, "log", broken)
        for s in (3, 4, 5):
            trackers.log({"step": s, "loss": 1.0})
        trackers.close()
    warnings = [r.getMessage() for r in caplog.records if r.name == "trainer.trackers"]
    assert len(warnings) == 2, warnings
    (ml,) = [w for w in warnings if "mlflow" in w]
    assert ml.startswith("tracker mlflow could not start") and "not-a-dir" in ml
    (tbw,) = [w for w in warnings if "tensorboard" in w]
    assert tbw.startswith("tracker tensorboard failed") and "goes on without it" in tbw and "hunter2" not in tbw
    assert trackers.runs == []


class SlowServer:
    """A tracker whose every call is a request to a server that takes `delay` s to answer, or hangs on `hang`."""

    name, blocking = "mlflow", True

    def __init__(self, cfg, run, delay=0.3, hang=None):
        self.delay, self.hang, self.logged, self.closed = delay, hang, [], False
        self.in_log = threading.Event()

    def start(self, saved, step, key):
        time.sleep(self.delay)
        return {"run_id": "r1"}, -1

    def log_config(self, config):
        time.sleep(self.delay)

    def log(self, values, step):
        self.in_log.set()
        if self.hang is not None:
            self.hang.wait()
        time.sleep(self.delay / 10)
        self.logged.append(step)

    def close(self):
        self.closed = True


def test_a_slow_tracker_server_never_holds_up_setup_or_a_step(tmp_path, monkeypatch):
    from trainer import tracker_backends

    made = []
    monkeypatch.setitem(tracker_backends.BACKENDS, "mlflow", lambda *a: made.append(SlowServer(*a)) or made[-1])
    cfg = config(tmp_path, ["mlflow"])
    t0 = time.monotonic()
    trackers = process(cfg, 0, range(1, 11))
    assert time.monotonic() - t0 < 0.3  # started, config sent and 10 steps logged by a thread of its own
    trackers.close()
    assert made[0].logged == [1, 2, 3, 4, 4, 5, 6, 7, 8, 8, 9, 10] and made[0].closed  # (eval at 4 and 8)
    assert json.loads((tmp_path / "trackers.json").read_text())["mlflow"] == {"run_id": "r1"}


def test_a_hung_tracker_server_falls_behind_and_is_dropped(tmp_path):
    from trainer.trackers import Background, TrackerRun, _Failed

    hang = threading.Event()
    server = SlowServer(None, None, delay=0, hang=hang)
    bg = Background(TrackerRun(server, None, 0, [], {}, {}, lambda name, state: None, "0" * 16), limit=3)
    bg.log({"loss": 1.0}, 1)
    assert server.in_log.wait(5)  # the request of step 1 never returns
    with pytest.raises(_Failed) as e:
        for s in range(2, 10):
            bg.log({"loss": 1.0}, s)
    assert e.value.what == "fell behind" and s == 5  # steps 2-4 fill the queue, step 5 is one too many
    with pytest.raises(TimeoutError):
        bg.close(timeout=0.2)  # the end of the run waits for it this long, no longer
    hang.set()
    bg.thread.join(5)
    assert server.logged == [1] and not server.closed  # what was queued after it failed is dropped
