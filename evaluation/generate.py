"""Batch generation over class prompts (ImageNet, or the built-in model's shapes) for several methods, same seeds.

Layout of a run directory::

    runs/NAME/manifest.json                 configuration, library versions, per-method time and memory
    runs/NAME/<method>/<class:04d>_<k>.png  prompt, seed, method and class in the PNG text metadata

The run is resumable: finished images are skipped, every PNG is written to a temporary name and renamed, and
the manifest is rewritten (atomically) after every batch. A run directory is bound to the options that shape
its images; asking for other ones is refused rather than mixing images.
"""

from __future__ import annotations

import json
import os
import platform
import time
from dataclasses import asdict, dataclass, field
from importlib import metadata
from pathlib import Path

import torch
from PIL import Image, PngImagePlugin

import prompts
from tofu_sd import TokenFusionConfig

from .errors import EvaluationError
from .memory import PeakMemory
from .methods import method_applied
from .models import default_prompt_set, default_size, load_pipeline, resolve_device, resolve_dtype

MANIFEST = "manifest.json"
MAX_PER_CLASS = 1000


@dataclass
class GenerateConfig:
    """Options of ``tofu-sd generate``."""

    out: str
    model: str
    methods: list[str]
    classes: list[int]
    per_class: int = 2
    steps: int = 50
    seed: int = 0
    reduction: TokenFusionConfig = field(default_factory=TokenFusionConfig)
    batch_size: int = 4
    device: str = "auto"
    dtype: str = "auto"
    height: int | None = None
    width: int | None = None
    guidance_scale: float = 7.5
    scheduler: str | None = None
    warmup: bool = True
    prompts: str | None = None  #: prompt set (``imagenet``, ``shapes``); None: the model's own (see models.py)

    def __post_init__(self) -> None:
        if self.prompts is None:
            self.prompts = default_prompt_set(self.model)
        if self.prompts not in prompts.PROMPT_SETS:
            raise EvaluationError(f"unknown --prompts {self.prompts!r}; choose from {', '.join(prompts.PROMPT_SETS)}")
        count = len(prompts.class_names(self.prompts))
        if self.classes and max(self.classes) >= count:
            raise EvaluationError(
                f"--classes goes up to {max(self.classes)}, but the {self.prompts!r} prompt set has {count} classes "
                f"(0-{count - 1})"
            )


# Options that change pixels: a run directory keeps the ones it was started with.
IMAGE_KEYS = ("model", "prompts", "steps", "seed", "reduction", "device", "dtype", "height", "width", "guidance_scale", "scheduler")


def parse_classes(text: str, num_classes: int = prompts.NUM_CLASSES) -> list[int]:
    """``0-999``, ``3``, ``0,5,7-9`` -> sorted class indices in ``[0, num_classes)``."""
    classes: set[int] = set()
    try:
        for part in filter(None, (p.strip() for p in text.split(","))):
            lo, _, hi = part.partition("-")
            lo_i, hi_i = int(lo), int(hi or lo)
            if not 0 <= lo_i <= hi_i < num_classes:
                raise ValueError
            classes.update(range(lo_i, hi_i + 1))
    except ValueError:
        raise EvaluationError(
            f"bad --classes {text!r}: give class indices in 0-{num_classes - 1} as ranges or lists, e.g. "
            f"0-{num_classes - 1} or 1,5,10-19"
        ) from None
    if not classes:
        raise EvaluationError(f"--classes {text!r} selects no class")
    return sorted(classes)


def image_seed(seed: int, class_index: int, k: int) -> int:
    """Seed of sample ``k`` of a class: the same for every method, and stable when the run is extended."""
    return seed * prompts.NUM_CLASSES * MAX_PER_CLASS + class_index * MAX_PER_CLASS + k


def image_name(class_index: int, k: int) -> str:
    return f"{class_index:04d}_{k}.png"


def write_json_atomic(path: Path, data: dict) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=False) + "\n")
    os.replace(tmp, path)


def save_png_atomic(image: Image.Image, path: Path, text: dict[str, str]) -> None:
    info = PngImagePlugin.PngInfo()
    for key, value in text.items():
        info.add_text(key, value)
    tmp = path.with_name(f".{path.name}.tmp")
    image.save(tmp, format="PNG", pnginfo=info)
    os.replace(tmp, path)


def library_versions() -> dict[str, str]:
    versions = {"python": platform.python_version()}
    for name in ("tofu-sd", "torch", "diffusers", "transformers", "tomesd"):
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = "not installed"
    return versions


def _image_config(config: GenerateConfig) -> dict:
    data = asdict(config)
    return {key: data[key] for key in IMAGE_KEYS}


def load_manifest(run_dir: Path) -> dict | None:
    path = run_dir / MANIFEST
    if not path.exists():
        return None
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as error:
        raise EvaluationError(f"{path} is unreadable ({error}); it is not a tofu-sd run directory") from error


