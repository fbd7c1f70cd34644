"""`spot-trainer ckpt list|pull|push|verify|prune`: checkpoints on disk and in the remote."""

from __future__ import annotations

import time
from pathlib import Path

import click

from trainer.checkpoint.store import CheckpointStore
from trainer.cli.options import config_options, run_cli
from trainer.config.loader import load_config
from trainer.errors import ConfigError
from trainer.checkpoint.manifest import Manifest, verify


def _cfg(config, overrides, output_dir):
    return load_config(config, list(overrides), output_dir)


def _remote(cfg, uri: str | None):
    uri = uri or cfg.checkpoint.remote
    if not uri:
        return None
    from trainer.remote.store import open_store

    return open_store(uri, cfg.checkpoint.s3)


def _required_remote(cfg, command: str):
    remote = _remote(cfg, None)
    if remote is None:
        raise ConfigError(f"{command}: set checkpoint.remote (e.g. --set checkpoint.remote=s3://bucket/run)")
    return remote


def _deleted(where: str, steps: list[int]) -> str:
    return f"{where}: deleted {len(steps)} checkpoint(s)" + (f": {', '.join(map(str, steps))}" if steps else "")


def _fmt_size(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


@click.group()
def ckpt():
    """List, pull, push, verify and prune checkpoints."""


@ckpt.command("list")
@config_options
@click.option("--remote", "remote_uri", default=None, help="Remote URI (default: checkpoint.remote).")
@click.option("--deep/--shallow", default=False, help="Re-hash local files to verify them.")
@run_cli
def list_cmd(config, overrides, output_dir, remote_uri, deep):
    """Step, time, size, where (local/remote/both) and whether it verifies."""
    cfg = _cfg(config, overrides, output_dir)
    store = CheckpointStore(cfg.output_dir)
    rows: dict[int, dict] = {}
    for step in store.committed_steps():
        m = Manifest.load(store.path(step))
        ok = not verify(store.path(step), deep=deep)
        rows[step] = {"time": m.created_at, "size": m.total_bytes, "local": True, "remote": False,
                      "verified": ("yes" if deep else "manifest") if ok else "NO", "kind": m.kind}
    remote = _remote(cfg, remote_uri)
    if remote is not None:
        for step in remote.committed_steps():
            m = remote.get_manifest(step)
            r = rows.setdefault(step, {"time": m.created_at, "size": m.total_bytes, "local": False,
                                       "verified": "remote", "kind": m.kind})
            r["remote"] = True
    if not rows:
        click.echo(f"no checkpoints in {store.root}" + (f" or {remote_uri or cfg.checkpoint.remote}" if remote else ""))
        return 0
    click.echo(f"{'step':>8}  {'time (UTC)':19}  {'size':>10}  {'kind':9}  {'where':6}  verified")
    for step in sorted(rows):
        r = rows[step]
        where = "both" if r["local"] and r["remote"] else ("local" if r["local"] else "remote")
        ts = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(r["time"]))
        click.echo(f"{step:>8}  {ts}  {_fmt_size(r['size']):>10}  {r['kind']:9}  {where:6}  {r['verified']}")
    return 0


@ckpt.command("verify")
@config_options
@click.option("--step", type=int, default=None, help="Only this step (default: all local checkpoints).")
@run_cli
def verify_cmd(config, overrides, output_dir, step):
    """Re-hash every file of local checkpoints against their manifests (exit 1 if any fails)."""
    cfg = _cfg(config, overrides, output_dir)
    store = CheckpointStore(cfg.output_dir)
    steps = [step] if step is not None else store.committed_steps()
    if not steps:
        raise ConfigError(f"{store.root}: no committed checkpoints to verify")
    bad = 0
    for s in steps:
        problems = verify(store.path(s), deep=True)
        click.echo(f"step {s}: " + ("ok" if not problems else "; ".join(problems)))
        bad += bool(problems)
    return 1 if bad else 0


@ckpt.command("prune")
@config_options
@click.option("--keep-last", type=int, default=None, help="Keep this many (default: checkpoint.keep_last).")
@click.option("--remote/--no-remote", "also_remote", default=False, help="Also prune the remote.")
@run_cli
def prune_cmd(config, overrides, output_dir, keep_last, also_remote):
    """Delete all but the newest N checkpoints (never the newest)."""
    cfg = _cfg(config, overrides, output_dir)
    keep = keep_last if keep_last is not None else cfg.checkpoint.keep_last
    if not keep or keep < 1:
        raise ConfigError("--keep-last: must be >= 1")
    gone = CheckpointStore(cfg.output_dir).prune(keep)
    click.echo(_deleted("local", gone))
    if also_remote:
        remote = _required_remote(cfg, "ckpt prune --remote")
        doomed = remote.prune(keep)  # also removes abandoned partial uploads
        click.echo(_deleted("remote", doomed))
    return 0


@ckpt.command("pull")
@config_options
@click.option("--step", type=int, default=None, help="This step (default: the newest that verifies).")
@run_cli
def pull_cmd(config, overrides, output_dir, step):
    """Download a checkpoint from the remote into the output dir (sha256 verified)."""
    cfg = _cfg(config, overrides, output_dir)
    remote = _required_remote(cfg, "ckpt pull")
    store = CheckpointStore(cfg.output_dir)
    store.root.mkdir(parents=True, exist_ok=True)
    if step is None:
        got = remote.pull_latest(store.root, newer_than=None)
        if got is None:
            raise ConfigError(f"{cfg.checkpoint.remote}: no committed checkpoint")
        step, path = got
    else:
        path = remote.download_checkpoint(step, store.root)
    click.echo(f"pulled step {step} -> {path}")
    return 0


@ckpt.command("push")
@config_options
@click.option("--step", type=int, default=None, help="This step (default: every local one missing remotely).")
@run_cli
def push_cmd(config, overrides, output_dir, step):
    """Upload committed local checkpoints the remote does not have (manifest last)."""
    cfg = _cfg(config, overrides, output_dir)
    remote = _required_remote(cfg, "ckpt push")
    store = CheckpointStore(cfg.output_dir)
    have = set(remote.committed_steps())
    steps = [step] if step is not None else [s for s in store.committed_steps() if s not in have]
    for s in steps:
        problems = verify(store.path(s))
        if problems:
            click.echo(f"step {s}: not pushed, it does not verify ({problems[0]})", err=True)
            continue
        remote.upload_checkpoint(store.path(s))
        click.echo(f"pushed step {s}")
    if not steps:
        click.echo("nothing to push")
    return 0
