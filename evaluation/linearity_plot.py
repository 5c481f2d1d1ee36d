"""The Fig. 3-style plot of ``tofu-sd analyze``: FL per block in forward order, one line per function and timestep
group, with the proposed schedule's letters."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from .files import atomic_path
from .linearity import FUNCTIONS, TIMESTEP_GROUPS


def short_name(name: str) -> str:
    """``down_blocks.0.attentions.1.transformer_blocks.0`` -> ``down0.1.0`` (``mid.0.0`` for the mid block); a
    diffusion transformer's ``transformer_blocks.3`` (Wan's ``blocks.3``) -> ``b3``, Flux's
    ``single_transformer_blocks.0`` -> ``s0``."""
    parts = name.split(".")
    if len(parts) == 2 and parts[0] in ("transformer_blocks", "single_transformer_blocks", "blocks"):
        return f"{'s' if parts[0].startswith('single') else 'b'}{parts[1]}"
    if parts[0] == "mid_block":
        return f"mid.{parts[2]}.{parts[4]}"
    return f"{parts[0].removesuffix('_blocks')}{parts[1]}.{parts[3]}.{parts[5]}"


def plot(result: dict, path: str | Path) -> Path:
    """Fig. 3-style plot: FL per block in forward order, one line per function and timestep group."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    blocks = result["blocks"]
    x = np.arange(len(blocks))
    fig, ax = plt.subplots(figsize=(max(7.0, 0.7 * len(blocks) + 4), 4.6))
    colours = {"self_attention": "tab:blue", "feed_forward": "tab:orange"}
    styles = {"early": ":", "middle": "--", "late": "-."}
    for function in FUNCTIONS:
        means = [_nan(b["fl"][function]["mean"]) for b in blocks]
        ax.plot(x, means, color=colours[function], lw=2.4, marker="o", label=f"{function}, all t")
        for group in TIMESTEP_GROUPS:
            values = [_nan(b["fl"][function]["by_timestep"][group]["mean"]) for b in blocks]
            ax.plot(x, values, color=colours[function], lw=1.1, ls=styles[group], alpha=0.85, label=f"{function}, {group}")
    threshold = result["method"]["threshold"]
    ax.axhline(threshold, color="0.3", lw=1, alpha=0.7, label=f"threshold {threshold:.3f}")
    for i, letter in enumerate(result["proposed_schedule"]):
        ax.text(i, 1.02, letter, transform=ax.get_xaxis_transform(), ha="center", va="bottom", fontsize=11,
                fontweight="bold", color="tab:red" if letter == "P" else "tab:green")  # fmt: skip
    ax.set_xticks(x, [short_name(b["name"]) for b in blocks], rotation=30, ha="right")
    ax.set_xlabel("transformer block (forward order); letters: proposed schedule")
    ax.set_ylabel("functional linearity (Eq. 8)")
    ax.set_ylim(_ylim_low(blocks, threshold), 1.005)
    model = result["config"].get("model", "")
    ax.set_title(f"{model}: mean FL of matched token pairs, ratio {result['apply_kwargs']['ratio']}, "
                 f"{result['method']['num_points']} points", fontsize=10, pad=22)  # fmt: skip
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=1, loc="center left", bbox_to_anchor=(1.01, 0.5))
    fig.tight_layout()
    path = Path(path)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=130, format="png")
    plt.close(fig)
    return path


def _nan(value: float | None) -> float:
    return float("nan") if value is None else value


def _all_means(blocks: list[dict]) -> list[float]:
    return [
        _nan(v["mean"])
        for b in blocks
        for f in FUNCTIONS
        for v in (b["fl"][f], *b["fl"][f]["by_timestep"].values())
    ]


def _ylim_low(blocks: list[dict], threshold: float) -> float:
    low = min([v for v in _all_means(blocks) if v == v] + [threshold])
    return max(0.0, math.floor((low - 0.05) * 10) / 10)
