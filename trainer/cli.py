"""The `spot-trainer` command line. Errors for people are one line; tracebacks only with --debug."""

from __future__ import annotations

import functools
import logging
import os
import sys
from pathlib import Path

import click

from .config import list_presets, load_config
from .errors import ConfigError, SpotTrainerError


def _setup_logging(debug: bool) -> None:
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
        _setup_logging(debug)
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
    fn = click.option("--output-dir", "output_dir", type=click.Path(file_okay=False), default=None,
                      help="Output directory (overrides output_dir in the config).")(fn)
    fn = click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE",
                      help="Override a config key, e.g. --set train.max_steps=50 (repeatable).")(fn)
    fn = click.argument("config", required=False)(fn)
    return fn


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="spot-trainer")
def main():
    """Fine-tune LLMs on spot GPUs: a preemption costs seconds, never the run.

    CONFIG is a YAML file or a preset name (see `spot-trainer presets`); none = the default preset.
    """


@main.command()
@config_options
@click.option("--resume", default="auto", show_default=True, metavar="auto|never|PATH",
              help="auto: newest verified checkpoint (local or remote); never: start over; PATH: that checkpoint.")
@run_cli
def train(config, overrides, output_dir, resume):
    """Train (one process, or one rank under `accelerate launch`)."""
    cfg = load_config(config, list(overrides), output_dir)
    if resume not in ("auto", "never"):
        from .manifest import verify

        problems = verify(resume)
        if problems:
            raise ConfigError(f"--resume {resume}: not a valid checkpoint ({problems[0]})")
    from .loop import run_training

    return run_training(cfg, resume)


@main.command()
@config_options
@run_cli
def run(config, overrides, output_dir):
    """Supervise training: restart after crashes and hangs, resume, exit 75 when preempted."""
    cfg = load_config(config, list(overrides), output_dir)
    from .supervisor import run_supervisor

    return run_supervisor(cfg, config, list(overrides), cfg.output_dir)


def resolve_run_dir(target, overrides, output_dir) -> tuple[Path, object]:
    """A command's positional arg may be a run's output dir (report/export) or a CONFIG; returns (dir, config)."""
    if target and Path(target).is_dir():
        snap = Path(target) / "final" / "spot_trainer.json"
        if snap.exists() and not overrides:
            import json

            from .config import config_from_dict

            return Path(target), config_from_dict(json.loads(snap.read_text())["config"])
        return Path(target), load_config(None, list(overrides), str(target))
    cfg = load_config(target, list(overrides), output_dir)
    return Path(cfg.output_dir), cfg


@main.command()
@config_options
@click.option("--merge", is_flag=True, help="Merge the adapter into the base model's weights (LoRA/QLoRA).")
@click.option("--to", "to", default=None, metavar="DIR|s3://...|file://...",
              help="Where to write it (default: <output_dir>/export).")
@run_cli
def export(config, overrides, output_dir, merge, to):
    """Export final/: the adapter as is, or merged into the base model, loadable by transformers."""
    run_dir, cfg = resolve_run_dir(config, overrides, output_dir)
    from .export import export as do_export

    where = do_export(run_dir, to, merge, cfg.checkpoint.s3)
    click.echo(f"exported {'merged model' if merge else 'final/'} to {where}")
    return 0


@main.command()
@config_options
@click.option("--gpu", default=None, help="GPU name (e.g. 4090, 'RTX 4070 Ti', A100-80GB, H100); default: all.")
@click.option("--gpus", "num_gpus", type=int, default=1, show_default=True, help="Number of GPUs.")
@click.option("--dataset-tokens", type=int, default=None, help="Tokens in the dataset (default: estimated).")
@click.option("--dataset-rows", type=int, default=None, help="Rows in the dataset (used to estimate tokens).")
@click.option("--price-per-hour", type=float, default=None, help="On-demand price per GPU-hour (USD).")
@click.option("--spot-price-per-hour", type=float, default=None, help="Spot price per GPU-hour (USD).")
@click.option("--prices", "prices_path", default=None, help="A price table YAML (default: the built-in one).")
@click.option("--preemptions-per-day", type=float, default=2.0, show_default=True)
@click.option("--restart-latency", "restart_latency_s", type=float, default=300.0, show_default=True,
              help="Seconds from a preemption to training again on a new pod.")
@click.option("--efficiency", type=float, default=None, help="Fraction of peak FLOP/s to assume.")
@run_cli
def plan(config, overrides, output_dir, gpu, num_gpus, dataset_tokens, dataset_rows, price_per_hour,
         spot_price_per_hour, prices_path, preemptions_per_day, restart_latency_s, efficiency):
    """Before a run: will it fit on my GPU (memory by component), how long, what will it cost (spot vs on-demand)."""
    cfg = load_config(config, list(overrides), output_dir)
    from .plan import make_plan, render_plan

    if dataset_rows is None and dataset_tokens is None and cfg.data.path == "builtin:tasks":
        dataset_rows = cfg.data.builtin.num_train
    p = make_plan(cfg, gpu, num_gpus, dataset_tokens, dataset_rows=dataset_rows, price_per_hour=price_per_hour,
                  spot_price_per_hour=spot_price_per_hour, prices_path=prices_path, efficiency=efficiency,
                  preemptions_per_day=preemptions_per_day, restart_latency_s=restart_latency_s)
    click.echo(render_plan(p))
    return 0


@main.command()
@config_options
@click.option("--price-per-hour", type=float, default=None, help="Price per GPU-hour (USD), for the cost line.")
@click.option("--plot", "plot_path", default=None, help="PNG path (default: OUTPUT_DIR/report.png).")
@click.option("--no-plot", is_flag=True, help="Do not write the PNG.")
@run_cli
def report(config, overrides, output_dir, price_per_hour, plot_path, no_plot):
    """After a run: wall vs useful time, goodput, restarts by cause, tokens/s, cost, and a loss plot."""
    run_dir, _ = resolve_run_dir(config, overrides, output_dir)
    from .report import build_report, plot_report, render_report

    click.echo(render_report(build_report(run_dir, price_per_hour)))
    if not no_plot:
        png = plot_report(run_dir, Path(plot_path) if plot_path else run_dir / "report.png")
        click.echo(f"plot: {png}")
    return 0


@main.command()
@config_options
@run_cli
def presets(config, overrides, output_dir):
    """List the built-in presets (CONFIG given: print it resolved, with overrides applied)."""
    if config or overrides:
        click.echo(load_config(config, list(overrides), output_dir).to_yaml(), nl=False)
        return 0
    for name, desc in list_presets().items():
        click.echo(f"{name:10s} {desc}")
    return 0

from .cli_ckpt import ckpt  # noqa: E402  (kept in its own module: it is a group of its own)

main.add_command(ckpt)


if __name__ == "__main__":
    main()
