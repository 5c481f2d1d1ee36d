"""Compare each method's images with the reference method's (same seeds): FID, LPIPS, MS-SSIM, with the built-in
model's classifier prompt accuracy and classifier FD, time, memory, and the cost axis of the Pareto plot; for a video
run, also each video's MS-SSIM and LPIPS frame by frame (:mod:`evaluation.frames`)."""

from __future__ import annotations

import statistics
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from .block_cost import dit_cost, is_transformer_bench
from .errors import EvaluationError, MetricUnavailable
from .frames import FRAME_METRICS, frame_counts, frame_files, has_frames
from .manifest import load_manifest
from .methods.names import method_of
from .methods.registry import REFERENCE, REGISTRY
from .metrics import (
    ClassifierFrechetDistance,
    FrechetInceptionDistance,
    PairwiseLPIPS,
    PairwiseMSSSIM,
    PromptAccuracy,
    load_inception,
    load_lpips,
    load_prompt_classifier,
)
from .models import resolve_device
from .paired import paired_comparisons, parse_pairs
from .pareto import STEP_DEFAULTS, bench_cost, pareto_data
from .selection import Selection, select


@dataclass
class EvaluateOptions:
    reference: str = REFERENCE
    fid_weights: str | None = None
    lpips_weights: str | None = None
    device: str = "auto"
    batch_size: int = 16
    cost: str | None = None  #: a ``tofu-sd bench --json`` file: the Pareto plot's x is its step time vs full
    #: ``--attention-share``: the attention's share of a block's time, for a diffusion transformer's bench cost
    #: (None: :data:`evaluation.block_cost.DEFAULT_ATTENTION_SHARE`)
    attention_share: float | None = None
    compare: str | None = None  #: extra paired comparisons, ``"a:b,c:d"`` (any two methods, e.g. of equal cost)
    methods: str | list[str] | None = None  #: ``--methods``: the methods to evaluate (the reference always); None: all


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


def _classifier_metrics(run_dir: Path, method: str, names: list[str], options: EvaluateOptions, classifier, fd):
    """The method's prompt accuracy, its per-image hits (1 or 0, in ``names`` order) and, if ``fd`` (a
    :class:`ClassifierFrechetDistance` holding the reference's features) is given, its classifier FD."""
    accuracy = PromptAccuracy(classifier)
    if fd is not None:
        fd.reset(real=False)
    for start, batch in zip(range(0, len(names), options.batch_size), _batches(run_dir, method, names, options.batch_size, None)):
        accuracy.update(batch, [_class_of(n) for n in names[start : start + options.batch_size]])
        if fd is not None:
            fd.update(batch, real=False)
    return accuracy.compute()[0], accuracy.hits, None if fd is None else fd.compute()


def _reference_features(run_dir: Path, names: list[str], options: EvaluateOptions, classifier) -> ClassifierFrechetDistance:
    """A classifier FD metric holding the reference images' features."""
    fd = ClassifierFrechetDistance(classifier)
    for batch in _batches(run_dir, options.reference, names, options.batch_size, None):
        fd.update(batch, real=True)
    return fd


def _run_ratios(manifest: dict, methods: list[str]) -> dict[str, float | None]:
    """The ratio each method ran at: its manifest parameters' ratio, else the run's --ratio."""
    run_ratio = (manifest.get("config", {}).get("reduction") or {}).get("ratio")
    params = {m: (manifest["methods"].get(m) or {}).get("params") or {} for m in methods}
    return {m: params[m].get("ratio", None if params[m] else run_ratio) for m in methods}


