"""Compare each method's images with the reference method's (same seeds): FID, LPIPS, MS-SSIM, time, memory."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from .errors import EvaluationError, MetricUnavailable
from .generate import MANIFEST, load_manifest
from .metrics import (
    FrechetInceptionDistance,
    PairwiseLPIPS,
    PairwiseMSSSIM,
    PromptAccuracy,
    load_inception,
    load_lpips,
    load_prompt_classifier,
)
from .models import resolve_device
from .paired import paired_comparisons
from .report import pareto_data


@dataclass
class EvaluateOptions:
    reference: str = "full"
    fid_weights: str | None = None
    lpips_weights: str | None = None
    device: str = "auto"
    batch_size: int = 16


def load_image(path: Path) -> torch.Tensor:
    """A PNG as a float ``(3, H, W)`` tensor in ``[0, 1]``; a clear error for an unreadable file."""
    try:
        with Image.open(path) as image:
            array = np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0
    except (OSError, UnidentifiedImageError, ValueError) as error:
        raise EvaluationError(
            f"cannot read {path} ({error}); delete it and re-run `tofu-sd generate` to make it again"
        ) from error
    return torch.from_numpy(array).permute(2, 0, 1)


def _method_images(run_dir: Path, method: str) -> dict[str, Path]:
    folder = run_dir / method
    if not folder.is_dir():
        raise EvaluationError(f"{run_dir} has no images of method {method!r} (no folder {folder})")
    images = {p.name: p for p in sorted(folder.glob("*.png"))}
    if not images:
        raise EvaluationError(f"{folder} holds no PNG images")
    return images


def image_sets(run_dir: Path, reference: str) -> tuple[list[str], dict[str, list[str]]]:
    """The methods of the run and their image names, checked to pair one to one with the reference's."""
    manifest = load_manifest(run_dir)
    if manifest is None:
        raise EvaluationError(f"{run_dir} is not a tofu-sd run directory (no {MANIFEST}); run `tofu-sd generate` first")
    methods = list(manifest.get("methods", {}))
    if reference not in methods:
        raise EvaluationError(f"reference method {reference!r} is not in this run; it has {', '.join(methods) or 'none'}")
    names = {m: _method_images(run_dir, m) for m in methods}
    ref_names = set(names[reference])
    problems = []
    for method in methods:
        missing_here = sorted(ref_names - set(names[method]))
        missing_ref = sorted(set(names[method]) - ref_names)
        for what, missing in ((f"{method} lacks", missing_here), (f"{reference} lacks", missing_ref)):
            if missing:
                shown = ", ".join(missing[:8]) + (f" and {len(missing) - 8} more" if len(missing) > 8 else "")
                problems.append(f"  {what} {len(missing)} image(s) of the other: {shown}")
    if problems:
        raise EvaluationError(
            "methods do not pair up image for image (same class and sample):\n" + "\n".join(problems)
            + "\nRe-run `tofu-sd generate` with the same --out to finish the missing images."
        )
    return methods, {m: sorted(names[m]) for m in methods}


def _batches(run_dir: Path, method: str, names: list[str], batch_size: int, size: tuple[int, int] | None):
    for start in range(0, len(names), batch_size):
        images = [load_image(run_dir / method / n) for n in names[start : start + batch_size]]
        for name, image in zip(names[start : start + batch_size], images):
            if size is not None and tuple(image.shape[-2:]) != size:
                raise EvaluationError(
                    f"{run_dir / method / name} is {image.shape[2]}x{image.shape[1]} but the reference images are "
                    f"{size[1]}x{size[0]}; all methods must be generated at the same size"
                )
        yield torch.stack(images)


def _class_of(name: str) -> int:
    return int(name.split("_")[0])


def _prompt_accuracy(run_dir: Path, method: str, names: list[str], options: EvaluateOptions, classifier):
    """The method's prompt accuracy and its per-image hits (1 or 0, in ``names`` order)."""
    metric = PromptAccuracy(classifier)
    for start, batch in zip(range(0, len(names), options.batch_size), _batches(run_dir, method, names, options.batch_size, None)):
        metric.update(batch, [_class_of(n) for n in names[start : start + options.batch_size]])
    return metric.compute()[0], metric.hits


