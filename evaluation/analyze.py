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

On a diffusion transformer (SD3 / SD3.5, PixArt, Flux; :mod:`tofu_sd.dit`) the same is measured at the blocks
``tofu_sd.apply`` patches (``reduction.blocks``, by index in forward order; every block with ``all_blocks``),
the pairs from :mod:`tofu_sd.dit_hooks`' own ``BlockMatchingHook`` on the block's image tokens, and

- ``self_attention``: each attention the block reduces around (SD3's joint ``attn``, pooled with SD3.5's
  ``attn2`` in its dual-attention blocks; PixArt's ``attn1``; Flux's ``attn``), the interpolated image token
  as the query (``to_q``, ``norm_q``), keys and values from the call's real image *and text* tokens, fixed
  (:func:`~evaluation.linearity.joint_query_attention`; PixArt, whose text is cross-attention, as on a U-Net).
  Flux's rotary positions: the interpolated token takes the pair's *destination*'s, as a merged group does in
  ``tofu_sd`` (so ``f(X2)`` is the destination's real output, and the path is along features only);
- ``feed_forward``: the block's ``ff`` on the image tokens (Flux's single-stream blocks: ``act_mlp(proj_mlp(.))``
  on the image part of their ``[text, image]`` sequence);

and the fallback of unmeasured blocks is :func:`tofu_sd.dit.default_schedule`.

The FL maths is in small pure functions in :mod:`evaluation.linearity`, tested on closed forms; the plot is
:mod:`evaluation.linearity_plot`.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
import torch

import prompts
from tofu_sd import TokenFusionConfig, dit, dit_hooks, get_state
from tofu_sd import hooks as tofu_hooks
from tofu_sd.blocks import TransformerBlockSite, select_sites, transformer_block_sites, unwrap_unet
from tofu_sd.merge import Matching

from .errors import EvaluationError
from .linearity import (
    DEFAULT_THRESHOLD,
    FUNCTIONS,
    TIMESTEP_GROUPS,
    functional_linearity,
    joint_query_attention,
    propose_schedule,
    query_attention,
    summarize,
    timestep_group,
)
from .linearity_plot import plot
from .sampling import SamplingOptions



# ---------------------------------------------------------------------------------------------------------------
# Configuration
# ---------------------------------------------------------------------------------------------------------------


@dataclass(kw_only=True)
class AnalyzeConfig(SamplingOptions):
    r"""Options of :func:`analyze` (``tofu-sd analyze``): the sampling options of
    :class:`~evaluation.sampling.SamplingOptions` (``model``, ``prompts``, ``classes``, ``per_class`` (1),
    ``steps`` (20; every U-Net call is measured), ``seed``, ``batch_size``, ``device``, ``dtype``, ``height``,
    ``width``, ``guidance_scale`` (both halves are measured), ``scheduler``; the same seeds as ``tofu-sd
    generate``; ``model`` is ignored when :func:`analyze` is given a pipeline), and:

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


def _check_unreduced(unet) -> None:
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


def _run_prompts(pipe, config: AnalyzeConfig, height: int, width: int, progress: bool) -> None:
    """Denoise every (class, sample) of ``config`` with the seeds of ``tofu-sd generate``, latents only."""
    from tqdm.auto import tqdm

    from .models import call_kwargs
    from .sampling import image_seed

    jobs = [(c, k) for c in config.classes for k in range(config.per_class)]
    with tqdm(total=len(jobs), unit="img", disable=not progress, desc="analyzing") as bar:
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
                    **call_kwargs(config.model),
                )
            bar.update(len(batch))


def _fl_statistics(probe) -> dict:
    """A probe's FL statistics per measured function, overall and per timestep group."""
    fl = {}
    for function in FUNCTIONS:
        groups = {g: _cat(probe.values[function][g]) for g in TIMESTEP_GROUPS}
        fl[function] = summarize(np.concatenate(list(groups.values())))
        fl[function]["by_timestep"] = {g: summarize(v) for g, v in groups.items()}
    return fl