def _step_options(manifest: dict, methods: list[str]) -> dict[str, dict]:
    """The options each method ran with that set its step time besides its name: the run's tofu_sd options that
    its entry names (:attr:`~evaluation.methods.base.Method.step_options`: ToFu's ``rematch_every``, the
    ``max_downsample`` of the methods that patch a U-Net's levels) and the name's own :class:`MethodOptions`
    (``takes``: a ``deepcache+`` name's ``cache_interval``; a ``deepcache@N`` name holds its own). A name that is
    no entry of the registry has none."""
    reduction = manifest.get("config", {}).get("reduction") or {}
    out = {}
    for m in methods:
        entry = REGISTRY.get(method_of(m))
        if entry is None:
            out[m] = {}
            continue
        params = (manifest["methods"].get(m) or {}).get("params") or {}
        out[m] = {key: reduction.get(key, STEP_DEFAULTS[key]) for key in entry.step_options}
        out[m].update({key: params.get(key) for key in entry.takes})
    return out


def _cost(options: EvaluateOptions, manifest: dict, methods: list[str]) -> dict | None:
    """The Pareto plot's cost from ``--cost``: a U-Net bench's step times (:func:`~evaluation.pareto.bench_cost`),
    or the blocks each method ran with a diffusion transformer's bench (:func:`~evaluation.block_cost.dit_cost`);
    None without ``--cost``. Checked before any metric is computed."""
    if not options.cost:
        if options.attention_share is not None:
            raise EvaluationError("--attention-share weighs the attentions a cache skips on a diffusion transformer's --cost; give --cost too")
        return None
    ratios, steps = _run_ratios(manifest, methods), _step_options(manifest, methods)
    if is_transformer_bench(options.cost):
        return dit_cost(options.cost, manifest["methods"], methods, ratios, steps, options.attention_share)
    if options.attention_share is not None:
        raise EvaluationError(f"--attention-share applies to a diffusion transformer's bench; --cost {options.cost} timed a U-Net")
    return bench_cost(options.cost, methods, ratios, steps)


def _compare(run_dir, options, method, names, size, models) -> tuple[dict, int, int, dict]:
    """Metrics of one method against the reference, over same-seed pairs, and the per-pair scores."""
    ms_ssim = PairwiseMSSSIM()
    lpips = PairwiseLPIPS(models["lpips"]) if "lpips" in models else None
    fid = FrechetInceptionDistance(models["fid"]) if "fid" in models and len(names) > 1 else None
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


def _frame_scores(run_dir: Path, options: EvaluateOptions, method: str, names: list[str], size, models) -> tuple[dict, dict]:
    """The video metrics of one method (:data:`~evaluation.frames.FRAME_METRICS`: MS-SSIM and LPIPS of every frame
    against the reference's same-seed video, averaged over the video's frames, so that a video is one pair of the
    paired test): their mean and standard deviation over the videos ``names``, and the per-video scores."""
    has_lpips = "lpips" in models
    if method == options.reference:  # trivial by definition, as for the images
        return {"ms_ssim_frames": 1.0, "ms_ssim_frames_std": 0.0, "lpips_frames": 0.0 if has_lpips else None,
                "lpips_frames_std": 0.0 if has_lpips else None}, {}  # fmt: skip
    per_video: dict[str, list[float]] = {key: [] for key in FRAME_METRICS if has_lpips or key != "lpips_frames"}
    for name in names:
        frames = [str(p.relative_to(run_dir / method)) for p in frame_files(run_dir, method, name)]
        metrics = {"ms_ssim_frames": PairwiseMSSSIM()}
        if has_lpips:
            metrics["lpips_frames"] = PairwiseLPIPS(models["lpips"])
        pairs = zip(
            _batches(run_dir, options.reference, frames, options.batch_size, size),
            _batches(run_dir, method, frames, options.batch_size, size),
        )
        for ref_batch, batch in pairs:
            for metric in metrics.values():
                metric.update(batch, ref_batch)
        for key, metric in metrics.items():
            per_video[key].append(metric.compute()[0])
    entry = {}
    for key in FRAME_METRICS:
        values = per_video.get(key)
        entry[key] = statistics.fmean(values) if values else None
        entry[f"{key}_std"] = statistics.pstdev(values) if values else None
    return entry, per_video


