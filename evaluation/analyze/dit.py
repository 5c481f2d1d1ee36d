"""Measuring on a diffusion transformer (SD3 / SD3.5, PixArt, Flux; Qwen-Image, Wan, Chroma, FLUX.2, Z-Image
and Sana with the probes of :mod:`.dit_families`), with forward pre-hooks: the blocks ``tofu_sd.apply`` patches
(``reduction.blocks``, or all of them), the timestep and grid of each model call through tofu_sd's own hooks and the
family adapter, and a probe per block at each attention it reduces around and at its feed-forward."""

from __future__ import annotations

from dataclasses import replace

import torch

from tofu_sd import Family, Site, TokenFusionConfig, get_state
from tofu_sd.api import model_and_family
from tofu_sd.arguments import argument
from tofu_sd.hooks import MatchingHook
from tofu_sd.state import BlockState, CallState, GridState

from ..errors import EvaluationError
from ..linearity import joint_query_attention, timestep_group
from .config import AnalyzeConfig
from .dit_families import FAMILY_PROBES, UNPROBED
from .dit_families_more import SiteProbe
from .measurement import check_unreduced, image_size, method_description, recorded, result, train_timesteps
from .probe import BlockProbe, block_result


class DiTProbe(BlockProbe):
    """Forward pre-hooks on one block of a diffusion transformer: pairs from its input image tokens, FL at each
    attention it reduces around and at its feed-forward.

    The pairs come from tofu_sd's own ``MatchingHook`` (same partition, seed stream and matching as
    ``apply``), driven by a plain torch pre-hook with the block's own arguments (a single-stream block's
    ``encoder_hidden_states`` give the number of text tokens in front of its image tokens)."""

    def __init__(self, site: Site, matcher: MatchingHook, state: BlockState,
                 run: DiTRecorder) -> None:  # fmt: skip
        super().__init__(site, matcher, run)
        self.state = state
        self.text_len: int | None = None

    def on_block(self, module, args, kwargs):
        self.pairs = None
        self.matcher.pre_forward(module, *args, **kwargs)
        m, self.text_len = self.state.matching, self.state.text_len
        self.state.matching = self.state.text_len = None
        if m is not None:  # the image tokens: a single-stream block's input may hold its text or rest too
            self.keep_pairs(m, argument(args, kwargs, 0, "hidden_states")[:, : m.num_tokens])
        return None

    def measuring(self, function: str, measured):
        """A pre-hook that records ``function`` at a call of a :class:`~.dit_families_more.SiteProbe` module."""

        def hook(module, args, kwargs):
            got = None if self.pairs is None else measured(module, args, kwargs, self.pairs[1], self.text_len or 0)
            if got is not None and self._measurable(got[1], self.tokens):
                self._record(function, *got)
            return None

        return hook

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
        z = argument(args, kwargs, 0, "hidden_states")
        if not self._measurable(z, self.tokens) or argument(args, kwargs, 2, "attention_mask") is not None:
            return None  # masked attention is not reduced by tofu_sd either
        text = argument(args, kwargs, 1, "encoder_hidden_states")
        rotary = argument(args, kwargs, 3, "image_rotary_emb") if self.run.arch.rotary_norms else None
        offset = 0 if text is None else text.shape[1]
        if rotary is not None and rotary[0].shape[0] != offset + z.shape[1]:
            return None  # positions laid out otherwise than [text, image]: tofu_sd leaves the call alone too
        self._record("self_attention", self.attention_function(module, z, text, rotary, offset), z)
        return None

    def on_single_attention(self, module, args, kwargs):
        """A Flux single-stream block's ``attn``: ``hidden_states`` is ``[text, image]``; the image part is measured."""
        x, text = argument(args, kwargs, 0, "hidden_states"), self.text_len
        if text is None or not self._measurable(x, text + (self.tokens or 0)):
            return None
        if argument(args, kwargs, 2, "attention_mask") is not None:
            return None
        rotary = argument(args, kwargs, 3, "image_rotary_emb")
        if rotary is not None and rotary[0].shape[0] != x.shape[1]:
            return None
        f = self.attention_function(module, x, None, rotary, offset=text, project_out=False)
        self._record("self_attention", f, x[:, text:])
        return None

    def on_family_attention(self, module, args, kwargs):
        """A reduced attention of a family of :data:`~.dit_families.FAMILY_PROBES`: its probe reads the call."""
        measured = None if self.pairs is None else self.run.family.measured(module, args, kwargs, self.pairs[1])
        if measured is not None and self._measurable(measured[1], self.tokens):
            self._record("self_attention", *measured)
        return None

    def on_single_mlp(self, module, args, kwargs):
        """A Flux single-stream block's ``proj_mlp``: its MLP branch ``act_mlp(proj_mlp(.))`` on the image part."""
        x, text = (args[0] if args else kwargs.get("input")), self.text_len
        if text is None or not self._measurable(x, text + (self.tokens or 0)):
            return None
        act = self.site.block.act_mlp
        self._record("feed_forward", lambda points: act.forward(module.forward(points)), x[:, text:])
        return None