def _block_results(sites, probes, default: str) -> list[dict]:
    """Per analysed block: where it is, its token count, its default letter and its FL statistics."""
    blocks = []
    for site, probe, letter in zip(sites, probes, default):
        fl = _fl_statistics(probe)
        blocks.append({
            "name": site.name, "downsample": site.downsample, "on_down_path": site.on_down_path,
            "tokens": probe.tokens, "default_letter": letter, "fl": fl,
        })  # fmt: skip
    return blocks


def _method(config: AnalyzeConfig, reduction: TokenFusionConfig, num_train: int) -> dict:
    """How the numbers were measured, for ``fl.json``."""
    return {
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
    }


def measure(pipe, config: AnalyzeConfig, progress: bool = True) -> dict:
    """Run ``pipe`` on the configured prompts and measure FL at each analysed block; returns ``fl.json``'s content."""
    from .models import default_size, is_transformer_pipeline

    if is_transformer_pipeline(pipe):
        return _measure_dit(pipe, config, progress)
    if config.reduction.blocks is not None:
        raise EvaluationError(
            f"--blocks {config.reduction.blocks} chooses blocks of a diffusion transformer; a U-Net's blocks are "
            "chosen by resolution: use --max-downsample (or --all-blocks)"
        )
    unet = unwrap_unet(pipe)
    _check_unreduced(unet)
    sites, max_downsample = analysis_sites(unet, config)
    num_train = int(pipe.scheduler.config.get("num_train_timesteps", 1000))
    height = config.height or default_size(pipe)
    width = config.width or default_size(pipe)
    reduction = replace(config.reduction, schedule=None, max_downsample=max_downsample)
    recorder = _Recorder(unet, sites, config, reduction, num_train)
    started = time.perf_counter()
    try:
        _run_prompts(pipe, config, height, width, progress)
    finally:
        recorder.close()
    default = TokenFusionConfig(schedule=None).resolve_schedule([s.name for s in sites], [s.on_down_path for s in sites])
    blocks = _block_results(sites, recorder.probes, default)
    schedule = propose_schedule([_decision_value(b["fl"], config.decision) for b in blocks], config.threshold, default)
    for block, letter in zip(blocks, schedule):
        block["proposed_letter"] = letter
    return {
        "blocks": blocks,
        "proposed_schedule": schedule,
        "default_schedule": default,
        "apply_kwargs": {**asdict(reduction), "schedule": schedule},
        "method": _method(config, reduction, num_train),
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
# Measuring on a diffusion transformer (SD3 / SD3.5, PixArt, Flux), with forward pre-hooks
# ---------------------------------------------------------------------------------------------------------------


class _DiTProbe(_BlockProbe):
    """Forward pre-hooks on one block of a diffusion transformer: pairs from its input image tokens, FL at each
    attention it reduces around and at its feed-forward.

    The pairs come from tofu_sd.dit's own ``BlockMatchingHook`` (same partition, seed stream and matching as
    ``apply``), driven by a plain torch pre-hook with the block's own arguments (a single-stream block's
    ``encoder_hidden_states`` give the number of text tokens in front of its image tokens)."""

    def __init__(self, site: dit.DiTSite, matcher: dit_hooks.BlockMatchingHook, state: dit_hooks.BlockState,
                 run: "_DiTRecorder") -> None:  # fmt: skip
        super().__init__(site, matcher, run)
        self.state = state
        self.text_len: int | None = None

    def on_block(self, module, args, kwargs):
        self.pairs = None
        self.matcher.pre_forward(module, *args, **kwargs)
        m, self.text_len = self.state.matching, self.state.text_len
        self.state.matching = self.state.text_len = None
        if m is not None:
            x = tofu_hooks._argument(args, kwargs, 0, "hidden_states")
            src, dst = matched_pairs(m)
            keep = _spread(src.shape[1], self.run.config.max_pairs, x.device)
            self.pairs, self.tokens = (src[:, keep], dst[:, keep]), x.shape[1]
        return None

    def attention_function(self, attn, context, added=None, rotary=None, offset=0, project_out=True):
        """``f``: interpolated image tokens ``(B, K, P, C)`` -> ``attn``'s image output for each as the query,
        keys and values from ``context`` (and ``added``, the text stream) fixed. ``rotary`` (Flux): the call's
        ``(cos, sin)`` over ``[added, context]`` rows, or over ``context`` alone when ``added`` is None (the
        single-stream ``[text, image]`` sequence); each point of pair ``j`` is rotated at the position of its
        destination, row ``offset + dst``."""
        dst = self.pairs[1]

        def f(points: torch.Tensor) -> torch.Tensor:
            B, K, P, C = points.shape
            extra = {}
            if rotary is not None:
                rows = (offset + dst).reshape(-1)
                extra["query_rotary"] = tuple(
                    t.index_select(0, rows).view(B, K, 1, -1).expand(B, K, P, -1).reshape(B, K * P, -1) for t in rotary
                )
                if added is None:
                    extra["context_rotary"] = rotary
                else:
                    text = added.shape[1]
                    extra["context_rotary"] = tuple(t[text:] for t in rotary)
                    extra["added_rotary"] = tuple(t[:text] for t in rotary)
            out = joint_query_attention(attn, points.reshape(B, K * P, C), context, added, project_out=project_out, **extra)
            return out.reshape(B, K, P, -1)

        return f

    def _measurable(self, z, tokens: int) -> bool:
        return self.pairs is not None and z is not None and z.ndim == 3 and z.shape[1] == tokens

    def on_image_attention(self, module, args, kwargs):
        """SD3's ``attn`` / ``attn2``, Flux's double-stream ``attn``: ``hidden_states`` the image tokens,
        ``encoder_hidden_states`` the text stream (None for SD3.5's ``attn2``)."""
        z = tofu_hooks._argument(args, kwargs, 0, "hidden_states")
        if not self._measurable(z, self.tokens) or tofu_hooks._argument(args, kwargs, 2, "attention_mask") is not None:
            return None  # masked attention is not reduced by tofu_sd either
        text = tofu_hooks._argument(args, kwargs, 1, "encoder_hidden_states")
        rotary = tofu_hooks._argument(args, kwargs, 3, "image_rotary_emb") if self.run.arch.rotary else None
        offset = 0 if text is None else text.shape[1]
        if rotary is not None and rotary[0].shape[0] != offset + z.shape[1]:
            return None  # positions laid out otherwise than [text, image]: tofu_sd leaves the call alone too
        self._record("self_attention", self.attention_function(module, z, text, rotary, offset), z)
        return None

    def on_single_attention(self, module, args, kwargs):
        """A Flux single-stream block's ``attn``: ``hidden_states`` is ``[text, image]``; the image part is measured."""
        x, text = tofu_hooks._argument(args, kwargs, 0, "hidden_states"), self.text_len
        if text is None or not self._measurable(x, text + (self.tokens or 0)):
            return None
        if tofu_hooks._argument(args, kwargs, 2, "attention_mask") is not None:
            return None
        rotary = tofu_hooks._argument(args, kwargs, 3, "image_rotary_emb")
        if rotary is not None and rotary[0].shape[0] != x.shape[1]:
            return None
        f = self.attention_function(module, x, None, rotary, offset=text, project_out=False)
        self._record("self_attention", f, x[:, text:])
        return None

    def on_single_mlp(self, module, args, kwargs):
        """A Flux single-stream block's ``proj_mlp``: its MLP branch ``act_mlp(proj_mlp(.))`` on the image part."""
        x, text = (args[0] if args else kwargs.get("input")), self.text_len
        if text is None or not self._measurable(x, text + (self.tokens or 0)):
            return None
        act = self.site.block.act_mlp
        self._record("feed_forward", lambda points: act.forward(module.forward(points)), x[:, text:])
        return None


def dit_architecture(model: torch.nn.Module) -> dit.Architecture:
    return next(arch for cls, arch in dit.ARCHITECTURES.items() if isinstance(model, cls))


class _DiTRecorder:
    """Hooks on the transformer model (timestep and grid, through tofu_sd.dit's own ``TransformerCallHooks``) and
    on the probed blocks, removed by :meth:`close`."""

    def __init__(self, model: torch.nn.Module, arch: dit.Architecture, sites: list, config: AnalyzeConfig,
                 reduction: TokenFusionConfig, num_train: int):  # fmt: skip
        self.config, self.num_train, self.arch = config, num_train, arch
        self.call = tofu_hooks.CallState(reduction, len(sites))
        self.model_state = dit_hooks.ModelState()
        self.outer = dit_hooks.TransformerCallHooks(
            self.call, self.model_state, arch.grid, arch.timestep_index, arch.timestep_scale
        )
        self.group = "early"
        self.handles = [
            model.register_forward_pre_hook(self._on_model, with_kwargs=True),
            model.register_forward_hook(self.outer.post, with_kwargs=True, always_call=True),
        ]
        self.probes = []
        for index, site in enumerate(sites):
            state = dit_hooks.BlockState()
            matcher = dit_hooks.BlockMatchingHook(self.call, self.model_state, state, index, text_len=site.single_stream)
            probe = _DiTProbe(site, matcher, state, self)
            self.probes.append(probe)
            block = site.block
            self.handles.append(block.register_forward_pre_hook(probe.on_block, with_kwargs=True))
            if site.single_stream:
                pre = [(block.attn, probe.on_single_attention), (block.proj_mlp, probe.on_single_mlp)]
            else:
                on_attention = probe.on_attn1 if arch.name == "PixArt" else probe.on_image_attention
                pre = [(getattr(block, part), on_attention) for part in site.attentions] + [(block.ff, probe.on_ff)]
            self.handles += [module.register_forward_pre_hook(hook, with_kwargs=True) for module, hook in pre]

    def _on_model(self, module, args, kwargs):
        self.outer.pre(module, args, kwargs)
        t = tofu_hooks._argument(args, kwargs, self.arch.timestep_index, "timestep")
        value = float(torch.as_tensor(t).reshape(-1)[0]) * self.arch.timestep_scale if t is not None else 0.0
        self.group = timestep_group(value, self.num_train)
        return None

    def close(self) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles = []
        self.call.finish()
        self.model_state.grid = None


def _dit_sites(model: torch.nn.Module, arch: dit.Architecture, config: AnalyzeConfig):
    """The blocks to measure and the ``blocks`` with which ``tofu_sd.apply`` patches exactly those (None: all)."""
    sites = arch.sites(model)
    if not sites:
        raise EvaluationError(f"{type(model).__name__} has no transformer block to analyze")
    if config.reduction.max_downsample != 1:
        raise EvaluationError(
            f"--max-downsample {config.reduction.max_downsample} only means something for U-Nets (their "
            f"lower-resolution blocks); a {arch.name} transformer has one token grid: choose its blocks with --blocks"
        )
    if config.all_blocks:
        return sites, None
    try:
        return dit.select_sites(sites, config.reduction), config.reduction.blocks
    except ValueError as error:
        raise EvaluationError(str(error)) from error


def _check_unreduced_dit(pipe, sites) -> None:
    if get_state(pipe) is not None:
        raise EvaluationError(
            "Token Fusion is applied to this pipeline; the analysis measures the unreduced model. "
            "Call tofu_sd.remove(pipe) first."
        )
    for site in sites:
        if getattr(site.block, "_chunk_size", None) is not None:
            raise EvaluationError(
                f"{site.name} runs its feed-forward in chunks, so ff never sees the whole token set; "
                "call pipe.transformer.disable_forward_chunking() before the analysis."
            )


def _dit_block_results(sites, all_sites, probes, default: str) -> list[dict]:
    """Per analysed block: its name and index (``blocks``), the attentions measured, its token count, its default
    letter and its FL statistics."""
    index = {site.name: i for i, site in enumerate(all_sites)}
    blocks = []
    for site, probe, letter in zip(sites, probes, default):
        fl = _fl_statistics(probe)
        blocks.append({
            "name": site.name, "index": index[site.name], "stream": "single" if site.single_stream else "image",
            "attentions": list(site.attentions), "tokens": probe.tokens, "default_letter": letter, "fl": fl,
        })  # fmt: skip
    return blocks


def _dit_method(config: AnalyzeConfig, reduction: TokenFusionConfig, num_train: int, arch: dit.Architecture) -> dict:
    method = _method(config, reduction, num_train)
    if arch.name == "PixArt":
        attention = "attn1 with the interpolated token as query; keys and values: the call's full attn1 input, fixed"
    else:
        attention = (
            "each reduced attention (" + ("attn, pooled with attn2 in dual-attention blocks" if arch.name == "SD3" else "attn")
            + ") with the interpolated image token as query (to_q, norm_q); keys and values: the call's real image "
            "tokens and text tokens, fixed"
            + ("; the query rotated at the pair's destination's position" if arch.rotary else "")
        )
    feed_forward = "ff on the interpolated ff input (image tokens)"
    if arch.name == "Flux":
        feed_forward += "; single-stream blocks: act_mlp(proj_mlp(.)) on the image part"
    method["functions"] = {"self_attention": attention, "feed_forward": feed_forward}
    method["pairs"] = method["pairs"].replace("each block's input", "each block's input image tokens")
    return method


def _measure_dit(pipe, config: AnalyzeConfig, progress: bool) -> dict:
    from .models import default_size

    try:
        model = dit.unwrap_transformer(pipe)
    except ValueError as error:
        raise EvaluationError(str(error)) from error
    arch = dit_architecture(model)
    all_sites = arch.sites(model)
    sites, blocks = _dit_sites(model, arch, config)
    _check_unreduced_dit(pipe, all_sites)
    num_train = int(pipe.scheduler.config.get("num_train_timesteps", 1000))
    height = config.height or default_size(pipe)
    width = config.width or default_size(pipe)
    reduction = replace(config.reduction, schedule=None, blocks=blocks)
    recorder = _DiTRecorder(model, arch, sites, config, reduction, num_train)
    started = time.perf_counter()
    try:
        _run_prompts(pipe, config, height, width, progress)
    finally:
        recorder.close()
    default = dit.default_schedule(len(sites))
    results = _dit_block_results(sites, all_sites, recorder.probes, default)
    schedule = propose_schedule([_decision_value(b["fl"], config.decision) for b in results], config.threshold, default)
    for block, letter in zip(results, schedule):
        block["proposed_letter"] = letter
    return {
        "architecture": arch.name,
        "blocks": results,
        "proposed_schedule": schedule,
        "default_schedule": default,
        "apply_kwargs": {**asdict(reduction), "schedule": schedule},
        "method": _dit_method(config, reduction, num_train, arch),
        "config": _config_dict(config, pipe, height, width),
        "seconds": time.perf_counter() - started,
    }


# ---------------------------------------------------------------------------------------------------------------
# Plot and entry point
# ---------------------------------------------------------------------------------------------------------------


def analyze(config: AnalyzeConfig, pipe=None, progress: bool = True) -> dict:
    """Measure FL on ``pipe`` (loaded from ``config.model`` when None), write ``fl.json`` and ``fl.png`` in
    ``config.out``, and return the result; ``result["proposed_schedule"]`` goes to ``tofu_sd.apply(pipe,
    schedule=..., max_downsample=result["apply_kwargs"]["max_downsample"])``.
    """
    from .files import write_json_atomic
    from .rundir import library_versions
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
    attention = "attn FL" if result.get("architecture") not in (None, "PixArt") else "attn1 FL"
    lines = [f"{'block':<50} {'tokens':>6} {attention:>9} {'ff FL':>9}  default  proposed"]
    for b in result["blocks"]:
        a, f = (b["fl"][name]["mean"] for name in FUNCTIONS)
        fmt = lambda v: "-" if v is None else f"{v:.4f}"  # noqa: E731
        lines.append(f"{b['name']:<50} {b['tokens'] or '-':>6} {fmt(a):>9} {fmt(f):>9}  {b['default_letter']:^7}  {b['proposed_letter']:^8}")
    return "\n".join(lines)
