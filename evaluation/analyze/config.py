"""The options of ``tofu-sd analyze`` (:class:`AnalyzeConfig`), checked when they are made."""

from __future__ import annotations

from dataclasses import dataclass, field

from tofu_sd import TokenFusionConfig

from ..errors import EvaluationError
from ..linearity import DEFAULT_THRESHOLD, FUNCTIONS
from ..sampling import SamplingOptions


@dataclass(kw_only=True)
class AnalyzeConfig(SamplingOptions):
    r"""Options of :func:`~evaluation.analyze.analyze` (``tofu-sd analyze``): the sampling options of
    :class:`~evaluation.sampling.SamplingOptions` (``model``, ``prompts``, ``classes``, ``per_class`` (1),
    ``steps`` (20; every U-Net call is measured), ``seed``, ``batch_size``, ``device``, ``dtype``, ``height``,
    ``width``, ``guidance_scale`` (both halves are measured), ``scheduler``; the same seeds as ``tofu-sd
    generate``; ``model`` is ignored when :func:`~evaluation.analyze.analyze` is given a pipeline), and:

    Args:
        out (`str`):
            Folder for ``fl.json`` and ``fl.png``; created if needed.
        reduction (`TokenFusionConfig`):
            The reduction whose pairs are measured: ``ratio``, ``max_downsample`` (U-Nets) or ``blocks``
            (diffusion transformers), ``sx``, ``sy``, ``use_rand`` and ``seed`` as given to :func:`tofu_sd.apply`.
            Its ``schedule`` is ignored (it is what is proposed).
        all_blocks (`bool`, defaults to `False`):
            Measure every transformer block of the U-Net rather than those ``reduction`` patches. The proposal
            then needs ``max_downsample`` = the U-Net's coarsest over finest transformer resolution, which the
            result reports (``apply_kwargs``). On a diffusion transformer: every block, whatever ``blocks`` says
            (``apply_kwargs`` then has ``blocks=None``).
        num_points (`int`, defaults to `17`):
            Interpolation points N of Eq. 8, both ends included (``t = 0, 1/16, ..., 1``). The polygonal path
            is never longer than the true one, so FL with N points is an upper bound that falls as N grows; 17
            includes ``t = 1/2`` and is within 0.2% of the limit on a half circle (the tests check both).
        max_pairs (`int`, defaults to `64`):
            Pairs measured per block call and batch element, evenly spaced in similarity rank from the most
            similar of the ``r`` matched pairs to the least; bounds the cost at large N.
        threshold (`float`, defaults to `1/sqrt(2)`):
            ``P`` below, ``M`` at or above. Merging two tokens replaces both outputs by ``f`` of their merge;
            pruning gives the source the destination's output. If the output path bends once by an angle
            ``theta`` at the midpoint, FL = cos(theta), and the summed squared output error of averaging is
            smaller than pruning's exactly when theta < 45 degrees, i.e. FL > 1/sqrt(2) (a smooth arc breaks
            even lower, at 2/pi, so 1/sqrt(2) leans towards pruning).
        decision (`str`, defaults to `"self_attention"`):
            Which function's mean FL decides the letters: ``self_attention`` (in tofu_sd the merged tokens
            enter ``attn1``, and only ``attn1``), ``feed_forward`` (the paper's Fig. 3 choice), or ``min`` (the
            smaller of the two: prune if either is non-linear).
    """

    out: str
    reduction: TokenFusionConfig = field(default_factory=TokenFusionConfig)
    all_blocks: bool = False
    num_points: int = 17
    max_pairs: int = 64
    threshold: float = DEFAULT_THRESHOLD
    decision: str = "self_attention"

    def __post_init__(self) -> None:
        super().__post_init__()  # the sampling options
        for name, low in (("max_pairs", 1), ("num_points", 2)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise EvaluationError(f"{name} must be an integer >= {low}, got {value!r}")
        if not 0 < self.threshold <= 1:
            raise EvaluationError(f"threshold must be in (0, 1] (FL lies in [0, 1]), got {self.threshold}")
        if self.decision not in (*FUNCTIONS, "min"):
            raise EvaluationError(f"decision must be one of {', '.join((*FUNCTIONS, 'min'))}, got {self.decision!r}")
        if not isinstance(self.reduction, TokenFusionConfig) or self.reduction.ratio <= 0:
            raise EvaluationError("reduction must be a TokenFusionConfig with ratio > 0: with no reduction there are no pairs")
