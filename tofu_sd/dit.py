"""Token Fusion on diffusion transformers: SD3 / SD3.5, PixArt-alpha / -Sigma and Flux, from their blocks' structure.

Design. As on a U-Net (:mod:`tofu_sd.hooks`), nothing of diffusers' block code is copied: small diffusers hooks
(:mod:`tofu_sd.dit_hooks`) sit on each patched block and its attention, and a torch forward pre-hook and
forward hook on the transformer model record the call's timestep and *patch grid* (SD3 and PixArt: the latent's
height and width over ``config.patch_size``; Flux, whose input is packed ``(B, N, C)``: the row and column
indices in ``img_ids``, columns 1 and 2, which must form the row-major grid that ``FluxPipeline`` builds). Only
image tokens are reduced: a block's matching is bipartite soft matching on its input image tokens (its
``hidden_states`` argument), in ``sx x sy`` cells of that grid, with :class:`~tofu_sd.hooks.CallState`'s random
partition (one per block and timestep, shared by the whole batch, so both halves of a CFG batch get the same)
and step counting for ``rematch_every``. Each attention whose ``hidden_states`` are the image stream (SD3's joint
``attn`` and SD3.5's ``attn2``, PixArt's ``attn1``, Flux's double-stream ``attn``) runs on the reduced image
tokens next to the full, untouched text tokens, and its image output is restored, so the feed-forward and
everything else see every token; in Flux's single-stream blocks, whose attention sees ``[text, image]``, the
image part is reduced and restored alike. Flux's rotary embeddings must follow their tokens: the reduced tokens
differ per batch element, and diffusers' ``apply_rotary_emb`` takes only one ``(S, D)`` table for the whole
batch, so the attention is called without ``image_rotary_emb`` and :class:`~tofu_sd.dit_hooks.RotaryHook` s on
its ``norm_q`` / ``norm_k`` (``norm_added_q`` / ``norm_added_k`` for the text stream) rotate the queries and keys
with diffusers' own ``apply_rotary_emb`` on a per-token table (the batch folded into the sequence dimension):
each kept token keeps its own position, and a merged group (A, M) takes its destination's (the destination is
the token that stays in the group's slot). Rotary embedding being elementwise per token, this gives the bits of
the processor's own rotation of the concatenated sequence; it needs the processor to rotate right after
``norm_q`` / ``norm_k``, as ``FluxAttnProcessor`` does, so other Flux processors (IP-Adapter) are refused.

Defaults: every block is patched (SD3: every ``JointTransformerBlock``; PixArt: every ``BasicTransformerBlock``;
Flux: the double-stream blocks, then the single-stream ones, in forward order); ``config.blocks`` chooses others
by index in that order. The schedule merges with MLERP (``M``) in every block: the paper prunes where a layer is
far from linear (functional linearity under 1/sqrt(2)), and ``tofu-sd analyze`` on the built-in trained DiT
(``tiny-sd3``) finds every block's FL at 0.93-0.98, early blocks included, so it proposes ``M`` throughout; on
480 same-seed pairs at each of ratios 0.5 and 0.25 there, all-``M`` is at least as close to the full model in
MS-SSIM as pruning the first third, the paper's ViT depth rule (README, "diffusion transformers"). Real SD3 /
Flux weights were not analysed; ``tofu-sd analyze`` on them proposes a schedule for each.

``reduce="kv"`` works where the attention takes an attention mask
for proportional attention's ``log(size)`` bias and its keys and values through ``encoder_hidden_states``:
PixArt's ``attn1`` (through :class:`~tofu_sd.hooks.KeyValueHook`); SD3's ``JointAttnProcessor2_0`` ignores
attention masks and Flux computes text and image keys in one call, so there it raises ``ValueError``.

Compilation: the block and attention hooks trace without graph breaks, under ``torch.compile(model)``,
``model.compile()`` and regional compilation (``compile_repeated_blocks``) alike. The model's pre-hook and
forward hook run as Python outside any graph (``torch.compiler.disable``; see
:class:`~tofu_sd.dit_hooks.TransformerCallHooks`), so the grid (for Flux a host read of ``img_ids``) and the
step count of ``rematch_every`` are found at every call; the compiled forward guards on the grid, so another
grid, even of the same token count, recompiles, and ``rematch_every`` reuses matchings in a compiled model too
(through a graph that matches and one that reuses).

Threads and copies, as on a U-Net: the hooks' state is thread-local, and ``copy.deepcopy`` of a patched
transformer gives an independent model patched alike.
"""

