"""Writing an evaluation: ``report.json``, ``report.md`` (a table like the paper's Table 5), ``grid.png`` and
``pareto.png`` (drawn by :mod:`evaluation.pareto`)."""

from __future__ import annotations

from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

from prompts import class_names

from . import block_cost
from .files import atomic_path, write_json_atomic, write_text_atomic
from .methods.names import method_of
from .methods.registry import REGISTRY
from .models import BUILTIN_MODELS
from .paired import markdown_lines as paired_markdown
from .pareto import BENCH_SECONDS, BENCH_X, pareto_figure


def _fmt(value, digits: int, suffix: str = "") -> str:
    return "n/a" if value is None else f"{value:.{digits}f}{suffix}"


def _header(config: dict, ref: dict) -> list[str]:
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
            f"**Times here are not the speed-up of token reduction.** The built-in `{config.get('model')}` model is "
            f"tiny ({config.get('height')}x{config.get('width')} images, at most about a thousand tokens per patched "
            "block), so a step's time is dominated by fixed overheads: the text encoder, VAE, "
            "scheduler, Python and hook calls. Token reduction pays where attention dominates: see `tofu-sd bench` "
            "on the real SD-1.5 U-Net.",
            "",
        ]
    return lines


def _table(methods: dict, ref: dict, partial: dict | None = None) -> list[str]:
    """The table; a ``partial`` method's (fewer pairs than the reference) set-level metrics say their count."""
    partial = partial or {}
    lines = [
        "| Method | FID ↓ | LPIPS ↓ | MS-SSIM ↑ | Prompt acc. ↑ | Classifier FD ↓ | Time (s/img) ↓ | Speed-up | "
        "Peak mem (GB) ↓ | Mem saving |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, m in methods.items():
        speedup = (
            f"{ref['sec_per_image'] / m['sec_per_image']:.2f}x" if m["sec_per_image"] and ref["sec_per_image"] else "n/a"
        )
        saving = (
            f"{100 * (1 - m['peak_mem_gb'] / ref['peak_mem_gb']):.1f}%" if m["peak_mem_gb"] and ref["peak_mem_gb"] else "n/a"
        )
        lpips = "n/a" if m["lpips"] is None else f"{m['lpips']:.4f} ± {m['lpips_std']:.4f}"
        count = f" ({partial[name]['pairs']} of {partial[name]['of']} img)" if name in partial else ""
        fid, fd = _fmt(m["fid"], 2, count), _fmt(m.get("fd_classifier"), 3, count)
        lines.append(
            f"| {name} | {fid} | {lpips} | {m['ms_ssim']:.4f} ± {m['ms_ssim_std']:.4f} | "
            f"{_fmt(m.get('prompt_accuracy'), 3)} | {fd} | "
            f"{_fmt(m['sec_per_image'], 3)} | {speedup} | {_fmt(m['peak_mem_gb'], 2)} | {saving} |"
        )
    return lines


def _is_dit(config: dict) -> bool:
    """Whether the run's model is a diffusion transformer (its pipeline class is not a U-Net pipeline's)."""
    names = ("StableDiffusion3", "Flux", "PixArt", "Chroma", "QwenImage", "ZImage", "Sana", "Wan")
    return any(n in str(config.get("model_class") or "") for n in names)


def _default_schedule(config: dict) -> str:
    if _is_dit(config):
        return "default (M in every patched block)"
    return "default (P down, M up)"


def _where(config: dict, reduction: dict) -> str:
    """Which blocks were patched: a DiT's ``blocks`` (all when unset), a U-Net's ``max_downsample``."""
    if _is_dit(config):
        return f"blocks {reduction.get('blocks') or 'all'}"
    return f"max_downsample {reduction.get('max_downsample')}"


def _notes(config: dict, methods: dict) -> list[str]:
    """What the options were and what the columns mean."""
    reduction = config.get("reduction") or {}
    swept = any("@" in name for name in methods)
    ratio = (
        f"the number after '@' in a row's name (else {reduction.get('ratio')}; in `deepcache@N`, N is DeepCache's "
        "cache interval)" if swept else reduction.get("ratio")
    )  # fmt: skip
    lines = [
        "",
        f"Token reduction: ratio {ratio}, schedule {reduction.get('schedule') or _default_schedule(config)}, "
        f"{_where(config, reduction)}, cells {reduction.get('sx')}x{reduction.get('sy')}, "
        f"random destinations {reduction.get('use_rand')}.",
        f"Memory is {config.get('peak_mem_kind')}. MS-SSIM used {config.get('ms_ssim_scales')} of 5 scales. "
        "LPIPS and MS-SSIM: mean ± standard deviation over pairs. Prompt accuracy: fraction of a method's images "
        "that the built-in shape classifier assigns to the prompted colour and shape; compare it with the "
        "reference's.",
    ]
    if any(m.get("fd_classifier") is not None for m in methods.values()):
        lines += [
            "",
            "Classifier FD: the FID formula (pytorch-fid's code) on the shipped shape classifier's penultimate features "
            "(the 128 inputs of its last layer) of a method's images against the reference's. Like FID it compares "
            "whole image sets, so it has no per-pair value and is not in the paired test. With fewer images than "
            "features the covariances are singular and the distance is biased upwards: compare it between methods "
            "of the same run (same number of images) only.",
        ]
    if any(_note(name) for name in methods):  # names that the table alone does not explain: every entry's note
        lines += ["", " ".join(note for note in map(_note, REGISTRY) if note)]
    return lines


def _video_lines(config: dict, methods: dict) -> list[str]:
    """A video run's section: each method's MS-SSIM and LPIPS over every frame of its videos beside those of the
    middle frames (nothing for an image run)."""
    if not any("ms_ssim_frames" in m for m in methods.values()):
        return []

    def cell(m: dict, key: str) -> str:
        return "n/a" if m.get(key) is None else f"{m[key]:.4f} ± {m[f'{key}_std']:.4f}"

    counts = ", ".join(map(str, config.get("frames_per_video") or [])) or "?"
    lines = [
        "",
        f"## Whole videos, frame by frame ({counts} frames per video)",
        "",
        "| Method | LPIPS, all frames ↓ | MS-SSIM, all frames ↑ | LPIPS, middle frame ↓ | MS-SSIM, middle frame ↑ |",
        "|---|---|---|---|---|",
    ]
    for name, m in methods.items():
        cells = (cell(m, "lpips_frames"), cell(m, "ms_ssim_frames"), cell(m, "lpips"), cell(m, "ms_ssim"))
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return lines + [
        "",
        (
            "All frames: a video's score is the mean over its frames of the metric against the reference's frame "
            "of the same index and seed, one score per video; ± is the standard deviation over videos. The table "
            "above (FID, the classifier metrics) compares the middle frames only; FID over all frames is not computed."
        ),
    ]


def _note(name: str) -> str | None:
    """The report's note on the method of ``name`` (:attr:`~evaluation.methods.base.Method.report_note`)."""
    entry = REGISTRY.get(method_of(name))
    return None if entry is None else entry.report_note


def markdown(report: dict) -> str:
    """The report as Markdown: one row per method, speed-up and memory saving relative to the reference."""
    config, methods = report["config"], report["methods"]
    ref = methods[config["reference"]]
    selection = report.get("selection") or {}
    lines = _header(config, ref) + _selection_lines(selection, config["reference"])
    lines += _table(methods, ref, selection.get("partial")) + _notes(config, methods) + _video_lines(config, methods)
    lines += _pareto_lines(report.get("pareto"), config["reference"])
    lines += paired_markdown(report.get("paired") or [])
    names = {"fid": "FID", "lpips": "LPIPS", "prompt_accuracy": "Prompt accuracy", "fd_classifier": "Classifier FD"}
    for metric, reason in report.get("unavailable", {}).items():
        lines += ["", f"**{names.get(metric, metric)} unavailable**: {reason}"]
    return "\n".join(lines) + "\n"


def _selection_lines(selection: dict, reference: str) -> list[str]:
    """Which methods were evaluated, on how many pairs, and which were left out and why (nothing for a report
    written before the selection was recorded)."""
    if not selection:
        return []
    evaluated, run = selection["evaluated"], selection["run_methods"]
    which = "all of the run's methods" if len(evaluated) == len(run) else f"{len(evaluated)} of the run's {len(run)}"
    lines = [f"Methods evaluated ({which}): {', '.join(evaluated)}."]
    if selection["not_selected"]:
        lines.append(f"Not evaluated (left out by `--methods`): {', '.join(selection['not_selected'])}.")
    if selection["left_out"]:
        reasons = "; ".join(f"{m} ({why})" for m, why in selection["left_out"].items())
        lines.append(f"Left out, nothing to compare: {reasons}.")
    if selection["partial"]:
        counts = ", ".join(f"{m}: {p['pairs']} of {p['of']} pairs" for m, p in selection["partial"].items())
        lines.append(
            f"Partial methods, evaluated on the (class, sample) images that both they and `{reference}` have: "
            f"{counts}. "
            "Their FID and classifier FD (marked with their count) compare fewer images, and these distances are "
            "biased upwards at smaller counts: compare them only between methods of the same count."
        )
    if selection["unpaired"]:
        counts = ", ".join(f"{m}: {n}" for m, n in selection["unpaired"].items())
        lines.append(f"Images with no `{reference}` image to pair with, not compared: {counts}.")
    return [part for line in lines for part in (line, "")]


def _pareto_lines(pareto: dict | None, reference: str) -> list[str]:
    """report.md's section on pareto.png: what x is (the caption) and, for a bench cost, the step times."""
    if not pareto or not pareto["metrics"]:
        return []
    rows = pareto.get("rows") or [{}]
    cost = pareto.get("cost") or {}
    x = {"bench": "step time relative to full", block_cost.KIND: "transformer compute relative to full"}.get(cost.get("kind"), "seconds per image")
    lines = [
        "",
        "## Speed-quality trade-off",
        "",
        f"![fidelity against {x}, one line per method across its ratios](pareto.png)",
        "",
        f"Each panel plots one fidelity metric against cost; a line joins a method's ratios (labelled), the star is "
        f"`{reference}`." + (" One row of panels per image size of the bench." if len(rows) > 1 else "")
        + " The numbers are under `pareto` in report.json.",
        "",
        pareto.get("caption") or "x: seconds per image.",
    ]
    if cost.get("kind") == block_cost.KIND:
        return lines + block_cost.table_lines(pareto)
    if cost.get("kind") != "bench":
        return lines
    sizes = [str(s) for s in cost["sizes"]]
    lines += [
        "",
        f"Step time of `{cost['arch']}` ({cost['device']}, {cost['dtype']}, {cost['machine']}, bench of {cost['date']}):",
        "",
        "| Method | " + " | ".join(f"{s} px vs full | {s} px median s" for s in sizes) + " |",
        "|---|" + "---|---|" * len(sizes),
    ]
    for points in pareto["series"].values():
        for p in points:
            cells = [f"{p[BENCH_X][s]:.3f} | {p[BENCH_SECONDS][s]:.4g}" for s in sizes]
            lines.append(f"| {p['name']} | " + " | ".join(cells) + " |")
    return lines


def comparison_grid(
    run_dir: Path, methods: list[str], names: list[str], columns: int = 8, prompt_set: str = "imagenet"
) -> Image.Image:
    """Rows are methods, columns the same seeds (one sample of each of the first classes), labelled; a method
    without one of the images (a partial one) shows a grey cell there."""
    chosen, seen = [], set()
    for name in names:  # prefer distinct classes, like the paper's Figure 5
        if name[:4] not in seen:
            chosen.append(name)
            seen.add(name[:4])
    chosen = (chosen + [n for n in names if n not in chosen])[:columns]
    with Image.open(next(run_dir / m / chosen[0] for m in methods if (run_dir / m / chosen[0]).exists())) as first:
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
            x, y = left + j * (w + pad), top + i * (h + pad)
            if not (run_dir / method / name).exists():  # a partial method: a grey cell where it has no image
                draw.rectangle((x, y, x + w - 1, y + h - 1), fill="lightgrey")
                draw.text((x + 4, y + h // 2 - 6), "no image", fill="black", font=font)
                continue
            with Image.open(run_dir / method / name) as image:
                shown = image.convert("RGB").resize((w, h), Image.NEAREST if scale > 1 else Image.BICUBIC)
                grid.paste(shown, (x, y))
    return grid


def write_report(run_dir: str | Path, report: dict, columns: int = 8) -> list[Path]:
    """Write report.json, report.md and grid.png into the run directory (each atomically); returns the paths."""
    run_dir = Path(run_dir)
    data = {k: v for k, v in report.items() if k != "names"}
    write_json_atomic(run_dir / "report.json", data)
    write_text_atomic(run_dir / "report.md", markdown(data))
    prompt_set = report["config"].get("prompts", "imagenet")
    grid = comparison_grid(run_dir, list(report["methods"]), report["names"], columns, prompt_set)
    with atomic_path(run_dir / "grid.png") as tmp:
        grid.save(tmp, format="PNG")
    paths = [run_dir / "report.json", run_dir / "report.md", run_dir / "grid.png"]
    if data.get("pareto"):
        config = data["config"]
        figure = pareto_figure(data["pareto"], f"{config.get('model')}, {config.get('steps')} steps, "
                               f"{config.get('device')}")  # fmt: skip
        with atomic_path(run_dir / "pareto.png") as tmp:
            figure.savefig(tmp, format="png", dpi=110)
        paths.append(run_dir / "pareto.png")
    return paths