class DiTRecorder:
    """Hooks on the transformer model (timestep and grid, as its family adapter finds them) and on the probed
    blocks, removed by :meth:`close`."""

    def __init__(self, model: torch.nn.Module, arch: Family, sites: list, config: AnalyzeConfig,
                 reduction: TokenFusionConfig, num_train: int):  # fmt: skip
        self.config, self.num_train, self.arch = config, num_train, arch
        self.family = FAMILY_PROBES.get(arch.name)
        self.call = CallState(replace(reduction, st=arch.frames_per_cell(reduction)), len(sites))  # Wan: st 2
        self.model_state = GridState()
        self.group = "early"
        self.handles = [
            model.register_forward_pre_hook(self._on_model, with_kwargs=True),
            model.register_forward_hook(self._after_model, always_call=True),
        ]
        self.probes = []
        for index, site in enumerate(sites):
            state = BlockState()
            matcher = MatchingHook(self.call, self.model_state, state, index, text_len=site.single_stream,
                                   image_last=site.image_last, image_first=site.image_first)  # fmt: skip
            probe = DiTProbe(site, matcher, state, self)
            self.probes.append(probe)
            block = site.block
            self.handles.append(block.register_forward_pre_hook(probe.on_block, with_kwargs=True))
            if isinstance(self.family, SiteProbe):
                pre = [(block.get_submodule(name), probe.measuring(function, measured))
                       for name, function, measured in self.family.hooks(site)]  # fmt: skip
            elif site.single_stream:
                pre = [(block.attn, probe.on_single_attention), (block.proj_mlp, probe.on_single_mlp)]
            elif self.family is not None:
                pre = [(getattr(block, part), probe.on_family_attention) for part in site.attentions]
                pre.append((block.get_submodule(self.family.feed_forward), probe.on_ff))
            else:
                on_attention = probe.on_attn1 if arch.name == "PixArt" else probe.on_image_attention
                pre = [(getattr(block, part), on_attention) for part in site.attentions] + [(block.ff, probe.on_ff)]
            self.handles += [module.register_forward_pre_hook(hook, with_kwargs=True) for module, hook in pre]

    def _on_model(self, module, args, kwargs):
        t = self.arch.timestep(args, kwargs)
        self.call.start(t)
        self.model_state.grid = self.arch.grid(module, args, kwargs)
        value = float(torch.as_tensor(t).reshape(-1)[0]) if t is not None else 0.0
        self.group = timestep_group(value, self.num_train)
        return None

    def _after_model(self, module, args, output):
        self.call.finish()
        self.model_state.grid = None
        return None

    def close(self) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles = []
        self.call.finish()
        self.model_state.grid = None