from __future__ import annotations

import copy
import functools
from collections.abc import Callable
from dataclasses import dataclass, fields, replace

import torch
from diffusers.models.attention import BasicTransformerBlock, JointTransformerBlock
from diffusers.models.attention_processor import (
    FusedJointAttnProcessor2_0,
    JointAttnProcessor2_0,
    XFormersJointAttnProcessor,
)
from diffusers.models.transformers.pixart_transformer_2d import PixArtTransformer2DModel
from diffusers.models.transformers.transformer_flux import (
    FluxAttnProcessor,
    FluxSingleTransformerBlock,
    FluxTransformer2DModel,
    FluxTransformerBlock,
)
from diffusers.models.transformers.transformer_sd3 import SD3Transformer2DModel

from . import dit_hooks, hooks
from .config import TokenFusionConfig, parse_blocks

_ATTR = "_tofu_sd"  #: the same attribute as a patched U-Net's (:mod:`tofu_sd.api`)
_HANDLES = "_tofu_sd_handles"  #: the torch hook handles on a patched transformer model
_DEEPCOPY = "__deepcopy__"  #: an instance attribute of a patched model, found by ``copy.deepcopy``
#: Stands, during a deep copy, for the hooks, registries and hooked forwards left out of the copy.
_LEFT_OUT = object()
#: A module's torch hook tables, by the handle id of each hook.
_HOOK_TABLES = (
    "_forward_pre_hooks", "_forward_pre_hooks_with_kwargs", "_forward_hooks", "_forward_hooks_with_kwargs",
    "_forward_hooks_always_called",
)  # fmt: skip

SUPPORTED = (
    "a StableDiffusion3Pipeline, PixArtAlphaPipeline / PixArtSigmaPipeline or FluxPipeline (or another pipeline "
    "with such a `transformer`), or an SD3Transformer2DModel, PixArtTransformer2DModel or FluxTransformer2DModel"
)
#: SD3 attention processors that work on fewer image tokens than the call started with.
SD3_PROCESSORS = (JointAttnProcessor2_0, FusedJointAttnProcessor2_0, XFormersJointAttnProcessor)


@dataclass(frozen=True)
class DiTSite:
    """One patchable block of a diffusion transformer."""

    name: str  #: qualified module name, e.g. ``transformer_blocks.3`` or ``single_transformer_blocks.0``
    block: torch.nn.Module
    attentions: tuple[str, ...]  #: the block's attentions reduced around (``attn``, ``attn2``, ``attn1``)
    single_stream: bool = False  #: a Flux single-stream block (its attention sees ``[text, image]``)


@dataclass(frozen=True)
class Architecture:
    """How Token Fusion finds the blocks, timestep and grid of one family of transformer models."""

    name: str
    sites: Callable[[torch.nn.Module], list[DiTSite]]
    grid: Callable  #: ``(model, args, kwargs) -> (h, w)``: the patch grid of a call
    timestep_index: int  #: position of ``timestep`` in the model's ``forward``
    timestep_scale: float = 1.0  #: what the model multiplies its timestep by (Flux: 1000), for the partition key
    rotary: bool = False
    key_value: bool = False  #: whether ``reduce="kv"`` is supported


def _sd3_sites(model: torch.nn.Module) -> list[DiTSite]:
    return [
        DiTSite(f"transformer_blocks.{i}", block, ("attn", "attn2") if block.attn2 is not None else ("attn",))
        for i, block in enumerate(model.transformer_blocks)
        if isinstance(block, JointTransformerBlock)
    ]


def _pixart_sites(model: torch.nn.Module) -> list[DiTSite]:
    return [
        DiTSite(f"transformer_blocks.{i}", block, ("attn1",))
        for i, block in enumerate(model.transformer_blocks)
        if isinstance(block, BasicTransformerBlock)
    ]


def _flux_sites(model: torch.nn.Module) -> list[DiTSite]:
    double = [
        DiTSite(f"transformer_blocks.{i}", block, ("attn",))
        for i, block in enumerate(model.transformer_blocks)
        if isinstance(block, FluxTransformerBlock)
    ]
    single = [
        DiTSite(f"single_transformer_blocks.{i}", block, ("attn",), single_stream=True)
        for i, block in enumerate(model.single_transformer_blocks)
        if isinstance(block, FluxSingleTransformerBlock)
    ]
    return double + single