def _compare(run_dir, options, method, names, size, models) -> tuple[dict, int, int, dict]:
    """Metrics of one method against the reference, over same-seed pairs, and the per-pair scores."""
    ms_ssim = PairwiseMSSSIM()
    lpips = PairwiseLPIPS(models["lpips"]) if "lpips" in models else None
    fid = FrechetInceptionDistance(models["fid"]) if "fid" in models else None
    pairs = zip(
        _batches(run_dir, options.reference, names, options.batch_size, size),
        _batches(run_dir, method, names, options.batch_size, size),
    )
    for ref_batch, batch in pairs:
        ms_ssim.update(batch, ref_batch)
        if lpips is not None:
            lpips.update(batch, ref_batch)
        if fid is not None:
            fid.update(ref_batch, real=True)
            fid.update(batch, real=False)
    entry = {"fid": None, "lpips": None, "lpips_std": None}
    entry["ms_ssim"], entry["ms_ssim_std"], n = ms_ssim.compute()
    if lpips is not None:
        entry["lpips"], entry["lpips_std"], _ = lpips.compute()
    if fid is not None:
        entry["fid"] = fid.compute()
    per_pair = {"ms_ssim": ms_ssim.per_pair()}
    if lpips is not None:
        per_pair["lpips"] = lpips.per_pair()
    return entry, n, ms_ssim.scales, per_pair


def evaluate(run_dir: str | Path, options: EvaluateOptions) -> dict:
    """Compute the report data of a run directory (see :mod:`evaluation.report` for writing it)."""
    run_dir = Path(run_dir)
    methods, names = image_sets(run_dir, options.reference)
    manifest = load_manifest(run_dir)
    device = resolve_device(options.device)
    ref_names = names[options.reference]
    size = tuple(load_image(run_dir / options.reference / ref_names[0]).shape[-2:])

    unavailable: dict[str, str] = {}
    models = {}
    for metric, loader, weights in (("fid", load_inception, options.fid_weights), ("lpips", load_lpips, options.lpips_weights)):
        try:
            models[metric] = loader(weights, device)
        except MetricUnavailable as error:
            unavailable[metric] = str(error)
    if "fid" not in unavailable and len(ref_names) < 2:
        unavailable["fid"] = "FID needs at least 2 images per method"
        models.pop("fid")

    prompt_set = manifest.get("config", {}).get("prompts", "imagenet")
    if prompt_set == "shapes":
        try:
            models["prompt_accuracy"] = load_prompt_classifier(device)
        except MetricUnavailable as error:
            unavailable["prompt_accuracy"] = str(error)
    else:
        unavailable["prompt_accuracy"] = (
            f"needs the built-in 'shapes' prompt set (this run used {prompt_set!r}): the shipped classifier knows "
            "only the built-in model's colour-shape classes"
        )

    results: dict[str, dict] = {}
    per_pair: dict[str, dict[str, list[float]]] = {}
    ms_ssim_scales = None
    for method in methods:
        if method == options.reference:  # trivial by definition: no need to compare a set with itself
            has_lpips = "lpips" in models
            entry = {"fid": 0.0 if "fid" in models else None, "lpips": 0.0 if has_lpips else None,
                     "lpips_std": 0.0 if has_lpips else None, "ms_ssim": 1.0, "ms_ssim_std": 0.0}  # fmt: skip
            n = len(ref_names)
            per_pair[method] = {}
        else:
            entry, n, ms_ssim_scales, per_pair[method] = _compare(run_dir, options, method, ref_names, size, models)
        entry["prompt_accuracy"] = None
        if "prompt_accuracy" in models:
            entry["prompt_accuracy"], per_pair[method]["prompt_accuracy"] = _prompt_accuracy(
                run_dir, method, ref_names, options, models["prompt_accuracy"]
            )
        stats = manifest["methods"].get(method, {})
        timed = stats.get("images_timed", 0)
        entry["sec_per_image"] = stats.get("seconds", 0.0) / timed if timed else None
        entry["peak_mem_gb"] = stats["peak_mem_bytes"] / 2**30 if stats.get("peak_mem_bytes") else None
        entry["n_images"] = n
        results[method] = entry

    config = dict(manifest.get("config", {}))
    config.setdefault("prompts", prompt_set)
    config.update(
        reference=options.reference,
        classes=manifest.get("classes"),
        per_class=manifest.get("per_class"),
        versions=manifest.get("versions"),
        peak_mem_kind=next((s.get("peak_mem_kind") for s in manifest["methods"].values() if s.get("peak_mem_kind")), None),
        ms_ssim_scales=ms_ssim_scales,
        metric_weights={"fid": options.fid_weights or "torch hub cache", "lpips": options.lpips_weights or "torch hub cache"},
        method_params={m: manifest["methods"].get(m, {}).get("params") for m in methods},
    )
    report = {"methods": results, "config": config, "unavailable": unavailable, "names": names[options.reference]}
    report["pareto"] = pareto_data(report)
    report["per_pair"] = per_pair
    report["paired"] = paired_comparisons(per_pair, options.reference)
    return report