def _open_run(config: GenerateConfig, device: torch.device, dtype: torch.dtype) -> tuple[Path, dict]:
    """Create or reopen the run directory; refuse one made with other image options, or not by tofu-sd."""
    run_dir = Path(config.out)
    image_config = _image_config(config)
    image_config.update(device=device.type, dtype=str(dtype).removeprefix("torch."))
    manifest = load_manifest(run_dir)
    if manifest is None:
        if run_dir.exists() and any(run_dir.iterdir()):
            raise EvaluationError(
                f"{run_dir} exists and is not a tofu-sd run directory (no {MANIFEST}); choose a new --out"
            )
        run_dir.mkdir(parents=True, exist_ok=True)
        manifest = {"config": image_config, "classes": [], "per_class": 0, "methods": {}}
    else:
        old = manifest.get("config", {})
        old.setdefault("prompts", "imagenet")  # runs made before prompt sets existed
        # An unset height / width means the model's default, which the run recorded when it started.
        changed = {
            k: (old.get(k), v)
            for k, v in image_config.items()
            if old.get(k) != v and not (v is None and k in ("height", "width"))
        }
        if changed:
            lines = "\n".join(f"  {k}: run has {a!r}, this call asks {b!r}" for k, (a, b) in changed.items())
            raise EvaluationError(
                f"{run_dir} was generated with other options; mixing images would make the comparison wrong:\n"
                f"{lines}\nRe-run with the run's options, or choose a new --out."
            )
    manifest["classes"] = sorted(set(manifest["classes"]) | set(config.classes))
    manifest["per_class"] = max(manifest["per_class"], config.per_class)
    manifest["versions"] = library_versions()
    for method in config.methods:
        manifest["methods"].setdefault(method, {"seconds": 0.0, "images_timed": 0, "peak_mem_bytes": 0})
    return run_dir, manifest


def generate(config: GenerateConfig, progress: bool = True) -> dict:
    """Generate every missing image of ``config``; returns the manifest."""
    from tqdm.auto import tqdm

    device = resolve_device(config.device)
    dtype = resolve_dtype(config.dtype, device)
    if not 1 <= config.per_class <= MAX_PER_CLASS:
        raise EvaluationError(f"--per-class must be in 1-{MAX_PER_CLASS}, got {config.per_class}")
    if config.batch_size < 1 or config.steps < 1:
        raise EvaluationError("--batch-size and --steps must be at least 1")
    run_dir, manifest = _open_run(config, device, dtype)
    pipe = load_pipeline(config.model, device, dtype, config.scheduler)
    height = config.height or default_size(pipe)
    width = config.width or default_size(pipe)
    manifest["config"].update(height=height, width=width, model_class=type(pipe).__name__)
    for method in config.methods:
        (run_dir / method).mkdir(exist_ok=True)
        for stale in (run_dir / method).glob(".*.tmp"):  # left by an interrupted write
            stale.unlink()

    jobs = [(c, k) for c in config.classes for k in range(config.per_class)]
    todo = {m: [j for j in jobs if not (run_dir / m / image_name(*j)).exists()] for m in config.methods}
    total = sum(len(v) for v in todo.values())
    write_json_atomic(run_dir / MANIFEST, manifest)
    bar = tqdm(total=total, unit="img", disable=not progress or total == 0, desc="generating")
    memory = PeakMemory(device)
    warmed: set[str] = set()

    def run_pipe(batch, steps):
        return pipe(
            prompt=[prompts.prompt(c, config.prompts) for c, _ in batch],
            num_inference_steps=steps,
            guidance_scale=config.guidance_scale,
            height=height,
            width=width,
            generator=[torch.Generator("cpu").manual_seed(image_seed(config.seed, c, k)) for c, k in batch],
        ).images

    try:
        for start in range(0, len(jobs), config.batch_size):
            chunk = set(jobs[start : start + config.batch_size])
            for method in config.methods:  # interleaved, so slow drifts of the machine hit every method alike
                batch = [j for j in todo[method] if j in chunk]
                if not batch:
                    continue
                with method_applied(pipe, method, config.reduction):
                    if config.warmup and method not in warmed:
                        run_pipe(batch, 1)  # one-time costs (allocator, kernels) stay out of the timing
                        warmed.add(method)
                    with memory.measure() as peak:
                        t0 = time.perf_counter()
                        images = run_pipe(batch, config.steps)
                        seconds = time.perf_counter() - t0
                for (c, k), image in zip(batch, images):
                    save_png_atomic(image, run_dir / method / image_name(c, k), {
                        "prompt": prompts.prompt(c, config.prompts), "seed": str(image_seed(config.seed, c, k)),
                        "method": method, "class_index": str(c), "class_name": prompts.class_names(config.prompts)[c],
                        "model": config.model, "prompt_set": config.prompts,
                    })  # fmt: skip
                stats = manifest["methods"][method]
                stats["seconds"] += seconds
                stats["images_timed"] += len(batch)
                stats["peak_mem_bytes"] = max(stats["peak_mem_bytes"], peak.bytes)
                stats["peak_mem_kind"] = memory.kind
                write_json_atomic(run_dir / MANIFEST, manifest)
                bar.update(len(batch))
                bar.set_postfix(method=method)
    finally:
        bar.close()
    return manifest
