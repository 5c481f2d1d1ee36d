"""The sampling options that ``tofu-sd generate`` and ``tofu-sd analyze`` share, and the seed of each image.

:class:`SamplingOptions` holds what a pipeline call needs beyond the method: the model, the prompts (a prompt set
and its classes, ``per_class`` samples each), the steps, seeds, size, guidance, scheduler, device, dtype and
batch size. It checks every value that can be checked without loading the model when it is built, so a bad
option fails before anything is loaded or written. :class:`evaluation.generate_config.GenerateConfig` and
:class:`evaluation.analyze.AnalyzeConfig` extend it (keyword arguments only).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from numbers import Real
from typing import ClassVar

import prompts

from .errors import EvaluationError
from .models import DEFAULT_MODEL, DTYPES, SCHEDULERS, default_prompt_set, model_defaults

MAX_PER_CLASS = 1000  #: samples per class that :func:`image_seed` keeps apart
SIZE_MULTIPLE = 8  #: Stable Diffusion pipelines refuse image sides that are not multiples of 8
_SEED_RANGE = (-(2**63), 2**64 - 1)  #: what torch's ``manual_seed`` takes


def image_seed(seed: int, class_index: int, k: int) -> int:
    """Seed of sample ``k`` of a class: the same for every method, and stable when the run is extended."""
    return seed * prompts.NUM_CLASSES * MAX_PER_CLASS + class_index * MAX_PER_CLASS + k


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


def is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def check_int(option: str, value, low: int, high: int | None = None) -> None:
    """EvaluationError unless ``value`` is an integer in ``[low, high]``."""
    if not is_int(value) or value < low or (high is not None and value > high):
        limits = f"in {low}-{high}" if high is not None else f"an integer >= {low}"
        raise EvaluationError(f"{option} must be {limits}, got {value!r}")


def check_size(option: str, value, multiple: int = SIZE_MULTIPLE, why: str = "Stable Diffusion pipelines need it") -> None:
    """EvaluationError unless ``value`` (an image side, or None for the model's default) is a positive multiple."""
    if value is not None and (not is_int(value) or value < multiple or value % multiple):
        near = f"; e.g. {max(multiple, value // multiple * multiple)}" if is_int(value) and value > 0 else ""
        raise EvaluationError(f"{option} must be a positive multiple of {multiple} ({why}), got {value!r}{near}")


@dataclass(kw_only=True)
class SamplingOptions:
    """What a pipeline call needs beyond the method; checked when built.

    Args:
        model: what :func:`evaluation.models.load_pipeline` loads: a hub id, a local folder, ``tiny`` or
            ``tiny-random``.
        prompts: prompt set, ``imagenet`` or ``shapes``; None: the model's own (``shapes`` for ``tiny`` and
            ``tiny-sd3``).
        classes: class indices of the prompt set; None: all of them.
        per_class: samples per class; sample ``k`` of class ``c`` has seed :func:`image_seed` ``(seed, c, k)``.
        steps: denoising steps; None: the model's own (``tiny-sd3``: 20), else :attr:`DEFAULT_STEPS`.
        seed: base seed.
        batch_size: prompts per pipeline call.
        device, dtype: ``auto`` or a torch device; ``auto``, ``fp32``, ``fp16`` or ``bf16``.
        height, width: image size in pixels; None: the model's default (for a run being extended: its size).
        guidance_scale: classifier-free guidance; None: the model's own (``tiny-sd3``: 5), else
            :attr:`DEFAULT_GUIDANCE`.
        scheduler: replace the model's scheduler (a name of :data:`evaluation.models.SCHEDULERS`), or None.
        frames: frames per video of a video pipeline (Wan: ``4 k + 1``); None: the pipeline's own (Wan: 81).
            Image pipelines refuse it (:func:`evaluation.pipeline_calls.check_frames`, once the model is loaded).
    """

    DEFAULT_STEPS: ClassVar[int] = 20  #: ``steps`` of a model without its own (:func:`~evaluation.models.model_defaults`)
    DEFAULT_GUIDANCE: ClassVar[float] = 7.5  #: ``guidance_scale`` of a model without its own

    model: str = DEFAULT_MODEL
    prompts: str | None = None
    classes: list[int] | None = None
    per_class: int = 1
    steps: int | None = None
    seed: int = 0
    batch_size: int = 4
    device: str = "auto"
    dtype: str = "auto"
    height: int | None = None
    width: int | None = None
    guidance_scale: float | None = None
    scheduler: str | None = None
    frames: int | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.model, str) or not self.model:
            raise EvaluationError(f"--model must name a model, got {self.model!r}")
        if self.prompts is None:
            self.prompts = default_prompt_set(self.model)
        own = model_defaults(self.model)
        if self.steps is None:
            self.steps = own.get("steps", self.DEFAULT_STEPS)
        if self.guidance_scale is None:
            self.guidance_scale = own.get("guidance_scale", self.DEFAULT_GUIDANCE)
        if self.prompts not in prompts.PROMPT_SETS:
            raise EvaluationError(f"unknown --prompts {self.prompts!r}; choose from {', '.join(prompts.PROMPT_SETS)}")
        self._check_classes()
        check_int("--per-class", self.per_class, 1, MAX_PER_CLASS)
        check_int("--steps", self.steps, 1)
        check_int("--batch-size", self.batch_size, 1)
        if self.frames is not None:
            check_int("--frames", self.frames, 1)
        if not is_int(self.seed) or not (
            _SEED_RANGE[0] <= image_seed(self.seed, 0, 0) and image_seed(self.seed, prompts.NUM_CLASSES, 0) <= _SEED_RANGE[1]
        ):
            raise EvaluationError(f"--seed must be an integer whose image seeds torch can take, got {self.seed!r}")
        check_size("--height", self.height)
        check_size("--width", self.width)
        if not isinstance(self.guidance_scale, Real) or isinstance(self.guidance_scale, bool) or not (
            math.isfinite(self.guidance_scale) and self.guidance_scale >= 0
        ):
            raise EvaluationError(f"--guidance-scale must be a finite number >= 0, got {self.guidance_scale!r}")
        if self.scheduler is not None and self.scheduler not in SCHEDULERS:
            raise EvaluationError(f"unknown --scheduler {self.scheduler!r}; choose from {', '.join(SCHEDULERS)}")
        if self.dtype != "auto" and self.dtype not in DTYPES:
            raise EvaluationError(f"unknown --dtype {self.dtype!r}; choose from auto, {', '.join(DTYPES)}")
        if not isinstance(self.device, str):
            raise EvaluationError(f"--device must be a name such as auto, cpu or cuda:1, got {self.device!r}")

    def _check_classes(self) -> None:
        count = len(prompts.class_names(self.prompts))
        if self.classes is None:
            self.classes = list(range(count))
        classes = self.classes
        if (
            not isinstance(classes, (list, tuple)) or not classes or not all(is_int(c) for c in classes)
            or min(classes) < 0 or max(classes) >= count or len(set(classes)) != len(classes)
        ):  # fmt: skip
            raise EvaluationError(
                f"--classes must be distinct indices 0-{count - 1} of the {self.prompts!r} prompt set, got {classes!r}"
            )
        self.classes = list(classes)

    def class_prompt(self, class_index: int) -> str:
        return prompts.prompt(class_index, self.prompts)

    def jobs(self) -> list[tuple[int, int]]:
        """Every (class, sample) pair, in the order the batches take them."""
        return [(c, k) for c in self.classes for k in range(self.per_class)]
