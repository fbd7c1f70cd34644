"""The `spot-trainer` group and the run commands: train, run, export, plan, report, presets (ckpt: ckpt.py)."""

from __future__ import annotations

from pathlib import Path

import click

from trainer.checkpoint import signing
from trainer.cli.ckpt import ckpt
from trainer.cli.options import config_options, resolve_run_dir, run_cli
from trainer.config.loader import list_presets, load_config, preset_cards
from trainer.errors import ConfigError


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="spot-trainer")
def main():
    """Fine-tune LLMs on spot GPUs: a preemption costs seconds, never the run.

    CONFIG is a YAML file or a preset name (see `spot-trainer presets`); none = the default preset.
    """


@main.command()
@config_options
@click.option(
    "--resume",
    default="auto",
    show_default=True,
    metavar="auto|never|PATH",
    help="auto: newest verified checkpoint (local or remote); never: start over (refused over committed "
    "checkpoints unless --archive-existing); PATH: that checkpoint (later ones are archived).",
)
@click.option(
    "--archive-existing",
    is_flag=True,
    help="With --resume never: move existing checkpoints (local and remote) to checkpoints/archived/.",
)
@run_cli
def train(config, overrides, output_dir, resume, archive_existing):
    """Train (one process, or one rank under `accelerate launch`)."""
    cfg = load_config(config, list(overrides), output_dir)
    signer = signing.from_config(cfg.checkpoint)  # now: an unset key variable fails before any work
    if archive_existing and resume != "never":
        raise ConfigError(
            "--archive-existing goes with --resume never (starting over); with --resume auto the "
            "existing checkpoints are resumed"
        )
    if resume not in ("auto", "never"):
        from trainer.checkpoint.manifest import verify

        problems = verify(resume, signer=signer)
        if problems:
            raise ConfigError(f"--resume {resume}: not a valid checkpoint ({problems[0]})")
    from trainer.loop import run_training

    return run_training(cfg, resume, archive_existing)


@main.command()
@config_options
@run_cli
def run(config, overrides, output_dir):
    """Supervise training: restart after crashes and hangs, resume, exit 75 when preempted."""
    cfg = load_config(config, list(overrides), output_dir)
    signing.from_config(cfg.checkpoint)  # the trainer needs the key: an unset variable fails here, not restarting
    from trainer.spot.supervisor import run_supervisor

    return run_supervisor(cfg, config, list(overrides), cfg.output_dir)


@main.command()
@config_options
@click.option("--merge", is_flag=True, help="Merge the adapter into the base model's weights (LoRA/QLoRA).")
@click.option(
    "--to",
    "to",
    default=None,
    metavar="DIR|s3://...|file://...",
    help="Where to write it (default: <output_dir>/export).",
)
@click.option(
    "--overwrite", is_flag=True, help="Replace a non-empty --to DIR that is not an earlier export of this run."
)
@run_cli
def export(config, overrides, output_dir, merge, to, overwrite):
    """Export final/: the adapter as is, or merged into the base model, loadable by transformers."""
    from trainer.export import export as do_export
    from trainer.export import run_config

    run_dir, cfg, source = run_config(config, list(overrides), output_dir)  # never final/'s copy of the config
    where = do_export(run_dir, to, merge, cfg, source, overwrite=overwrite, say=lambda m: click.echo(m, err=True))
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
@click.option(
    "--restart-latency",
    "restart_latency_s",
    type=float,
    default=300.0,
    show_default=True,
    help="Seconds from a preemption to training again on a new pod.",
)
@click.option("--efficiency", type=float, default=None, help="Fraction of peak FLOP/s to assume.")
@run_cli
def plan(
    config,
    overrides,
    output_dir,
    gpu,
    num_gpus,
    dataset_tokens,
    dataset_rows,
    price_per_hour,
    spot_price_per_hour,
    prices_path,
    preemptions_per_day,
    restart_latency_s,
    efficiency,
):
    """Before a run: will it fit on my GPU (memory by component), how long, what will it cost (spot vs on-demand)."""
    cfg = load_config(config, list(overrides), output_dir)
    from trainer.plan.planner import make_plan
    from trainer.plan.render import render_plan

    if dataset_rows is None and dataset_tokens is None and cfg.data.path == "builtin:tasks":
        dataset_rows = cfg.data.builtin.num_train
    p = make_plan(
        cfg,
        gpu,
        num_gpus,
        dataset_tokens,
        dataset_rows=dataset_rows,
        price_per_hour=price_per_hour,
        spot_price_per_hour=spot_price_per_hour,
        prices_path=prices_path,
        efficiency=efficiency,
        preemptions_per_day=preemptions_per_day,
        restart_latency_s=restart_latency_s,
    )
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
    from trainer.report import build_report, plot_report, render_report

    click.echo(render_report(build_report(run_dir, price_per_hour)))
    if not no_plot:
        png = plot_report(run_dir, Path(plot_path) if plot_path else run_dir / "report.png")
        click.echo(f"plot: {png}")
    return 0


@main.command()
@config_options
@run_cli
def presets(config, overrides, output_dir):
    """List the built-in presets, each with the GPU it is sized for (CONFIG given: print it resolved, with
    overrides applied)."""
    if config or overrides:
        click.echo(load_config(config, list(overrides), output_dir).to_yaml(), nl=False)
        return 0
    names, cards = list_presets(), preset_cards()
    width = max(map(len, names))
    card_width = max(len(card) for card in cards.values())
    for name, desc in names.items():
        click.echo(f"{name:{width}s}  {cards[name] or '-':{card_width}s}  {desc}")
    return 0


main.add_command(ckpt)


if __name__ == "__main__":
    main()