def _load_models(options: EvaluateOptions, prompt_set: str, n_images: int, device) -> tuple[dict, dict[str, str]]:
    """The metric networks that can be had, and for each metric that cannot, why."""
    unavailable: dict[str, str] = {}
    models = {}
    for metric, loader, weights in (("fid", load_inception, options.fid_weights), ("lpips", load_lpips, options.lpips_weights)):
        try:
            models[metric] = loader(weights, device)
        except MetricUnavailable as error:
            unavailable[metric] = str(error)
    if "fid" not in unavailable and n_images < 2:
        unavailable["fid"] = "FID needs at least 2 images per method"
        models.pop("fid")
    if prompt_set == "shapes":
        try:
            models["prompt_accuracy"] = load_prompt_classifier(device)
        except MetricUnavailable as error:
            unavailable["prompt_accuracy"] = unavailable["fd_classifier"] = str(error)
    else:
        unavailable["prompt_accuracy"] = unavailable["fd_classifier"] = (
            f"needs the built-in 'shapes' prompt set (this run used {prompt_set!r}): the shipped classifier knows "
            "only the built-in model's colour-shape classes"
        )
    if "prompt_accuracy" in models and n_images < 2:
        unavailable["fd_classifier"] = "the classifier FD needs at least 2 images per method"
    return models, unavailable


def _score_method(run_dir, options, method, names, size, models, fd) -> tuple[dict, dict, int | None, int]:
    """One method's report entry (without time and memory) over its image pairs ``names``, its per-pair scores,
    the MS-SSIM scales used and the number of pairs. ``fd`` holds the reference's classifier features of the
    images of ``names`` (a partial method's classifier FD is against the reference images of its own pairs)."""
    scales = None
    if method == options.reference:  # trivial by definition: no need to compare a set with itself
        has_lpips = "lpips" in models
        entry = {"fid": 0.0 if "fid" in models else None, "lpips": 0.0 if has_lpips else None,
                 "lpips_std": 0.0 if has_lpips else None, "ms_ssim": 1.0, "ms_ssim_std": 0.0}  # fmt: skip
        n, per_pair = len(names), {}
    else:
        entry, n, scales, per_pair = _compare(run_dir, options, method, names, size, models)
    entry["prompt_accuracy"] = entry["fd_classifier"] = None
    if "prompt_accuracy" in models:
        own_fd = None if method == options.reference or len(names) < 2 else fd
        entry["prompt_accuracy"], per_pair["prompt_accuracy"], entry["fd_classifier"] = _classifier_metrics(
            run_dir, method, names, options, models["prompt_accuracy"], own_fd
        )
        if fd is not None and method == options.reference:
            entry["fd_classifier"] = 0.0  # a set against itself, by definition
    return entry, per_pair, scales, n


def _timing(stats: dict) -> dict:
    """Seconds per image and peak memory (GB) from a method's manifest entry; None where not recorded."""
    timed = stats.get("images_timed", 0)
    return {
        "sec_per_image": stats.get("seconds", 0.0) / timed if timed else None,
        "peak_mem_gb": stats["peak_mem_bytes"] / 2**30 if stats.get("peak_mem_bytes") else None,
    }


def _report_config(manifest: dict, methods: list[str], options: EvaluateOptions, prompt_set: str, scales) -> dict:
    config = dict(manifest.get("config", {}))
    config.setdefault("prompts", prompt_set)
    config.update(
        reference=options.reference,
        classes=manifest.get("classes"),
        per_class=manifest.get("per_class"),
        versions=manifest.get("versions"),
        peak_mem_kind=next((s.get("peak_mem_kind") for s in manifest["methods"].values() if s.get("peak_mem_kind")), None),
        ms_ssim_scales=scales,
        metric_weights={"fid": options.fid_weights or "torch hub cache", "lpips": options.lpips_weights or "torch hub cache"},
        method_params={m: manifest["methods"].get(m, {}).get("params") for m in methods},
    )
    return config