def dit_sites(model: torch.nn.Module, arch: Family, config: AnalyzeConfig):
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
        arch.frames_per_cell(config.reduction)  # an st the family refuses
        return arch.select(sites, config.reduction), config.reduction.blocks
    except ValueError as error:
        raise EvaluationError(str(error)) from error



def dit_method(config: AnalyzeConfig, reduction: TokenFusionConfig, num_train: int, arch: Family) -> dict:
    method = method_description(config, reduction, num_train)
    family = FAMILY_PROBES.get(arch.name)
    if family is not None:
        attention, feed_forward = family.attention_text, family.feed_forward_text
    elif arch.name == "PixArt":
        attention = "attn1 with the interpolated token as query; keys and values: the call's full attn1 input, fixed"
    else:
        attention = (
            "each reduced attention (" + ("attn, pooled with attn2 in dual-attention blocks" if arch.name == "SD3" else "attn")
            + ") with the interpolated image token as query (to_q, norm_q); keys and values: the call's real image "
            "tokens and text tokens, fixed"
            + ("; the query rotated at the pair's destination's position" if arch.rotary_norms else "")
        )
    if family is None:
        feed_forward = "ff on the interpolated ff input (image tokens)"
    if arch.name == "Flux":
        feed_forward += "; single-stream blocks: act_mlp(proj_mlp(.)) on the image part"
    method["functions"] = {"self_attention": attention, "feed_forward": feed_forward}
    method["pairs"] = method["pairs"].replace("each block's input", "each block's input image tokens")
    return method



#: The families whose blocks the probes know (their attentions, feed-forwards and rotary positions).
ANALYZED_FAMILIES = ("SD3", "PixArt", "Flux", *FAMILY_PROBES)


def check_analyzable(arch: Family, model: torch.nn.Module) -> None:
    """EvaluationError, before anything is measured or written, for a family whose blocks the probes do not know
    (:data:`~.dit_families.UNPROBED` says why, for a family named there): there, tofu_sd's default schedule is
    provisional."""
    if arch.name not in ANALYZED_FAMILIES:
        raise EvaluationError(
            f"analyze measures functional linearity on the blocks of {', '.join(ANALYZED_FAMILIES)} transformers and "
            f"U-Nets; its probes do not know the blocks of a {type(model).__name__} ({arch.name})"
            + (f" ({UNPROBED[arch.name]})" if arch.name in UNPROBED else "")
            + ", so nothing was measured or written. tofu_sd's default schedule there "
            f"({''.join(arch.default_schedule(arch.sites(model)))}) "
            "is provisional, not measured; give --schedule to tofu-sd generate to compare others"
        )


def measure_dit(pipe, config: AnalyzeConfig, progress: bool) -> dict:
    """:func:`~.command.measure` on a diffusion-transformer pipeline of a family in :data:`ANALYZED_FAMILIES`."""
    try:
        model, arch = model_and_family(pipe)
    except ValueError as error:
        raise EvaluationError(str(error)) from error
    check_analyzable(arch, model)
    all_sites = arch.sites(model)
    sites, blocks = dit_sites(model, arch, config)
    check_unreduced(get_state(pipe), all_sites, "transformer")
    num_train, size = train_timesteps(pipe), image_size(pipe, config)
    reduction = replace(config.reduction, schedule=None, blocks=blocks)
    recorder = DiTRecorder(model, arch, sites, config, reduction, num_train)
    started = recorded(pipe, config, recorder, size, progress)
    default = arch.default_schedule(sites)
    index = {site.name: i for i, site in enumerate(all_sites)}
    results = [
        block_result(probe, letter, name=site.name, index=index[site.name], stream="single" if site.single_stream else "image",
                     attentions=list(site.attentions))
        for site, probe, letter in zip(sites, recorder.probes, default)
    ]  # fmt: skip
    method = dit_method(config, reduction, num_train, arch)
    return {"architecture": arch.name, **result(pipe, config, results, default, reduction, method, size, started)}
