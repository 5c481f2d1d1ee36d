"""What issue 19 asks of Token Fusion on diffusion transformers, as the bench measures it at each size: each
reduced variant's peak memory of one step above the unpatched step's (a ToFu step never needs more than
:data:`MEMORY_TARGET_MB` above it), and each tofu variant's step time against the oracle's at the same ratio
(within :data:`ORACLE_TARGET` of it: the matching costs next to nothing) and against full's."""

from __future__ import annotations

from ..methods.registry import REFERENCE, REGISTRY
from .steps import paired_ratio
from .variants import variant_params

MEMORY_TARGET_MB = 256
ORACLE_TARGET = 1.05
#: The targets as the JSON records them.
TARGETS = {"peak_over_full_mb": MEMORY_TARGET_MB, "vs_oracle": ORACLE_TARGET}


def _bounds(results: dict, ratio: float) -> dict:
    """The variant of the bound (:attr:`~evaluation.methods.base.Method.bound`: the oracle) of each ratio among
    ``results``, by ratio."""
    params = {v: variant_params(v, ratio) for v in results}
    return {p["ratio"]: v for v, p in params.items() if REGISTRY[p["method"]].bound}


def dit_targets(results: dict, ratio: float) -> dict:
    """Per variant besides ``full`` (:func:`~.steps.time_steps`'s results): ``peak_over_full_mb``, its peak memory
    minus full's (MiB; the weights cancel), and ``vs_full``, the paired median ratio of its step time to full's
    (both when ``full`` ran); for the targeted variants (:attr:`~evaluation.methods.base.Method.targeted`: tofu's)
    also ``vs_oracle``, to the oracle's at the same ratio (when it ran), and whether each target is met
    (``memory_ok``, ``time_ok``)."""
    full, oracles, out = results.get(REFERENCE), _bounds(results, ratio), {}
    for name, stats in results.items():
        if name == REFERENCE:
            continue
        entry = {}
        if full is not None:
            entry["peak_over_full_mb"] = (stats["peak_mem_gb"] - full["peak_mem_gb"]) * 1024
            entry["vs_full"] = paired_ratio(stats["seconds"], full["seconds"])
        params = variant_params(name, ratio)
        oracle, targeted = oracles.get(params.get("ratio")), REGISTRY[params["method"]].targeted
        if targeted and oracle is not None:
            entry["vs_oracle"] = paired_ratio(stats["seconds"], results[oracle]["seconds"])
        if targeted:
            if "peak_over_full_mb" in entry:
                entry["memory_ok"] = entry["peak_over_full_mb"] <= MEMORY_TARGET_MB
            if "vs_oracle" in entry:
                entry["time_ok"] = entry["vs_oracle"] <= ORACLE_TARGET
        out[name] = entry
    return out


def format_targets(targets: dict) -> list[str]:
    """The table's lines of :func:`dit_targets`."""
    lines = [f"  targets: peak above full's <= {MEMORY_TARGET_MB} MB, a tofu step <= {ORACLE_TARGET} x the oracle's"]
    width = max([10, *map(len, targets)])
    for name, entry in targets.items():
        cells = []
        if "peak_over_full_mb" in entry:
            cells.append(f"peak {entry['peak_over_full_mb']:+9.1f} MB" + _mark(entry, "memory_ok"))
        if "vs_oracle" in entry:
            cells.append(f"vs oracle {entry['vs_oracle']:6.3f}" + _mark(entry, "time_ok"))
        if "vs_full" in entry:
            cells.append(f"vs full {entry['vs_full']:6.3f}")
        lines.append(f"  {name:<{width}} " + "   ".join(cells))
    return lines


def _mark(entry: dict, key: str) -> str:
    return "" if key not in entry else (" (ok)" if entry[key] else " (missed)")
