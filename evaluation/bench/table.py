"""The bench's results as a table on the terminal, and as JSON."""

from __future__ import annotations

from ..files import write_json_atomic
from ..methods.names import parse_name
from ..methods.registry import REFERENCE
from .steps import reducer_keys
from .targets import format_targets
from .variants import variant_params


def _notes(result: dict, variants: dict) -> list[str]:
    """A line per variant whose method describes itself or its step mix (todo's pooling, catome's schedule)."""
    lines = []
    for name, stats in variants.items():
        method = parse_name(name).method
        if "step_mix" in stats:
            lines.append(f"  {name}: {stats['step_mix']}")
        if method.describe is not None:
            lines.append(f"  {name}: {method.describe(variant_params(name, result['ratio']))}")
    return lines


def format_table(result: dict) -> str:
    model = "U-Net" if "transformer" not in result else f"{result['transformer']['class']} ({result['transformer']['params']:,} parameters)"
    lines = [f"{result['arch']} {model} step on {result['machine']} ({result['device']}, {result['dtype']}, "
             f"batch {result['batch']}, ratio {result['ratio']}, compiled={result['compiled']}"
             + (f", max_downsample {result['max_downsample']}: lower levels patched too" if result.get("max_downsample", 1) != 1 else "")
             + ")"]  # fmt: skip
    for size, data in result["steps"].items():
        full = data["variants"].get(REFERENCE, {}).get("median_s")
        width = max([10, *map(len, data["variants"])])
        lines += ["", f"{size}x{size}: {'variant':<{width}}median s    min s   vs full (paired)   peak mem MB ({data['peak_mem_kind']})"]
        for name, r in data["variants"].items():
            rel = f"{data['ratios'].get(f'{name}/{REFERENCE}', 1.0):7.3f}" if full else "    n/a"
            lines.append(f"  {name:<{width}} {r['median_s']:9.4f} {r['min_s']:8.4f} {rel:>12}   {r['peak_mem_gb'] * 1024:14.1f}")
        lines += _notes(result, data["variants"])
        keys = reducer_keys(data["variants"], result["ratio"])
        if keys:
            lines.append("  " + ", ".join(f"{k} = {data['ratios'][k]:.3f}" for k in keys))
        if data.get("targets"):
            lines += format_targets(data["targets"])
    if result.get("ops_per_block"):
        lines += ["", "ops added per patched block (tiny U-Net call, eager, top-level aten ops without views):"]
        lines.append("  " + ", ".join(f"{k} {v['per_block']:.1f}" for k, v in result["ops_per_block"].items()))
    if result["block_overhead"]:
        lines += ["", "reduce + restore machinery per block call (attention excluded): median ms / peak MB allocated"]
        for tokens, data in result["block_overhead"].items():
            cells = [f"{k} {1000 * v['median_s']:.1f} ms" + (f" / {v['peak_mb']:.0f} MB" if "peak_mb" in v else "") for k, v in data.items()]
            lines.append(f"  N={tokens}: " + ", ".join(cells))
    if result.get("call_memory_mb"):
        cm = result["call_memory_mb"]
        full = cm["peak_mb"].get(REFERENCE)
        lines += ["", f"tiny U-Net call at {cm['tokens']} tokens, batch {cm['batch']}: peak MB of live tensors (weights excluded)"]
        lines.append("  " + ", ".join(f"{k} {v:.0f}" + (f" (+{v - full:.0f})" if full is not None and k != REFERENCE else "") for k, v in cm["peak_mb"].items()))
    return "\n".join(lines)


def write_json(path: str, result: dict) -> None:
    write_json_atomic(path, result)
