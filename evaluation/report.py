"""Writing an evaluation: ``report.json``, ``report.md`` (a table like the paper's Table 5) and ``grid.png``."""

from __future__ import annotations

import os
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

from prompts import class_names

from .generate import write_json_atomic
from .models import BUILTIN_MODELS
from .paired import markdown_lines as paired_markdown


def _fmt(value, digits: int) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def markdown(report: dict) -> str:
    """The report as Markdown: one row per method, speed-up and memory saving relative to the reference."""
    config, methods = report["config"], report["methods"]
    ref = methods[config["reference"]]
    lines = [
        f"# Token reduction vs `{config['reference']}`",
        "",
        f"Model `{config.get('model')}`, {config.get('steps')} steps, {config.get('height')}x{config.get('width')}, "
        f"{config.get('dtype')} on {config.get('device')}, guidance {config.get('guidance_scale')}; "
        f"{ref['n_images']} image pairs (same seeds), prompt set `{config.get('prompts', 'imagenet')}`.",
        "",
    ]
    if config.get("model") in BUILTIN_MODELS:
        lines += [
            "**Times here are not the speed-up of token reduction.** The built-in model is tiny (16x16 latents, 256 "
            "tokens per patched block), so a step's time is dominated by fixed overheads: the text encoder, VAE, "
            "scheduler, Python and hook calls. Token reduction pays where attention dominates: see `tofu-sd bench` "
            "on the real SD-1.5 U-Net.",
            "",
        ]
    lines += [
        "| Method | FID ↓ | LPIPS ↓ | MS-SSIM ↑ | Prompt acc. ↑ | Time (s/img) ↓ | Speed-up | Peak mem (GB) ↓ | Mem saving |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name, m in methods.items():
        speedup = (
            f"{ref['sec_per_image'] / m['sec_per_image']:.2f}x" if m["sec_per_image"] and ref["sec_per_image"] else "n/a"
        )
        saving = (
            f"{100 * (1 - m['peak_mem_gb'] / ref['peak_mem_gb']):.1f}%" if m["peak_mem_gb"] and ref["peak_mem_gb"] else "n/a"
        )
        lpips = "n/a" if m["lpips"] is None else f"{m['lpips']:.4f} ± {m['lpips_std']:.4f}"
        lines.append(
            f"| {name} | {_fmt(m['fid'], 2)} | {lpips} | {m['ms_ssim']:.4f} ± {m['ms_ssim_std']:.4f} | "
            f"{_fmt(m.get('prompt_accuracy'), 3)} | "
            f"{_fmt(m['sec_per_image'], 3)} | {speedup} | {_fmt(m['peak_mem_gb'], 2)} | {saving} |"
        )
    reduction = config.get("reduction") or {}
    swept = any("@" in name for name in methods)
    ratio = f"the number after '@' in a row's name (else {reduction.get('ratio')})" if swept else reduction.get("ratio")
    lines += [
        "",
        f"Token reduction: ratio {ratio}, schedule {reduction.get('schedule') or 'default (P down, M up)'}, "
        f"max_downsample {reduction.get('max_downsample')}, cells {reduction.get('sx')}x{reduction.get('sy')}, "
        f"random destinations {reduction.get('use_rand')}.",
        f"Memory is {config.get('peak_mem_kind')}. MS-SSIM used {config.get('ms_ssim_scales')} of 5 scales. "
        "LPIPS and MS-SSIM: mean ± standard deviation over pairs. Prompt accuracy: fraction of a method's images "
        "that the built-in shape classifier assigns to the prompted colour and shape; compare it with the "
        "reference's.",
    ]
    if any(name.partition("@")[0] in ("todo", "catome") for name in methods):
        lines += [
            "",
            "`todo`: ToDo (this project's re-implementation): self-attention takes keys and values from an "
            "average-pooled token grid, every query stays; its ratio is the fraction of keys removed (`todo`: 2x2 "
            "pooling, 0.75). `catome`: the ca-tome package (adaptive merging above a similarity threshold, matchings "
            "cached across steps)."
        ]
    if report.get("pareto") and report["pareto"]["metrics"]:
        lines += [
            "",
            "## Speed-quality trade-off",
            "",
            "![fidelity against seconds per image, one line per method across its ratios](pareto.png)",
            "",
            "Each panel plots one fidelity metric against seconds per image; a line joins a method's ratios "
            f"(labelled), the star is `{config['reference']}`. The numbers are under `pareto` in report.json.",
        ]
    lines += paired_markdown(report.get("paired") or [])
    for metric, reason in report.get("unavailable", {}).items():
        lines += ["", f"**{metric.upper()} unavailable**: {reason}"]
    return "\n".join(lines) + "\n"


def comparison_grid(
    run_dir: Path, methods: list[str], names: list[str], columns: int = 8, prompt_set: str = "imagenet"
) -> Image.Image:
    """Rows are methods, columns the same seeds (one sample of each of the first classes), labelled."""
    chosen, seen = [], set()
    for name in names:  # prefer distinct classes, like the paper's Figure 5
        if name[:4] not in seen:
            chosen.append(name)
            seen.add(name[:4])
    chosen = (chosen + [n for n in names if n not in chosen])[:columns]
    with Image.open(run_dir / methods[0] / chosen[0]) as first:
        w, h = first.size
    scale = max(1, 128 // max(w, h))  # small images (the built-in model's 64 px) are shown enlarged
    w, h = w * scale, h * scale
    font = ImageFont.load_default()
    left, top, pad = 90, 28, 4
    grid = Image.new("RGB", (left + len(chosen) * (w + pad), top + len(methods) * (h + pad)), "white")
    draw = ImageDraw.Draw(grid)
    for j, name in enumerate(chosen):
        label = f"{class_names(prompt_set)[int(name[:4])][:max(4, w // 6)]}"
        draw.text((left + j * (w + pad) + 2, 8), label, fill="black", font=font)
    for i, method in enumerate(methods):
        draw.text((6, top + i * (h + pad) + h // 2 - 6), method, fill="black", font=font)
        for j, name in enumerate(chosen):
            with Image.open(run_dir / method / name) as image:
                shown = image.convert("RGB").resize((w, h), Image.NEAREST if scale > 1 else Image.BICUBIC)
                grid.paste(shown, (left + j * (w + pad), top + i * (h + pad)))
    return grid


# Fidelity metrics of the Pareto plot: key, label, True if higher is better.
FIDELITY = (("fid", "FID", False), ("lpips", "LPIPS", False), ("ms_ssim", "MS-SSIM", True),
            ("prompt_accuracy", "prompt accuracy", True))  # fmt: skip


def _family_and_ratio(name: str, params: dict | None, reduction: dict) -> tuple[str, float | None]:
    """A row's method family and ratio: from the manifest's per-method parameters, else from the name."""
    family, _, suffix = name.partition("@")
    if params:
        return params.get("method", family), params.get("ratio")
    if suffix:
        try:
            return family, float(suffix)
        except ValueError:
            return name, None
    return family, None if family == "full" else reduction.get("ratio")


def pareto_data(report: dict) -> dict:
    """The numbers behind ``pareto.png``: per method family, its points (one per ratio, by ratio) with seconds per
    image and every fidelity metric; ``metrics`` lists the fidelity metrics that have values."""
    config, methods = report["config"], report["methods"]
    params = config.get("method_params") or {}
    reference = config.get("reference")
    series: dict[str, list[dict]] = {}
    for name, m in methods.items():
        family, ratio = _family_and_ratio(name, params.get(name), config.get("reduction") or {})
        own = params.get(name) or {}
        label = f"{ratio:g}" if ratio is not None else (f"T={own['threshold']:g}" if "threshold" in own else None)
        point = {"name": name, "ratio": ratio, "label": label, "keys_removed": own.get("keys_removed"),
                 "sec_per_image": m.get("sec_per_image")}  # fmt: skip
        point.update({key: m.get(key) for key, _, _ in FIDELITY})
        series.setdefault(name if name == reference else family, []).append(point)
    for points in series.values():
        points.sort(key=lambda p: (p["ratio"] is None, p["ratio"] or 0.0))
    metrics = [
        key for key, _, _ in FIDELITY
        if key not in report.get("unavailable", {})
        and any(p[key] is not None and p["sec_per_image"] for points in series.values() for p in points)
    ]  # fmt: skip
    return {"x": "sec_per_image", "reference": reference, "metrics": metrics, "series": series}


def pareto_figure(pareto: dict, title: str = ""):
    """One panel per fidelity metric: fidelity against seconds per image, a line per method across its ratios
    (each point labelled with its ratio), the reference as a star. Returns a matplotlib Figure."""
    from matplotlib.figure import Figure

    metrics = pareto["metrics"]
    labels = {key: (label, higher) for key, label, higher in FIDELITY}
    fig = Figure(figsize=(4.6 * max(1, len(metrics)), 4.2), layout="constrained")
    axes = fig.subplots(1, max(1, len(metrics)), squeeze=False)[0]
    for ax, key in zip(axes, metrics):
        for family, points in pareto["series"].items():
            shown = [p for p in points if p[key] is not None and p["sec_per_image"]]
            if not shown:
                continue
            xs, ys = [p["sec_per_image"] for p in shown], [p[key] for p in shown]
            if family == pareto["reference"]:
                ax.plot(xs, ys, linestyle="none", marker="*", markersize=14, color="black", label=family, zorder=3)
                continue
            ax.plot(xs, ys, marker="o", label=family)
            for p in shown:
                if p["label"] is not None:
                    ax.annotate(p["label"], (p["sec_per_image"], p[key]), textcoords="offset points",
                                xytext=(4, 4), fontsize=7)  # fmt: skip
        label, higher = labels[key]
        ax.set_xlabel("seconds per image (lower is faster)")
        ax.set_ylabel(f"{label} vs {pareto['reference']} ({'higher' if higher else 'lower'} is better)")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
    if not metrics:
        axes[0].text(0.5, 0.5, "no fidelity metric available", ha="center", va="center", transform=axes[0].transAxes)
    if title:
        fig.suptitle(title, fontsize=10)
    return fig


def write_report(run_dir: str | Path, report: dict, columns: int = 8) -> list[Path]:
    """Write report.json, report.md and grid.png into the run directory (each atomically); returns the paths."""
    run_dir = Path(run_dir)
    data = {k: v for k, v in report.items() if k != "names"}
    write_json_atomic(run_dir / "report.json", data)
    md_tmp = run_dir / ".report.md.tmp"
    md_tmp.write_text(markdown(data))
    os.replace(md_tmp, run_dir / "report.md")
    prompt_set = report["config"].get("prompts", "imagenet")
    grid = comparison_grid(run_dir, list(report["methods"]), report["names"], columns, prompt_set)
    grid_tmp = run_dir / ".grid.png.tmp"
    grid.save(grid_tmp, format="PNG")
    os.replace(grid_tmp, run_dir / "grid.png")
    paths = [run_dir / "report.json", run_dir / "report.md", run_dir / "grid.png"]
    if data.get("pareto"):
        config = data["config"]
        figure = pareto_figure(data["pareto"], f"{config.get('model')}, {config.get('steps')} steps, "
                               f"{config.get('device')}")  # fmt: skip
        pareto_tmp = run_dir / ".pareto.png.tmp"
        figure.savefig(pareto_tmp, format="png", dpi=110)
        os.replace(pareto_tmp, run_dir / "pareto.png")
        paths.append(run_dir / "pareto.png")
    return paths
