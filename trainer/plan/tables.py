"""The tables plan reads, all package data under trainer/plan/tables/: GPUs, prices, measured throughput, and the
shapes of well-known hub models (models.yaml, so plan needs no network for them).

measured.json is generated from the repo's bench/results/*.json by scripts/measured_table.py (only the records
and fields plan uses), so a non-editable install plans with the same numbers as a checkout.
"""

from __future__ import annotations

import difflib
import functools
import json
import logging
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import yaml

from trainer.errors import ConfigError

log = logging.getLogger(__name__)

TABLES_DIR = Path(str(resources.files("trainer.plan") / "tables"))
MEASURED_TABLE = TABLES_DIR / "measured.json"
# what plan reads of a measured run; "source" is the bench/results file it came from
MEASURED_FIELDS = ("gpu", "method", "model", "params", "tokens_per_second", "gradient_checkpointing")


@dataclass(frozen=True)
class GpuSpec:
    name: str
    memory_gib: float
    bf16_tflops: float
    memory_bandwidth_gbs: float
    aliases: tuple[str, ...] = ()
    no_bf16: bool = False
    fp32_tflops: float | None = None  # None: TF32 tensor cores at half the bf16 rate
    note: str = ""


# ---------------------------------------------------------------- GPUs and prices


@functools.lru_cache(maxsize=8)
def load_gpus(path: Path | None = None) -> tuple[GpuSpec, ...]:
    data = yaml.safe_load((path or TABLES_DIR / "gpus.yaml").read_text())
    return tuple(
        GpuSpec(
            name=g["name"],
            memory_gib=float(g["memory_gib"]),
            bf16_tflops=float(g["bf16_tflops"]),
            memory_bandwidth_gbs=float(g["memory_bandwidth_gbs"]),
            aliases=tuple(str(a) for a in g.get("aliases", ())),
            no_bf16=bool(g.get("no_bf16", False)),
            fp32_tflops=g.get("fp32_tflops"),
            note=g.get("note", ""),
        )
        for g in data["gpus"]
    )


def name_key(name: str) -> str:
    return "".join(ch for ch in str(name).lower() if ch.isalnum())


def find_gpu(name: str, gpus: tuple[GpuSpec, ...] | None = None) -> GpuSpec:
    """A GPU by name or alias, ignoring case, spaces and dashes ("4090", "rtx4090", "H100")."""
    gpus = gpus if gpus is not None else load_gpus()
    keys = {}
    for g in gpus:
        for n in (g.name, *g.aliases):
            keys.setdefault(name_key(n), g)
    if name_key(name) in keys:
        return keys[name_key(name)]
    near = difflib.get_close_matches(name_key(name), list(keys), n=3, cutoff=0.5)
    names = list(dict.fromkeys(keys[k].name for k in near)) or [g.name for g in gpus]
    raise ConfigError(
        f"--gpu {name!r}: unknown GPU; did you mean {', '.join(names)}? "
        f"(add a row to {TABLES_DIR / 'gpus.yaml'} for another card)"
    )


def gpu_name(name) -> str | None:
    """The table's name for a GPU named in a record or a price table, or None when it is not in the table."""
    try:
        return find_gpu(str(name)).name
    except ConfigError:
        return None


def load_prices(path: Path | None = None) -> dict:
    path = Path(path) if path else TABLES_DIR / "prices.yaml"
    try:
        data = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as e:
        raise ConfigError(f"--prices {path}: cannot read a price table ({e})") from None
    if not isinstance(data, dict) or "gpus" not in data:
        raise ConfigError(f"--prices {path}: expected 'date:' and 'gpus:' mappings (see {TABLES_DIR / 'prices.yaml'})")
    return data


# ---------------------------------------------------------------- known models


@functools.lru_cache(maxsize=4)
def load_models(path: Path | None = None) -> dict[str, dict]:
    """models.yaml: hub id -> the config.json fields that fix its shape (aliases not included)."""
    data = yaml.safe_load((path or TABLES_DIR / "models.yaml").read_text())
    return {m["name"]: dict(m["config"]) for m in data["models"]}


@functools.lru_cache(maxsize=4)
def _model_names(path: Path | None = None) -> dict[str, str]:
    data = yaml.safe_load((path or TABLES_DIR / "models.yaml").read_text())
    return {str(n).lower(): m["name"] for m in data["models"] for n in (m["name"], *m.get("aliases", ()))}


def known_model_config(name: str):
    """The transformers config of a hub id in models.yaml (no network), or None for any other name or a local dir."""
    known = _model_names().get(str(name).rstrip("/").lower())
    if known is None or Path(name).is_dir():
        return None
    from transformers import AutoConfig

    fields = dict(load_models()[known])
    return AutoConfig.for_model(fields.pop("model_type"), **fields)


# ---------------------------------------------------------------- measured throughput


def read_bench_dir(bench_dir: Path) -> list[dict]:
    """Measured runs from bench_dir/*.json (a dict or a list of dicts each): those with a numeric
    tokens_per_second and a gpu, each with "_file" (its file's name); unreadable files are skipped."""
    bench_dir = Path(bench_dir)
    out = []
    for path in sorted(bench_dir.glob("*.json")) if bench_dir.is_dir() else []:
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError) as e:
            log.warning("bench result %s skipped: %s", path, e)
            continue
        for rec in data if isinstance(data, list) else [data]:
            if isinstance(rec, dict) and isinstance(rec.get("tokens_per_second"), (int, float)) and rec.get("gpu"):
                out.append({**rec, "_file": path.name})
    return out


def measured_rows(records: list[dict]) -> list[dict]:
    """The packaged table's rows: the fields plan reads of each record, and its source file."""
    rows = []
    for rec in records:
        row = {k: rec[k] for k in MEASURED_FIELDS if rec.get(k) is not None}
        if "params" not in row and isinstance(rec.get("num_params"), (int, float)):
            row["params"] = rec["num_params"]
        rows.append({**row, "source": rec["_file"]})
    return rows


def load_measured(path: Path | None = None) -> list[dict]:
    """The packaged measured table, as records in read_bench_dir's form."""
    path = Path(path) if path else MEASURED_TABLE
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        log.warning("measured table %s unreadable (%s): planning from FLOPs alone", path, e)
        return []
    return [
        {**{k: v for k, v in row.items() if k != "source"}, "_file": row["source"]} for row in data.get("records", [])
    ]


def read_bench_results(bench_dir: Path | None = None) -> list[dict]:
    """Measured runs: the packaged table, or (for developers) the raw records of a bench results dir."""
    return read_bench_dir(bench_dir) if bench_dir else load_measured()