def latent_grid(model: torch.nn.Module, args: tuple, kwargs: dict) -> tuple[int, int] | None:
    """The patch grid of an SD3 / PixArt call: the ``(B, C, H, W)`` latent's ``(H // p, W // p)``."""
    x = hooks._argument(args, kwargs, 0, "hidden_states")
    if not isinstance(x, torch.Tensor) or x.ndim != 4:
        return None
    p = model.config.patch_size
    return x.shape[-2] // p, x.shape[-1] // p


def grid_from_ids(ids: torch.Tensor) -> tuple[int, int] | None:
    """``(h, w)`` if ``ids`` ``(N, 3)`` (or the deprecated ``(1, N, 3)``) hold, in columns 1 and 2, the row and
    column of each token of a row-major ``h x w`` grid, as ``FluxPipeline``'s ``img_ids`` do; else ``None``.

    Reads ``ids`` on the host (a sync), once per transformer call (the model's pre-hook runs outside compiled
    graphs)."""
    if ids.ndim == 3:
        ids = ids[0]
    if ids.ndim != 2 or ids.shape[-1] < 3 or ids.shape[0] == 0:
        return None
    rows, cols = ids[:, 1], ids[:, 2]
    h, w = (int(v) + 1 for v in torch.stack([rows.max(), cols.max()]).tolist())
    n = ids.shape[0]
    if h * w != n:
        return None
    position = torch.arange(n, device=ids.device)
    if not bool(((rows == position // w) & (cols == position % w)).all()):
        return None
    return h, w


def flux_grid(model: torch.nn.Module, args: tuple, kwargs: dict) -> tuple[int, int]:
    """The patch grid of a Flux call, from its ``img_ids``; ``ValueError`` if they are no row-major grid."""
    x = hooks._argument(args, kwargs, 0, "hidden_states")
    ids = hooks._argument(args, kwargs, 4, "img_ids")
    grid = grid_from_ids(ids) if isinstance(ids, torch.Tensor) else None
    if grid is None or x.shape[1] != grid[0] * grid[1]:
        raise ValueError(
            "Token Fusion on a FluxTransformer2DModel takes the token grid from `img_ids`: columns 1 and 2 must "
            "hold the row and column of each image token of a row-major grid (as FluxPipeline builds them), one "
            f"per token of `hidden_states`; got img_ids of shape {None if ids is None else tuple(ids.shape)} for "
            f"{x.shape[1]} tokens. Pipelines that append other tokens to the image (FluxKontextPipeline's "
            "reference image, say) are not supported; tofu_sd.remove(pipe) to run them."
        )
    return grid


ARCHITECTURES: dict[type, Architecture] = {
    SD3Transformer2DModel: Architecture("SD3", _sd3_sites, latent_grid, timestep_index=3),
    PixArtTransformer2DModel: Architecture("PixArt", _pixart_sites, latent_grid, timestep_index=2, key_value=True),
    FluxTransformer2DModel: Architecture(
        "Flux", _flux_sites, flux_grid, timestep_index=3, timestep_scale=1000.0, rotary=True
    ),
}


def _architecture(model: object) -> Architecture | None:
    for cls, arch in ARCHITECTURES.items():
        if isinstance(model, cls):
            return arch
    return None


def handles(obj: object) -> bool:
    """Whether ``obj`` is for this module: a pipeline with a ``transformer`` (and no ``unet``), or a supported
    transformer model (possibly wrapped by ``torch.compile``)."""
    if hasattr(obj, "transformer") and not hasattr(obj, "unet"):
        return True
    return _architecture(getattr(obj, "_orig_mod", obj)) is not None


def unwrap_transformer(obj: object) -> torch.nn.Module:
    """The transformer of a pipeline or a transformer model, without a ``torch.compile`` wrapper; ValueError if
    it is not a supported one."""
    model = getattr(obj, "transformer", obj)
    model = getattr(model, "_orig_mod", model)
    if _architecture(model) is None:
        raise ValueError(f"tofu_sd needs {SUPPORTED} (or a U-Net pipeline); got {type(obj).__name__} with a "
                         f"{type(model).__name__}.")  # fmt: skip
    return model


def default_schedule(num_blocks: int) -> str:
    """The default: MLERP merging (``M``) in every patched block, as ``tofu-sd analyze`` proposes for the trained
    DiT, none of whose blocks is far from linear (see the module's docstring)."""
    return "M" * num_blocks


def select_sites(sites: list[DiTSite], config: TokenFusionConfig) -> list[DiTSite]:
    """The sites ``config.blocks`` chooses (by index in forward order; ``None``: all); ValueError if out of range."""
    indices = parse_blocks(config.blocks)
    if indices is None:
        return sites
    bad = [i for i in indices if i >= len(sites)]
    if bad:
        listing = "\n".join(f"  {i}: {site.name}" for i, site in enumerate(sites))
        raise ValueError(
            f"blocks={config.blocks!r} names block(s) {', '.join(map(str, bad))}, but the model has {len(sites)} "
            f"patchable blocks (0 to {len(sites) - 1}), in forward order:\n{listing}"
        )
    return [sites[i] for i in indices]


def _check(model: torch.nn.Module, arch: Architecture, sites: list[DiTSite], config: TokenFusionConfig) -> None:
    if config.max_downsample != 1:
        raise ValueError(
            f"max_downsample={config.max_downsample} only means something for U-Nets (their lower-resolution "
            f"blocks); a {arch.name} transformer has one token grid: choose its blocks with `blocks` instead."
        )
    default_modules = next((f.default for f in fields(config) if f.name == "modules"), None)
    if getattr(config, "modules", default_modules) != default_modules:
        raise ValueError(
            f"modules={config.modules!r} chooses sub-modules of U-Net blocks; on a {arch.name} transformer Token "
            "Fusion reduces around each patched block's self-attention only: leave modules at its default."
        )
    if config.reduce == "kv" and not arch.key_value:
        raise ValueError(
            f"reduce='kv' is not supported for {arch.name} transformers yet: "
            + (
                "JointAttnProcessor2_0 ignores attention masks, so proportional attention's log(size) bias cannot "
                "reach it"
                if arch.name == "SD3"
                else "its attention computes the image queries, keys and values in one call, with rotary positions"
            )
            + "; use reduce='tokens'."
        )
    for site in sites:
        for part in site.attentions:
            attn = getattr(site.block, part)
            processor = getattr(attn, "processor", None)
            name = f"{site.name}.{part}"
            if arch.name == "SD3" and not isinstance(processor, SD3_PROCESSORS):
                raise ValueError(
                    f"Token Fusion cannot patch {name}: its attention processor {type(processor).__name__} is not one "
                    f"of {', '.join(p.__name__ for p in SD3_PROCESSORS)} (IP-Adapter and PAG processors are not "
                    "supported)."
                )
            if arch.name == "Flux" and type(processor) is not FluxAttnProcessor:
                raise ValueError(
                    f"Token Fusion cannot patch {name}: its attention processor {type(processor).__name__} is not "
                    "FluxAttnProcessor, the one whose rotary embedding it knows how to apply per token (IP-Adapter "
                    "processors are not supported)."
                )
            if config.reduce == "kv":
                hooks.check_key_value_attention(name, attn)


def apply_dit(obj: object, config: TokenFusionConfig):
    """Hook Token Fusion into the transformer of ``obj`` as ``config`` says, replacing an earlier patch; returns
    the :class:`~tofu_sd.api.TokenFusionState` stored on the model. Everything is validated before the model is
    touched; if hooking fails half way, what was hooked is removed."""
    from .api import (  # api dispatches here: imported late, not circularly
        PatchedBlock,
        TokenFusionState,
    )

    model = unwrap_transformer(obj)
    arch = _architecture(model)
    all_sites = arch.sites(model)
    if not all_sites:
        raise ValueError(f"{type(model).__name__} has no transformer blocks, so there is nothing to apply Token Fusion to.")
    sites = select_sites(all_sites, config)
    _check(model, arch, sites, config)
    names = [site.name for site in sites]
    if config.schedule is None:
        schedule = default_schedule(len(sites))
    else:
        schedule = config.resolve_schedule(names, [False] * len(sites))
    config = replace(config, seed=0 if config.seed is None else config.seed)
    state = TokenFusionState(config, tuple(PatchedBlock(name, letter, 1) for name, letter in zip(names, schedule)))

    remove_dit(model)
    if config.ratio == 0:
        # Nothing is reduced: leave the model exactly as it is, but remember what was asked.
        setattr(model, _ATTR, state)
        _reset_compiled(obj)
        return state
    torch_handles: list = []
    try:
        call, model_state = hooks.CallState(config, len(sites)), dit_hooks.ModelState()
        outer = dit_hooks.TransformerCallHooks(call, model_state, arch.grid, arch.timestep_index, arch.timestep_scale)
        pre, post = torch.compiler.disable(outer.pre), torch.compiler.disable(outer.post)
        torch_handles.append(model.register_forward_pre_hook(pre, with_kwargs=True))
        torch_handles.append(model.register_forward_hook(post, with_kwargs=True, always_call=True))
        setattr(model, _HANDLES, torch_handles)
        for index, (site, letter) in enumerate(zip(sites, schedule)):
            block_state = dit_hooks.BlockState()
            matching = dit_hooks.BlockMatchingHook(call, model_state, block_state, index, text_len=site.single_stream)
            hooks.register(site.block, matching, dit_hooks.MATCHING_HOOK)
            for part in site.attentions:
                attn = getattr(site.block, part)
                if config.reduce == "kv":
                    attention = hooks.KeyValueHook(block_state, letter)
                elif site.single_stream:
                    attention = dit_hooks.SingleStreamAttentionHook(block_state, letter)
                else:
                    attention = dit_hooks.ImageAttentionHook(block_state, letter, rotary=arch.rotary)
                hooks.register(attn, attention, dit_hooks.ATTENTION_HOOK)
                if arch.rotary:
                    for norm, text in (("norm_q", False), ("norm_k", False), ("norm_added_q", True), ("norm_added_k", True)):
                        if getattr(attn, norm, None) is not None:
                            hooks.register(getattr(attn, norm), dit_hooks.RotaryHook(block_state, text), dit_hooks.ROTARY_HOOK)
    except BaseException:
        remove_dit(model)
        raise
    setattr(model, _ATTR, state)
    setattr(model, _DEEPCOPY, functools.partial(_deepcopy_patched, model))
    _reset_compiled(obj)
    return state


def _deepcopy_patched(model: torch.nn.Module, memo: dict) -> torch.nn.Module:
    """``copy.deepcopy`` of a patched transformer: an independent copy, patched alike; ``model`` is not touched.

    As for a U-Net (:func:`tofu_sd.api._deepcopy_patched`): a copied hook would stay bound to the original's
    state, so the copy is made without Token Fusion's registries, hooked forwards and torch hooks, and Token
    Fusion is then applied to the copy with the same configuration."""
    wrapped = hooks.hooked_modules(model, dit_hooks.HOOK_NAMES)
    for module in wrapped:
        memo[id(module._diffusers_hook)] = memo[id(module.__dict__["forward"])] = _LEFT_OUT
    ids = [handle.id for handle in model.__dict__[_HANDLES]]
    for table in (model._forward_pre_hooks, model._forward_hooks):  # the hook functions (the other tables: flags)
        for key in ids:
            if key in table:
                memo[id(table[key])] = _LEFT_OUT
    cls = type(model)
    copied = memo[id(model)] = cls.__new__(cls)  # as copy.deepcopy does, so references to model map to the copy
    state = {key: value for key, value in model.__getstate__().items() if key not in (_ATTR, _HANDLES, _DEEPCOPY)}
    copied.__setstate__(copy.deepcopy(state, memo))
    for module, forward in wrapped.items():
        twin = memo[id(module)]
        del twin.__dict__["_diffusers_hook"], twin.__dict__["forward"]
        if not hooks.is_class_forward(module, forward):
            twin.forward = copy.deepcopy(forward, memo)  # a wrapper installed before Token Fusion's hooks
    for table in _HOOK_TABLES:
        for key in ids:
            getattr(copied, table).pop(key, None)
    apply_dit(copied, getattr(model, _ATTR).config)
    return copied


def remove_dit(obj: object) -> bool:
    """Remove Token Fusion from the transformer of ``obj``; True if it was applied."""
    model = unwrap_transformer(obj)
    had_state = model.__dict__.pop(_ATTR, None) is not None
    model.__dict__.pop(_DEEPCOPY, None)
    torch_handles = model.__dict__.pop(_HANDLES, None) or []
    for handle in torch_handles:
        handle.remove()
    found = hooks.unregister_all(model, dit_hooks.HOOK_NAMES)
    if had_state or found or torch_handles:
        _reset_compiled(obj)
    return had_state or found or bool(torch_handles)


def get_state(obj: object):
    """The :class:`~tofu_sd.api.TokenFusionState` on the transformer of ``obj``, or ``None``."""
    return getattr(unwrap_transformer(obj), _ATTR, None)


def _reset_compiled(obj: object) -> None:
    """A compiled transformer has traced the old hooks: drop its graphs so the next call traces the new ones."""
    if hasattr(getattr(obj, "transformer", obj), "_orig_mod") or hasattr(obj, "_orig_mod"):
        torch._dynamo.reset()
