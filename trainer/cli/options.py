"""What every command takes (CONFIG, --set, --output-dir, --debug) and how it fails: one line for a person, a
traceback only with --debug. Imported by both command modules (main, ckpt), so neither imports the other."""

from __future__ import annotations

import functools
import json
import logging
import os
import sys
from pathlib import Path

import click

from trainer.config.loader import config_from_dict, load_config
from trainer.config.schema import Config
from trainer.errors import SpotTrainerError
from trainer.run_dir import FINAL_META, RunDir


def setup_logging(debug: bool) -> None:
    # warnings and errors only: the run prints its own progress lines; --debug shows everything
    logging.basicConfig(level=logging.DEBUG if debug else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    for noisy in ("botocore", "boto3", "urllib3", "s3transfer", "filelock", "datasets", "httpx"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    if not debug:  # bitsandbytes warns at import on CPU about an optional kernel package
        logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    if not debug:
        os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
        os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
        if not os.path.exists("/dev/nvidiactl"):  # no NVIDIA driver: spare users DeepSpeed's detection warning
            os.environ.setdefault("DS_ACCELERATOR", "cpu")
        import warnings

        warnings.filterwarnings("ignore")


def run_cli(fn):
    """Run a command body: our errors -> one line + their exit code; others -> traceback (a bug)."""

    @functools.wraps(fn)
    def wrapper(*args, debug: bool = False, **kwargs):
        setup_logging(debug)
        try:
            code = fn(*args, **kwargs)
        except SpotTrainerError as e:
            if debug:
                raise
            click.echo(f"error: {e}", err=True)
            sys.exit(e.exit_code)
        except KeyboardInterrupt:
            click.echo("interrupted", err=True)
            sys.exit(130)
        sys.exit(code or 0)

    return wrapper


def config_options(fn):
    """CONFIG (optional), --set key=value (repeatable), --output-dir, --debug: on every command."""
    fn = click.option("--debug", is_flag=True, help="Show tracebacks.")(fn)
    fn = click.option(
        "--output-dir",
        "output_dir",
        type=click.Path(file_okay=False),
        default=None,
        help="Output directory (overrides output_dir in the config).",
    )(fn)
    fn = click.option(
        "--set",
        "overrides",
        multiple=True,
        metavar="KEY=VALUE",
        help="Override a config key, e.g. --set train.max_steps=50 (repeatable).",
    )(fn)
    fn = click.argument("config", required=False)(fn)
    return fn


def resolve_run_dir(target, overrides, output_dir) -> tuple[Path, Config]:
    """A command's positional arg may be a run's output dir (report/export) or a CONFIG; returns (dir, config)."""
    if target and Path(target).is_dir():
        snap = RunDir(target).final / FINAL_META
        if snap.exists() and not overrides:
            return Path(target), config_from_dict(json.loads(snap.read_text())["config"])
        return Path(target), load_config(None, list(overrides), str(target))
    cfg = load_config(target, list(overrides), output_dir)
    return Path(cfg.output_dir), cfg
