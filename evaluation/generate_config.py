"""The options of ``tofu-sd generate`` (:class:`GenerateConfig`), checked when they are made: what a run directory
(:mod:`evaluation.rundir`) is bound to and what :func:`evaluation.generate.generate` makes."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

from tofu_sd import TokenFusionConfig

from .errors import EvaluationError
from .methods import MethodOptions, parse_methods
from .methods.base import DEFAULT_CACHE_INTERVAL
from .models import TINY, TINY_RANDOM, TINY_SD3, check_available, refuse_transformer_only, refuse_unet_only
from .sampling import SamplingOptions


@dataclass(kw_only=True)
class GenerateConfig(SamplingOptions):
    """Options of ``tofu-sd generate``: the sampling options (:class:`~evaluation.sampling.SamplingOptions`), and

    Args:
        out: the run directory.
        methods: method names (``full``, ``tome``, ``tofu@0.3``, ...), as :func:`evaluation.methods.parse_methods`
            gives them.
        reduction: the token-reduction options of every reducing method (a name's ``@ratio`` replaces its ratio).
        cache_interval: DeepCache's interval in the ``deepcache+<tofu>`` methods (an integer >= 2; ``deepcache@N``
            has its own); recorded in their parameters.
        warmup: one untimed call per method first, so one-time costs stay out of the timing.
        adopt: rebuild a lost manifest from the images in ``out`` (:mod:`evaluation.adopt`).
    """

    out: str
    methods: list[str]
    per_class: int = 2
    DEFAULT_STEPS: ClassVar[int] = 50  #: ``steps`` of a model without its own (``tiny-sd3``: 20)
    reduction: TokenFusionConfig = field(default_factory=TokenFusionConfig)
    cache_interval: int = DEFAULT_CACHE_INTERVAL
    warmup: bool = True
    adopt: bool = False

    def __post_init__(self) -> None:
        super().__post_init__()
        if not str(self.out):
            raise EvaluationError("--out must name a folder")
        if not isinstance(self.reduction, TokenFusionConfig):
            raise EvaluationError(f"reduction must be a TokenFusionConfig, got {type(self.reduction).__name__}")
        self.method_options  # noqa: B018 - checks cache_interval
        if not isinstance(self.methods, (list, tuple)) or not all(isinstance(m, str) for m in self.methods):
            raise EvaluationError(f"methods must be a list of method names, got {self.methods!r}")
        normal = parse_methods(",".join(self.methods), None, self.reduction)
        if normal != list(self.methods):
            raise EvaluationError(f"methods {list(self.methods)} are not in normal form; give {normal}")
        self.methods = list(self.methods)
        check_available(self.model)
        if self.model == TINY_SD3:  # a diffusion transformer, known before it is loaded (others: after, in generate)
            refuse_unet_only(self.methods, self.model)
        if self.model in (TINY, TINY_RANDOM):  # U-Nets, known before they are loaded
            refuse_transformer_only(self.methods, self.model)

    @property
    def method_options(self) -> MethodOptions:
        """The options of the methods besides ``reduction`` (:class:`~evaluation.methods.MethodOptions`): the
        DeepCache interval, and the steps and guidance scale, which diffusers' MagCache and FasterCache need."""
        return MethodOptions(cache_interval=self.cache_interval, steps=self.steps, guidance_scale=self.guidance_scale)
