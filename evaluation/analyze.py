"""Functional-linearity analysis (Token Fusion paper, Sec. 3.1, Eq. 8, Fig. 3) that proposes a ToFu schedule.

ToFu prunes in blocks whose response to interpolated inputs is far from linear and merges (MLERP) where it is
close to linear. The paper measures this for ViT MLPs and leaves the switch point of other architectures to
tuning. :func:`analyze` measures it on a Stable Diffusion pipeline while it generates from real prompts:

1. at every block :func:`tofu_sd.apply` would patch (every transformer block with ``all_blocks``), the token
   pairs ``(X1, X2)`` the reduction would pair: bipartite soft matching on the block's input, with the same
   partition (cells, random destinations and their seed stream) and ``r = int(N * ratio)``;
2. for each pair, FL of Eq. 8 along the straight segment between the two tokens, as they enter

   - ``self_attention``: the block's ``attn1``, the interpolated token as the *query*; keys and values are the
     block's real, full ``attn1`` input (all N tokens of that call, fixed; see :func:`query_attention`);
   - ``feed_forward``: the block's ``ff`` (token-wise), between the two tokens' real ``ff`` inputs, which is
     the function of the paper's Fig. 3;

3. statistics per block and function, overall and per timestep group, and a proposed schedule: ``P`` where
   the decision function's mean FL is below ``threshold``, ``M`` otherwise.

The FL maths is in small pure functions (:func:`interpolation_points`, :func:`path_linearity`,
:func:`functional_linearity`, :func:`propose_schedule`), tested on closed forms.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Callable

import numpy as np
import torch

import prompts
from tofu_sd import TokenFusionConfig, get_state
from tofu_sd import hooks as tofu_hooks
from tofu_sd.blocks import TransformerBlockSite, select_sites, transformer_block_sites, unwrap_unet
from tofu_sd.merge import Matching

from .errors import EvaluationError
from .models import DEFAULT_MODEL, default_prompt_set

FUNCTIONS = ("self_attention", "feed_forward")
TIMESTEP_GROUPS = ("early", "middle", "late")
#: Break-even FL of merging versus pruning (see :class:`AnalyzeConfig`, ``threshold``): cos 45 degrees.
DEFAULT_THRESHOLD = 1 / math.sqrt(2)
QUANTILES = (0.05, 0.25, 0.5, 0.75, 0.95)


# ---------------------------------------------------------------------------------------------------------------
# Eq. 8, as pure functions
# ---------------------------------------------------------------------------------------------------------------


def interpolation_points(x1: torch.Tensor, x2: torch.Tensor, num_points: int) -> torch.Tensor:
    """``X(t_i) = (1 - t_i) X1 + t_i X2`` at ``t_i = i / (num_points - 1)``, ``i = 0 .. num_points - 1``.

    ``x1`` and ``x2`` are ``(..., C)``; the result is ``(..., num_points, C)``, its first and last points exactly
    ``x1`` and ``x2`` (``torch.lerp`` is exact at both ends).
    """
    if num_points < 2:
        raise ValueError(f"Eq. 8 needs at least 2 interpolation points (the two ends), got {num_points}.")
    if x1.shape != x2.shape:
        raise ValueError(f"x1 and x2 must have the same shape, got {tuple(x1.shape)} and {tuple(x2.shape)}.")
    t = torch.linspace(0, 1, num_points, dtype=x1.dtype, device=x1.device).unsqueeze(-1)
    return torch.lerp(x1.unsqueeze(-2), x2.unsqueeze(-2), t)


def path_linearity(outputs: torch.Tensor) -> torch.Tensor:
    """FL of Eq. 8 from ``f`` evaluated along the path: ``outputs`` ``(..., P, C')`` -> ``(...)``.

    ``||f(X(1)) - f(X(0))|| / sum_i ||f(X(t_{i+1})) - f(X(t_i))||``: the chord over the length of the
    polygonal output path. By the triangle inequality it lies in ``[0, 1]``, 1 for an affine ``f``. A path of
    length 0 (``f`` constant along the segment, an affine case) counts as 1. Computed in at least float32.
    """
    work = outputs.to(torch.promote_types(outputs.dtype, torch.float32))
    length = torch.linalg.vector_norm(work.diff(dim=-2), dim=-1).sum(dim=-1)
    chord = torch.linalg.vector_norm(work[..., -1, :] - work[..., 0, :], dim=-1)
    fl = torch.where(length > 0, chord / length.clamp_min(torch.finfo(work.dtype).tiny), torch.ones_like(chord))
    return fl.clamp(0, 1)  # rounding can put a straight path a hair above 1


def functional_linearity(
    f: Callable[[torch.Tensor], torch.Tensor], x1: torch.Tensor, x2: torch.Tensor, num_points: int
) -> torch.Tensor:
    """FL(f, X1, X2) of Eq. 8 for every pair of rows of ``x1``, ``x2`` ``(..., C)``; returns ``(...)``.

    ``f`` maps ``(..., P, C)`` to ``(..., P, C')`` row by row; it is called once on all the points.
    """
    return path_linearity(f(interpolation_points(x1, x2, num_points)))


def query_attention(attn: torch.nn.Module, queries: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
    """A diffusers ``Attention`` with ``queries`` ``(B, M, C)`` as queries and ``context`` ``(B, N, C)`` as keys and
    values: each query's output is what that token would get if it replaced one token of the sequence with
    every other token fixed (exactly so for ``context`` = the real sequence, up to the token's own key/value).
    """
    return attn.forward(queries, encoder_hidden_states=context)


def propose_schedule(mean_fl: list[float | None], threshold: float, fallback: str) -> str:
    """``P`` where the mean FL is below ``threshold``, ``M`` where it is not; ``fallback[i]`` where unmeasured."""
    if len(fallback) != len(mean_fl):
        raise ValueError(f"fallback has {len(fallback)} letters for {len(mean_fl)} blocks.")
    return "".join(
        fallback[i] if value is None or math.isnan(value) else ("P" if value < threshold else "M")
        for i, value in enumerate(mean_fl)
    )


def timestep_group(timestep: float, num_train_timesteps: int) -> str:
    """``early`` (t >= 2T/3, the noisiest third, first in generation), ``middle``, or ``late`` (t < T/3)."""
    if timestep >= 2 * num_train_timesteps / 3:
        return "early"
    return "middle" if timestep >= num_train_timesteps / 3 else "late"


def summarize(values: np.ndarray) -> dict:
    """``mean``, ``std``, ``count`` and the :data:`QUANTILES` (``q05`` ... ``q95``) of FL values; None if empty."""
    if values.size == 0:
        return {"mean": None, "std": None, "count": 0, **{_qname(q): None for q in QUANTILES}}
    qs = np.quantile(values, QUANTILES)
    return {
        "mean": float(values.mean()),
        "std": float(values.std()),
        "count": int(values.size),
        **{_qname(q): float(v) for q, v in zip(QUANTILES, qs)},
    }


def _qname(q: float) -> str:
    return "median" if q == 0.5 else f"q{round(q * 100):02d}"


# ---------------------------------------------------------------------------------------------------------------
# Configuration
# ---------------------------------------------------------------------------------------------------------------


@dataclass
class AnalyzeConfig:
    r"""Options of :func:`analyze` (``tofu-sd analyze``).

    Args:
        out (`str`):
            Folder for ``fl.json`` and ``fl.png``; created if needed.
        model (`str`, defaults to SD 1.5):
            What :func:`evaluation.models.load_pipeline` loads: a hub id, a local folder, ``tiny`` or
            ``tiny-random``. Ignored when :func:`analyze` is given a pipeline.
        prompts (`str`, *optional*):
            Prompt set, ``imagenet`` or ``shapes``. ``None``: the model's own (``shapes`` for ``tiny``).
        classes (`list[int]`, *optional*):
            Class indices of the prompt set to prompt with. ``None``: all of them.
        per_class (`int`, defaults to `1`):
            Samples per class; sample ``k`` of class ``c`` uses the same seed as in ``tofu-sd generate``.
        steps (`int`, defaults to `20`):
            Denoising steps per sample; every U-Net call is measured.
        seed (`int`, defaults to `0`):
            Base seed of the samples, as ``tofu-sd generate --seed``.
        reduction (`TokenFusionConfig`):
            The reduction whose pairs are measured: ``ratio``, ``max_downsample``, ``sx``, ``sy``, ``use_rand``
            and ``seed`` as given to :func:`tofu_sd.apply`. Its ``schedule`` is ignored (it is what is proposed).
        all_blocks (`bool`, defaults to `False`):
            Measure every transformer block of the U-Net rather than those ``reduction`` patches. The proposal
            then needs ``max_downsample`` = the U-Net's coarsest over finest transformer resolution, which the
            result reports (``apply_kwargs``).
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
        batch_size (`int`, defaults to `4`): prompts per pipeline call.
        device (`str`, defaults to `"auto"`): as ``tofu-sd generate --device``.
        dtype (`str`, defaults to `"auto"`): as ``tofu-sd generate --dtype``.
        height (`int`, *optional*): image height; ``None``, the model's default.
        width (`int`, *optional*): image width; ``None``, the model's default.
        guidance_scale (`float`, defaults to `7.5`): classifier-free guidance; both halves are measured.
        scheduler (`str`, *optional*): replace the model's scheduler, as ``tofu-sd generate --scheduler``.
    """

    out: str
    model: str = DEFAULT_MODEL
    prompts: str | None = None
    classes: list[int] | None = None
    per_class: int = 1
    steps: int = 20
    seed: int = 0
    reduction: TokenFusionConfig = field(default_factory=TokenFusionConfig)
    all_blocks: bool = False
    num_points: int = 17
    max_pairs: int = 64
    threshold: float = DEFAULT_THRESHOLD
    decision: str = "self_attention"
    batch_size: int = 4
    device: str = "auto"
    dtype: str = "auto"
    height: int | None = None
    width: int | None = None
    guidance_scale: float = 7.5
    scheduler: str | None = None

    def __post_init__(self) -> None:
        if self.prompts is None:
            self.prompts = default_prompt_set(self.model)
        if self.prompts not in prompts.PROMPT_SETS:
            raise EvaluationError(f"unknown prompt set {self.prompts!r}; choose from {', '.join(prompts.PROMPT_SETS)}")
        count = len(prompts.class_names(self.prompts))
        if self.classes is None:
            self.classes = list(range(count))
        if not self.classes or min(self.classes) < 0 or max(self.classes) >= count:
            raise EvaluationError(f"classes must be indices 0-{count - 1} of the {self.prompts!r} prompt set, got {self.classes}")
        for name, low in (("per_class", 1), ("steps", 1), ("batch_size", 1), ("max_pairs", 1), ("num_points", 2)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise EvaluationError(f"{name} must be an integer >= {low}, got {value!r}")
        if not 0 < self.threshold <= 1:
            raise EvaluationError(f"threshold must be in (0, 1] (FL lies in [0, 1]), got {self.threshold}")
        if self.decision not in (*FUNCTIONS, "min"):
            raise EvaluationError(f"decision must be one of {', '.join((*FUNCTIONS, 'min'))}, got {self.decision!r}")
        if not isinstance(self.reduction, TokenFusionConfig) or self.reduction.ratio <= 0:
            raise EvaluationError("reduction must be a TokenFusionConfig with ratio > 0: with no reduction there are no pairs")


# ---------------------------------------------------------------------------------------------------------------
# Measuring on a U-Net, with forward pre-hooks
# ---------------------------------------------------------------------------------------------------------------


def matched_pairs(m: Matching) -> tuple[torch.Tensor, torch.Tensor]:
    """Source and destination positions ``(B, r)`` of the pairs of a matching, most similar pair first.

    Each reduced source and the destination it is merged into (whose output it takes back at restore).
    """
    return m.src_idx, m.keep_idx.gather(1, m.dst_slot)


def _spread(count: int, keep: int, device: torch.device) -> torch.Tensor:
    """``keep`` indices evenly spaced over ``0 .. count - 1`` (all of them when ``keep >= count``)."""
    if keep >= count:
        return torch.arange(count, device=device)
    return torch.linspace(0, count - 1, keep, device=device).round().long()


def _take(x: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
    """Tokens ``x[b, pos[b, j]]``: ``(B, N, C)`` and ``(B, K)`` -> ``(B, K, C)``."""
    return x.gather(1, pos.unsqueeze(-1).expand(-1, -1, x.shape[-1]))


class _BlockProbe:
    """Forward pre-hooks on one block: pairs from its input, FL at ``attn1`` and ``ff`` from theirs.

    The pairs come from tofu_sd's own ``MatchingHook`` (same partition, seed stream and matching as ``apply``),
    driven by these plain torch pre-hooks so that the block itself runs unreduced.
    """

    def __init__(self, site: TransformerBlockSite, matcher: tofu_hooks.MatchingHook, run: "_Recorder") -> None:
        self.site, self.matcher, self.run = site, matcher, run
        self.pairs: tuple[torch.Tensor, torch.Tensor] | None = None
        self.values = {f: {g: [] for g in TIMESTEP_GROUPS} for f in FUNCTIONS}
        self.tokens: int | None = None

    def on_block(self, module, args, kwargs):
        x = args[0] if args else kwargs.get("hidden_states")
        self.pairs = None
        if x is None:
            return None
        self.matcher.pre_forward(module, x)
        m, self.matcher.state.matching = self.matcher.state.matching, None
        if m is not None:
            src, dst = matched_pairs(m)
            keep = _spread(src.shape[1], self.run.config.max_pairs, x.device)
            self.pairs, self.tokens = (src[:, keep], dst[:, keep]), x.shape[1]
        return None

    def _record(self, function: str, f, z: torch.Tensor) -> None:
        src, dst = self.pairs
        fl = functional_linearity(f, _take(z, src), _take(z, dst), self.run.config.num_points)
        self.values[function][self.run.group].append(fl.reshape(-1).float().cpu())

    def on_attn1(self, module, args, kwargs):
        z = args[0] if args else kwargs.get("hidden_states")
        if self.pairs is None or z is None or z.ndim != 3 or z.shape[1] != self.tokens:
            return None
        if kwargs.get("attention_mask") is not None or (len(args) > 2 and args[2] is not None):
            return None  # masked self-attention is not reduced by tofu_sd either
        context = kwargs.get("encoder_hidden_states", args[1] if len(args) > 1 else None)
        context = z if context is None else context  # only_cross_attention blocks attend to the text instead

        def f(points: torch.Tensor) -> torch.Tensor:  # (B, K, P, C) -> (B, K, P, C)
            B, K, P, C = points.shape
            return query_attention(module, points.reshape(B, K * P, C), context).reshape(B, K, P, -1)

        self._record("self_attention", f, z)
        return None

    def on_ff(self, module, args, kwargs):
        z = args[0] if args else kwargs.get("hidden_states")
        if self.pairs is None or z is None or z.ndim != 3 or z.shape[1] != self.tokens:
            return None
        self._record("feed_forward", module.forward, z)
        return None


class _Recorder:
    """Hooks on the U-Net (timestep), the transformers (grid) and the probed blocks, removed by :meth:`close`."""

    def __init__(self, unet: torch.nn.Module, sites: list[TransformerBlockSite], config: AnalyzeConfig,
                 reduction: TokenFusionConfig, num_train: int):  # fmt: skip
        self.config, self.num_train = config, num_train
        self.call = tofu_hooks.CallState(reduction, len(sites))
        self.grids: dict[int, tofu_hooks.GridState] = {}
        self.group = "early"
        self.handles = [unet.register_forward_pre_hook(self._on_unet, with_kwargs=True)]
        self.probes = []
        for index, site in enumerate(sites):
            if id(site.transformer) not in self.grids:
                self.grids[id(site.transformer)] = tofu_hooks.GridState()
                self.handles.append(site.transformer.register_forward_pre_hook(self._on_transformer, with_kwargs=True))
            matcher = tofu_hooks.MatchingHook(self.call, self.grids[id(site.transformer)], tofu_hooks.BlockState(), index)
            probe = _BlockProbe(site, matcher, self)
            self.probes.append(probe)
            self.handles += [
                site.block.register_forward_pre_hook(probe.on_block, with_kwargs=True),
                site.block.attn1.register_forward_pre_hook(probe.on_attn1, with_kwargs=True),
                site.block.ff.register_forward_pre_hook(probe.on_ff, with_kwargs=True),
            ]

    def _on_unet(self, module, args, kwargs):
        t = kwargs.get("timestep", args[1] if len(args) > 1 else None)
        self.call.start(t)
        value = float(torch.as_tensor(t).reshape(-1)[0]) if t is not None else 0.0
        self.group = timestep_group(value, self.num_train)
        return None

    def _on_transformer(self, module, args, kwargs):
        x = args[0] if args else kwargs.get("hidden_states")
        self.grids[id(module)].grid = tuple(x.shape[-2:]) if x is not None and x.ndim == 4 else None
        return None

    def close(self) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles = []
        self.call.start(None)


def analysis_sites(unet: torch.nn.Module, config: AnalyzeConfig) -> tuple[list[TransformerBlockSite], int]:
    """The blocks to measure and the ``max_downsample`` with which ``tofu_sd.apply`` patches exactly those."""
    sites = transformer_block_sites(unet)
    if not sites:
        raise EvaluationError(f"{type(unet).__name__} has no transformer block to analyze")
    if config.all_blocks:
        finest, coarsest = min(s.downsample for s in sites), max(s.downsample for s in sites)
        return sites, coarsest // finest
    return select_sites(sites, config.reduction.max_downsample), config.reduction.max_downsample


def measure(pipe, config: AnalyzeConfig, progress: bool = True) -> dict:
    """Run ``pipe`` on the configured prompts and measure FL at each analysed block; returns ``fl.json``'s content."""
    from tqdm.auto import tqdm

    from .generate import image_seed
    from .models import default_size

    unet = unwrap_unet(pipe)
    if get_state(unet) is not None:
        raise EvaluationError(
            "Token Fusion is applied to this pipeline; the analysis measures the unreduced model. "
            "Call tofu_sd.remove(pipe) first."
        )
    for site in transformer_block_sites(unet):
        if getattr(site.block, "_chunk_size", None) is not None:
            raise EvaluationError(
                f"{site.name} runs its feed-forward in chunks, so ff never sees the whole token set; "
                "call pipe.unet.disable_forward_chunking() before the analysis."
            )
    sites, max_downsample = analysis_sites(unet, config)
    num_train = int(pipe.scheduler.config.get("num_train_timesteps", 1000))
    height = config.height or default_size(pipe)
    width = config.width or default_size(pipe)
    jobs = [(c, k) for c in config.classes for k in range(config.per_class)]
    reduction = replace(config.reduction, schedule=None, max_downsample=max_downsample)
    recorder = _Recorder(unet, sites, config, reduction, num_train)
    started = time.perf_counter()
    try:
        bar = tqdm(total=len(jobs), unit="img", disable=not progress, desc="analyzing")
        for start in range(0, len(jobs), config.batch_size):
            batch = jobs[start : start + config.batch_size]
            with torch.no_grad():
                pipe(
                    prompt=[prompts.prompt(c, config.prompts) for c, _ in batch],
                    num_inference_steps=config.steps,
                    guidance_scale=config.guidance_scale,
                    height=height,
                    width=width,
                    generator=[torch.Generator("cpu").manual_seed(image_seed(config.seed, c, k)) for c, k in batch],
                    output_type="latent",  # the images themselves are not needed
                )
            bar.update(len(batch))
        bar.close()
    finally:
        recorder.close()

    default = TokenFusionConfig(schedule=None).resolve_schedule([s.name for s in sites], [s.on_down_path for s in sites])
    blocks = []
    for site, probe, letter in zip(sites, recorder.probes, default):
        fl = {}
        for function in FUNCTIONS:
            groups = {g: _cat(probe.values[function][g]) for g in TIMESTEP_GROUPS}
            fl[function] = summarize(np.concatenate(list(groups.values())))
            fl[function]["by_timestep"] = {g: summarize(v) for g, v in groups.items()}
        blocks.append({
            "name": site.name, "downsample": site.downsample, "on_down_path": site.on_down_path,
            "tokens": probe.tokens, "default_letter": letter, "fl": fl,
        })  # fmt: skip
    decision = [_decision_value(b["fl"], config.decision) for b in blocks]
    schedule = propose_schedule(decision, config.threshold, default)
    for block, letter in zip(blocks, schedule):
        block["proposed_letter"] = letter
    return {
        "blocks": blocks,
        "proposed_schedule": schedule,
        "default_schedule": default,
        "apply_kwargs": {**asdict(reduction), "schedule": schedule},
        "method": {
            "fl": "Eq. 8: ||f(X1) - f(X2)|| / sum of ||f(X(t_i+1)) - f(X(t_i))|| over the polygonal path",
            "num_points": config.num_points,
            "pairs": f"tofu_sd's matching on each block's input at ratio {reduction.ratio}, up to {config.max_pairs} "
            "pairs per call and batch element, evenly spaced in similarity rank",
            "functions": {
                "self_attention": "attn1 with the interpolated token as query; keys and values: the call's full "
                "attn1 input, fixed",
                "feed_forward": "ff on the interpolated ff input",
            },
            "timestep_groups": {"early": f"t >= {2 * num_train / 3:g}", "middle": f"{num_train / 3:g} <= t < {2 * num_train / 3:g}",
                                "late": f"t < {num_train / 3:g}"},  # fmt: skip
            "threshold": config.threshold,
            "decision": config.decision,
        },
        "config": _config_dict(config, pipe, height, width),
        "seconds": time.perf_counter() - started,
    }


def _cat(chunks: list[torch.Tensor]) -> np.ndarray:
    return torch.cat(chunks).numpy() if chunks else np.zeros(0, dtype=np.float32)


def _decision_value(fl: dict, decision: str) -> float | None:
    values = [fl[f]["mean"] for f in (FUNCTIONS if decision == "min" else (decision,))]
    return None if any(v is None for v in values) else min(values)


def _config_dict(config: AnalyzeConfig, pipe, height: int, width: int) -> dict:
    data = asdict(config)
    data["reduction"] = asdict(config.reduction)
    data.update(height=height, width=width, model_class=type(pipe).__name__)
    return data


# ---------------------------------------------------------------------------------------------------------------
# Plot and entry point
# ---------------------------------------------------------------------------------------------------------------


def short_name(name: str) -> str:
    """``down_blocks.0.attentions.1.transformer_blocks.0`` -> ``down0.1.0`` (``mid.0.0`` for the mid block)."""
    parts = name.split(".")
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
    fig.savefig(path, dpi=130)
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


def analyze(config: AnalyzeConfig, pipe=None, progress: bool = True) -> dict:
    """Measure FL on ``pipe`` (loaded from ``config.model`` when None), write ``fl.json`` and ``fl.png`` in
    ``config.out``, and return the result; ``result["proposed_schedule"]`` goes to ``tofu_sd.apply(pipe,
    schedule=..., max_downsample=result["apply_kwargs"]["max_downsample"])``.
    """
    from .generate import library_versions, write_json_atomic
    from .models import load_pipeline, resolve_device, resolve_dtype

    out = Path(config.out)
    if out.exists() and not out.is_dir():
        raise EvaluationError(f"--out {out} is a file; give a folder for fl.json and fl.png")
    if pipe is None:
        device = resolve_device(config.device)
        pipe = load_pipeline(config.model, device, resolve_dtype(config.dtype, device), config.scheduler)
    result = measure(pipe, config, progress)
    result["versions"] = library_versions()
    result["date"] = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())
    out.mkdir(parents=True, exist_ok=True)
    write_json_atomic(out / "fl.json", result)
    plot(result, out / "fl.png")
    return result


def format_summary(result: dict) -> str:
    """A table of the mean FL per block and function, with the default and proposed letters."""
    lines = [f"{'block':<50} {'tokens':>6} {'attn1 FL':>9} {'ff FL':>9}  default  proposed"]
    for b in result["blocks"]:
        a, f = (b["fl"][name]["mean"] for name in FUNCTIONS)
        fmt = lambda v: "-" if v is None else f"{v:.4f}"  # noqa: E731
        lines.append(f"{b['name']:<50} {b['tokens'] or '-':>6} {fmt(a):>9} {fmt(f):>9}  {b['default_letter']:^7}  {b['proposed_letter']:^8}")
    return "\n".join(lines)
