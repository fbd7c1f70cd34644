"""`spot-trainer ckpt list|pull|push|verify|prune`: checkpoints on disk and in the remote."""

from __future__ import annotations

import shutil
import time
from typing import TYPE_CHECKING

import click

from trainer.checkpoint import lineage, signing
from trainer.checkpoint.manifest import check, verify
from trainer.cli.options import config_options, run_cli
from trainer.config.loader import load_config
from trainer.errors import CheckpointError, ConfigError
from trainer.run_dir import ARCHIVED_DIR, LEGACY_RUN

if TYPE_CHECKING:
    from trainer.checkpoint.store import CheckpointStore


def _cfg(config, overrides, output_dir):
    return load_config(config, list(overrides), output_dir)


def _store(cfg) -> CheckpointStore:
    """The output dir's checkpoints; with checkpoint.sign_key_env, only signed ones count (ConfigError if unset)."""
    from trainer.checkpoint.store import CheckpointStore  # here: it imports torch, which `run` and `--help` need not

    return CheckpointStore(cfg.output_dir, signing.from_config(cfg.checkpoint))


def _remote(cfg, uri: str | None):
    uri = uri or cfg.checkpoint.remote
    if not uri:
        return None
    from trainer.remote.store import open_store

    return open_store(uri, cfg.checkpoint.s3, signing.from_config(cfg.checkpoint))


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
    """Step, time, size, kind, where (local/remote/both), lineage (run, seq, parent) and whether it verifies;
    then the archived (other lineages) and corrupt (moved aside) ones."""
    cfg = _cfg(config, overrides, output_dir)
    store = _store(cfg)
    good, bad = store.manifests()
    rows: dict[int, dict] = {}
    for step, m in good.items():
        ok = check(store.path(step), deep=deep).ok
        rows[step] = {
            "m": m,
            "local": True,
            "remote": False,
            "verified": ("yes" if deep else "manifest") if ok else "NO",
        }
    for step, verdict in bad.items():
        click.echo(f"step {step}: {verdict.problems[0]}", err=True)
    remote = _remote(cfg, remote_uri)
    remote_archived: dict = {}
    if remote is not None:
        manifests, problems = remote.committed()
        for step, m in manifests.items():
            r = rows.setdefault(step, {"m": m, "local": False, "verified": "remote"})
            r["remote"] = True
            if r["m"] != m:  # not the same checkpoint: show both
                r["verified"] += " (remote differs)"
        for problem in problems:
            click.echo(f"remote: {problem}", err=True)
        remote_archived = remote.archived()
    archived, corrupt = store.archived(), store.corrupt()
    if not (rows or archived or corrupt or remote_archived):
        click.echo(f"no checkpoints in {store.root}" + (f" or {remote_uri or cfg.checkpoint.remote}" if remote else ""))
        return 0
    if rows:
        head = lineage.newest({s: r["m"] for s, r in rows.items()})
        click.echo(
            f"{'step':>8}  {'time (UTC)':19}  {'size':>10}  {'kind':9}  {'where':6}  {'run':12}  {'seq':>5}  "
            f"{'parent':20}  verified"
        )
        for step in sorted(rows, key=lambda s: (rows[s]["m"].order, s)):
            r, m = rows[step], rows[step]["m"]
            where = "both" if r["local"] and r["remote"] else ("local" if r["local"] else "remote")
            parent = f"{m.parent.run_id or LEGACY_RUN}@{m.parent.step}" if m.parent else "-"
            mark = "  <- newest" if step == head else ""
            click.echo(
                f"{step:>8}  {_ts(m.created_at)}  {_fmt_size(m.total_bytes):>10}  {m.kind:9}  {where:6}  "
                f"{m.run_id or LEGACY_RUN:12}  {m.order:>5}  {parent:20}  {r['verified']}{mark}"
            )
    for run_id, dirs in archived.items():
        click.echo(f"archived (run {run_id}, another lineage): {', '.join(dirs)} in {store.root / 'archived' / run_id}")
    for run_id, steps in remote_archived.items():
        click.echo(f"archived remotely (run {run_id}): steps {', '.join(map(str, sorted(steps)))}")
    for path in corrupt:
        click.echo(f"corrupt (moved aside, kept): {path}")
    return 0


def _ts(t: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(t))


@ckpt.command("verify")
@config_options
@click.option("--step", type=int, default=None, help="Only this step (default: all local checkpoints).")
@run_cli
def verify_cmd(config, overrides, output_dir, step):
    """Re-hash every file of local checkpoints against their manifests and, with checkpoint.sign_key_env, check
    their signatures: signed, UNSIGNED or BAD SIGNATURE (exit 1 if any fails)."""
    cfg = _cfg(config, overrides, output_dir)
    store = _store(cfg)
    steps = [step] if step is not None else store.committed_steps()
    if not steps:
        raise ConfigError(f"{store.root}: no committed checkpoints to verify")
    bad = 0
    for s in steps:
        verdict = check(store.path(s), deep=True)
        sig, failed = _signature(verdict.manifest, store.signer)
        files = "ok" if verdict.ok else "; ".join(verdict.problems)
        click.echo(f"step {s}: " + (sig if failed else files + (f", {sig}" if sig else "")))
        bad += failed or not verdict.ok
    return 1 if bad else 0


