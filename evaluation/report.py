"""Writing an evaluation: ``report.json``, ``report.md`` (a table like the paper's Table 5) and ``grid.png``."""

from __future__ import annotations

import os
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

from prompts import class_names

from .generate import write_json_atomic
from .models import BUILTIN_MODELS


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
    lines += [
        "",
        f"Token reduction: ratio {reduction.get('ratio')}, schedule {reduction.get('schedule') or 'default (P down, M up)'}, "
        f"max_downsample {reduction.get('max_downsample')}, cells {reduction.get('sx')}x{reduction.get('sy')}, "
        f"random destinations {reduction.get('use_rand')}.",
        f"Memory is {config.get('peak_mem_kind')}. MS-SSIM used {config.get('ms_ssim_scales')} of 5 scales. "
        "LPIPS and MS-SSIM: mean ± standard deviation over pairs. Prompt accuracy: fraction of a method's images "
        "that the built-in shape classifier assigns to the prompted colour and shape; compare it with the "
        "reference's.",
    ]
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
    return [run_dir / "report.json", run_dir / "report.md", run_dir / "grid.png"]
