"""Cost per provider, on demand and on spot, with the wall time that preemptions add on spot."""

from __future__ import annotations

from dataclasses import dataclass

from trainer.plan.tables import GpuSpec, gpu_name, name_key


@dataclass
class CostRow:
    provider: str
    on_demand_per_hour: float | None
    spot_per_hour: float | None
    on_demand_total: float | None
    spot_total: float | None

    @property
    def savings(self) -> float | None:
        if self.on_demand_total and self.spot_total is not None:
            return 1 - self.spot_total / self.on_demand_total
        return None


def preemption_overhead(preemptions_per_day: float, restart_latency_s: float, lost_work_s: float) -> float:
    """Fraction of spot wall time lost: each preemption costs the restart latency plus the work redone."""
    lost = preemptions_per_day * (restart_latency_s + lost_work_s) / 86400
    return min(lost, 0.95)


def cost_rows(
    gpu: GpuSpec,
    hours: float | None,
    num_gpus: int,
    prices: dict,
    overhead: float,
    price_per_hour: float | None,
    spot_price_per_hour: float | None,
) -> list[CostRow]:
    """On-demand and spot cost per provider; spot hours are stretched by the preemption overhead."""
    table = {}
    for name, row in (prices.get("gpus") or {}).items():
        if name_key(name) == name_key(gpu.name) or gpu_name(name) == gpu.name:
            table = row or {}
    rows = [(prov, p.get("on_demand"), p.get("spot")) for prov, p in table.items() if isinstance(p, dict)]
    if price_per_hour is not None or spot_price_per_hour is not None:
        rows.insert(0, ("given", price_per_hour, spot_price_per_hour))
    out = []
    for prov, od, spot in rows:
        od_total = od * num_gpus * hours if (od is not None and hours is not None) else None
        spot_total = spot * num_gpus * hours / (1 - overhead) if (spot is not None and hours is not None) else None
        out.append(CostRow(prov, od, spot, od_total, spot_total))
    return out