def _extra_pairs(options: EvaluateOptions, chosen: Selection) -> list[tuple[str, str]]:
    """``--compare``'s pairs, checked to name evaluated methods that share at least one image pair."""
    if not options.compare:
        return []
    try:
        extra = parse_pairs(options.compare, chosen.methods, options.reference, chosen.not_evaluated())
    except ValueError as error:
        raise EvaluationError(str(error)) from error
    for a, b in extra:
        if not set(chosen.pairs[a]) & set(chosen.pairs[b]):
            raise EvaluationError(
                f"--compare {a}:{b}: the two methods have no (class, sample) image in common to compare "
                f"({a} has {len(chosen.pairs[a])}, {b} {len(chosen.pairs[b])}); finish them with `tofu-sd generate`"
            )
    return extra


def _grid_names(chosen: Selection) -> list[str]:
    """The reference's image names, those every evaluated method has first (grid.png's columns come from them)."""
    sets = [set(chosen.pairs[m]) for m in chosen.methods]
    names = chosen.pairs[chosen.reference]
    return [n for n in names if all(n in s for s in sets)] + [n for n in names if not all(n in s for s in sets)]


def evaluate(run_dir: str | Path, options: EvaluateOptions) -> dict:
    """Compute the report data of a run directory (see :mod:`evaluation.report` for writing it): every method of
    ``options.methods`` (all by default) on the image pairs it shares with the reference."""
    run_dir = Path(run_dir)
    chosen = select(run_dir, options.reference, options.methods)
    methods = chosen.methods
    manifest = load_manifest(run_dir)
    cost = _cost(options, manifest, methods)
    extra = _extra_pairs(options, chosen)  # checked before any metric is computed
    video = has_frames(run_dir, methods)  # a video run: its frame counts are checked before any metric too
    counts = frame_counts(run_dir, options.reference, chosen.pairs) if video else None
    device = resolve_device(options.device)
    ref_names = chosen.pairs[options.reference]
    size = tuple(load_image(run_dir / options.reference / ref_names[0]).shape[-2:])
    prompt_set = manifest.get("config", {}).get("prompts", "imagenet")
    models, unavailable = _load_models(options, prompt_set, len(ref_names), device)
    fd = None
    if "prompt_accuracy" in models and "fd_classifier" not in unavailable:
        fd = _reference_features(run_dir, ref_names, options, models["prompt_accuracy"])

    results: dict[str, dict] = {}
    per_pair: dict[str, dict[str, list[float]]] = {}
    ms_ssim_scales = None
    for method in methods:
        names = chosen.pairs[method]
        own_fd = fd
        if fd is not None and len(names) < len(ref_names):  # a partial method: the reference images of its pairs
            own_fd = _reference_features(run_dir, names, options, models["prompt_accuracy"]) if len(names) > 1 else None
        entry, per_pair[method], scales, n = _score_method(run_dir, options, method, names, size, models, own_fd)
        if video:
            frame_entry, frame_pairs = _frame_scores(run_dir, options, method, names, size, models)
            entry.update(frame_entry)
            per_pair[method].update(frame_pairs)
        ms_ssim_scales = scales or ms_ssim_scales
        results[method] = {**entry, **_timing(manifest["methods"].get(method, {})), "n_images": n}

    config = _report_config(manifest, methods, options, prompt_set, ms_ssim_scales)
    if video:
        config["frames_per_video"] = sorted(set(counts.values()))
    report = {"methods": results, "config": config, "unavailable": unavailable, "selection": chosen.describe(),
              "names": _grid_names(chosen)}  # fmt: skip
    report["pareto"] = pareto_data(report, cost)
    report["per_pair"] = per_pair
    if chosen.partial:  # the images of a partial method's per-pair lists (the others': every reference image)
        report["per_pair_names"] = {m: chosen.pairs[m] for m in chosen.partial}
    report["paired"] = paired_comparisons(per_pair, options.reference, extra, chosen.pairs)
    return report