def _signature(manifest, signer) -> tuple[str, bool]:
    """(what to say about a manifest's signature, whether that fails the check)."""
    if manifest is None:
        return "", False
    if signer is None:
        return ("signed, not checked (checkpoint.sign_key_env is not set)" if manifest.signature else ""), False
    problem = signer.problem(manifest)
    if problem is None:
        return f"signed (key {signer.key_id})", False
    return ("UNSIGNED: " if manifest.signature is None else "BAD SIGNATURE: ") + problem, True


@ckpt.command("prune")
@config_options
@click.option("--keep-last", type=int, default=None, help="Keep this many (default: checkpoint.keep_last).")
@click.option("--remote/--no-remote", "also_remote", default=False, help="Also prune the remote.")
@click.option(
    "--archived",
    "archived",
    is_flag=True,
    help="Delete the archived checkpoints (other lineages, under checkpoints/archived/) instead.",
)
@run_cli
def prune_cmd(config, overrides, output_dir, keep_last, also_remote, archived):
    """Keep the newest N checkpoints of the current lineage (never the newest); others are archived, not deleted.
    With --archived: delete the archived ones (the only way anything archived goes away)."""
    cfg = _cfg(config, overrides, output_dir)
    store = _store(cfg)
    if archived:
        gone = [f"{run_id}/{name}" for run_id, dirs in store.archived().items() for name in dirs]
        shutil.rmtree(store.root / ARCHIVED_DIR, ignore_errors=True)
        click.echo(f"local: deleted {len(gone)} archived checkpoint(s)" + (f": {', '.join(gone)}" if gone else ""))
        if also_remote:
            remote_gone = _required_remote(cfg, "ckpt prune --archived --remote").delete_archived()
            click.echo(
                f"remote: deleted {len(remote_gone)} archived checkpoint(s)"
                + (f": {', '.join(remote_gone)}" if remote_gone else "")
            )
        return 0
    keep = keep_last if keep_last is not None else cfg.checkpoint.keep_last
    if not keep or keep < 1:
        raise ConfigError("--keep-last: must be >= 1")
    gone, moved = store.prune(keep)
    click.echo(_deleted("local", gone) + (f"; archived {len(moved)} of another lineage: {moved}" if moved else ""))
    if also_remote:
        remote = _required_remote(cfg, "ckpt prune --remote")
        doomed, moved = remote.prune(keep)  # also removes abandoned partial uploads
        click.echo(
            _deleted("remote", doomed) + (f"; archived {len(moved)} of another lineage: {moved}" if moved else "")
        )
    return 0


@ckpt.command("pull")
@config_options
@click.option("--step", type=int, default=None, help="This step (default: the newest that verifies).")
@run_cli
def pull_cmd(config, overrides, output_dir, step):
    """Download a checkpoint from the remote into the output dir (sha256 verified)."""
    cfg = _cfg(config, overrides, output_dir)
    remote = _required_remote(cfg, "ckpt pull")
    store = _store(cfg)
    store.root.mkdir(parents=True, exist_ok=True)
    manifests, problems = remote.committed()
    for problem in problems:
        click.echo(f"remote: {problem}", err=True)
    if step is not None:
        if step not in manifests:
            raise ConfigError(
                f"{remote.uri}: no committed checkpoint at step {step} (have: "
                f"{', '.join(map(str, sorted(manifests))) or 'none'})"
            )
        candidates = [step]
    else:
        candidates = sorted(manifests, key=lambda s: (manifests[s].created_at, manifests[s].order, s), reverse=True)
        if not candidates:
            raise ConfigError(f"{remote.uri}: no committed checkpoint")
    for s in candidates:
        try:
            path = remote.pull(s, store.root, manifest=manifests[s])
        except CheckpointError as e:  # corrupt, or a local write error: the previous one may do
            if step is not None:
                raise
            click.echo(f"step {s}: unusable ({e}); trying the previous one", err=True)
            continue
        click.echo(f"pulled step {s} -> {path}")
        return 0
    raise ConfigError(f"{remote.uri}: no committed checkpoint could be pulled")


@ckpt.command("push")
@config_options
@click.option("--step", type=int, default=None, help="This step (default: every local one missing remotely).")
@run_cli
def push_cmd(config, overrides, output_dir, step):
    """Upload committed local checkpoints the remote does not have (manifest last)."""
    cfg = _cfg(config, overrides, output_dir)
    remote = _required_remote(cfg, "ckpt push")
    store = _store(cfg)
    have = set(remote.committed_steps())
    steps = [step] if step is not None else [s for s in store.committed_steps() if s not in have]
    for s in steps:
        problems = verify(store.path(s), signer=store.signer)
        if problems:
            click.echo(f"step {s}: not pushed, it does not verify ({problems[0]})", err=True)
            continue
        remote.upload_checkpoint(store.path(s))
        click.echo(f"pushed step {s}")
    if not steps:
        click.echo("nothing to push")
    return 0
