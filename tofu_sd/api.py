"""Public entry points: apply Token Fusion to a Stable Diffusion U-Net, inspect it, remove it."""

from __future__ import annotations

import copy
import functools
from dataclasses import dataclass, replace
from typing import TypeVar

import torch

from . import dit, hooks
from .blocks import select_sites, transformer_block_sites, unwrap_unet
from .config import TokenFusionConfig
from .merge import MODES

T = TypeVar("T")

_ATTR = "_tofu_sd"
#: An instance attribute of a patched U-Net, found by ``copy.deepcopy`` (it looks the copier up on the instance).
_DEEPCOPY = "__deepcopy__"
#: Stands, during a deep copy, for the hook registries and hooked forwards left out of the copy.
_LEFT_OUT = object()


@dataclass(frozen=True)
class PatchedBlock:
    """A block Token Fusion patched: its module name, its schedule letter and its resolution factor."""

    name: str
    letter: str  #: ``P`` (pruned), ``A`` (average) or ``M`` (MLERP)
    downsample: int

    @property
    def mode(self) -> str:
        return MODES[self.letter]


@dataclass(frozen=True)
class TokenFusionState:
    """What :func:`apply_token_fusion` installed on a U-Net (stored on it as ``unet._tofu_sd``)."""

    config: TokenFusionConfig
    blocks: tuple[PatchedBlock, ...]

    @property
    def schedule(self) -> str:
        return "".join(block.letter for block in self.blocks)


def apply_token_fusion(unet: torch.nn.Module, config: TokenFusionConfig) -> TokenFusionState:
    """Hook Token Fusion into ``unet`` (a UNet2DConditionModel) as ``config`` says, replacing an earlier patch.

    Everything is validated before the model is touched; if hooking fails half way, what was hooked is removed.
    """
    sites = select_sites(transformer_block_sites(unet), config.max_downsample)
    if not sites:
        raise ValueError(
            f"{type(unet).__name__} has no BasicTransformerBlock in its down, mid or up blocks, so there is "
            "nothing to apply Token Fusion to."
        )
    schedule = config.resolve_schedule([s.name for s in sites], [s.on_down_path for s in sites])
    if config.reduce == "kv" and "attn1" in config.modules:
        for site in sites:
            hooks.check_key_value_attention(f"{site.name}.attn1", site.block.attn1)
    config = replace(config, seed=0 if config.seed is None else config.seed)
    state = TokenFusionState(
        config, tuple(PatchedBlock(s.name, letter, s.downsample) for s, letter in zip(sites, schedule))
    )

    remove_token_fusion(unet)
    if config.ratio == 0:
        # Nothing is reduced: leave the model exactly as it is, but remember what was asked.
        setattr(unet, _ATTR, state)
        return state
    try:
        call = hooks.CallState(config, len(sites))
        # The outer hooks are torch module hooks: others (DeepCache) replace these modules' forward (see hooks).
        hooks.attach(unet, hooks.TimestepHook(call), hooks.TIMESTEP_HOOK)
        grids: dict[int, hooks.GridState] = {}
        for index, (site, letter) in enumerate(zip(sites, schedule)):
            if id(site.transformer) not in grids:
                grids[id(site.transformer)] = hooks.GridState()
                grid_hook = hooks.FeatureMapHook(grids[id(site.transformer)])
                hooks.attach(site.transformer, grid_hook, hooks.FEATURE_MAP_HOOK)
            block_state = hooks.BlockState()
            matching = hooks.MatchingHook(call, grids[id(site.transformer)], block_state, index)
            hooks.register(site.block, matching, hooks.MATCHING_HOOK)
            for name in config.modules:
                module = getattr(site.block, name, None)
                if module is None:  # a block without cross-attention
                    continue
                if name == "attn1" and config.reduce == "kv":
                    hook = hooks.KeyValueHook(block_state, letter)
                else:
                    hook = hooks.ReduceRestoreHook(block_state, letter, chunks=name == "ff", key_mask=name == "attn2")
                hooks.register(module, hook, hooks.MODULE_HOOKS[name])
    except BaseException:
        _unhook(unet)
        raise
    setattr(unet, _ATTR, state)
    setattr(unet, _DEEPCOPY, functools.partial(_deepcopy_patched, unet))
    return state


def remove_token_fusion(unet: torch.nn.Module) -> bool:
    """Remove Token Fusion from ``unet``; True if it was applied."""
    had_state = unet.__dict__.pop(_ATTR, None) is not None
    unet.__dict__.pop(_DEEPCOPY, None)
    return _unhook(unet) or had_state


def _unhook(unet: torch.nn.Module) -> bool:
    """Remove Token Fusion's torch hooks and registry hooks from ``unet``; True if there were any."""
    outer = hooks.detach_all(unet)
    return hooks.unregister_all(unet) or outer


def _deepcopy_patched(unet: torch.nn.Module, memo: dict) -> torch.nn.Module:
    """``copy.deepcopy`` of a patched U-Net: an independent copy, patched alike; ``unet`` itself is not touched.

    A deep-copied diffusers hook would stay bound to the original (its forward is a closure over the original's
    hooks and forward), and a deep-copied torch hook of Token Fusion's would share the original's state, so the
    copy is made without Token Fusion's registries, hooked forwards and torch hooks, and Token Fusion is then
    applied to the copy with the same configuration.
    """
    wrapped = hooks.hooked_modules(unet)
    for module in wrapped:
        memo[id(module._diffusers_hook)] = memo[id(module.__dict__["forward"])] = _LEFT_OUT
    outer = hooks.torch_hooks(unet)
    for _, outer_hooks in outer:
        for function in outer_hooks.functions:
            memo[id(function)] = _LEFT_OUT
    cls = type(unet)
    copied = memo[id(unet)] = cls.__new__(cls)  # as copy.deepcopy does, so references to unet map to the copy
    state = {key: value for key, value in unet.__getstate__().items() if key not in (_ATTR, _DEEPCOPY)}
    copied.__setstate__(copy.deepcopy(state, memo))
    for module, forward in wrapped.items():
        twin = memo[id(module)]
        del twin.__dict__["_diffusers_hook"], twin.__dict__["forward"]
        if not hooks.is_class_forward(module, forward):
            twin.forward = copy.deepcopy(forward, memo)  # a wrapper installed before Token Fusion's hooks
    for module, outer_hooks in outer:
        outer_hooks.remove_from_copy(memo[id(module)])
    apply_token_fusion(copied, getattr(unet, _ATTR).config)
    return copied


def apply(
    pipe_or_unet: T,
    ratio: float = 0.5,
    *,
    schedule: str | None = None,
    max_downsample: int = 1,
    sx: int = 2,
    sy: int = 2,
    use_rand: bool = True,
    seed: int | None = None,
    matching: str = "global",
    local_window: int = 3,
    reduce: str = "tokens",
    rematch_every: int = 1,
    modules: str | tuple[str, ...] | list[str] = ("attn1",),
    blocks: str | tuple[int, ...] | None = None,
) -> T:
    """Apply Token Fusion to a Stable Diffusion pipeline or U-Net, in place, and return it.

    Before self-attention in the U-Net's highest-resolution transformer blocks, ``int(N * ratio)`` of the N
    tokens are reduced into their most similar destination token (bipartite soft matching on the block's
    input); after self-attention every token is restored, so cross-attention, the feed-forward and the ResNets
    see the full set (unless ``modules`` reduces cross-attention or the feed-forward too). With ``reduce="kv"``
    self-attention keeps all N queries and only its keys and values are the reduced tokens. Calling ``apply``
    again replaces the earlier patch; :func:`remove` undoes it exactly.

    Args:
        pipe_or_unet: a diffusers pipeline with a ``unet`` (StableDiffusionPipeline, StableDiffusionXLPipeline,
            ...) or a ``UNet2DConditionModel``, possibly wrapped by ``torch.compile``.
        ratio: fraction of tokens removed per patched block, in ``[0, 1 - 1/(sx*sy)]``. ``0`` changes nothing.
        schedule: one letter per patched block in forward order, ``P`` pruned merging, ``A`` average merging,
            ``M`` MLERP merging; a single letter sets all. ``None``: ``P`` on the down path, ``M`` afterwards.
        max_downsample: also patch blocks up to this many times lower resolution (1, 2, 4 or 8) than the
            U-Net's highest transformer resolution.
        sx, sy: width and height of the cells that each hold one destination token.
        use_rand: random destination position in each cell (seeded per block and timestep) instead of top-left.
        seed: seed of those positions; ``None`` means 0.
        matching: ``"global"`` (each source against every destination, exactly ToMe's matching, in chunks so
            memory stays O(N)) or ``"local"`` (against the destinations of the cells around it; O(N) time).
        local_window: side, in cells, of local matching's window (odd, default 3: the 3 x 3 cells around).
        reduce: ``"tokens"`` (self-attention on the reduced tokens, then every token restored; the paper's
            method) or ``"kv"`` (every token stays a query; keys and values come from the reduced tokens, with
            proportional attention: a key standing for ``s`` tokens adds ``log(s)`` to its logits; no restore).
        rematch_every: compute each block's partition and matching every this many denoising steps of a
            pipeline call and reuse them in between; ``1`` (default) matches at every call. What counts as a
            step and as a new pipeline call: :class:`~tofu_sd.TokenFusionConfig`.
        modules: which sub-modules of each patched ``BasicTransformerBlock`` run on the reduced tokens:
            ``"attn1"`` (self-attention, the default), ``"attn2"`` (cross-attention: its queries; the text keys
            and values are untouched), ``"ff"`` (feed-forward), or any non-empty combination, as a tuple or
            list of names or a comma-separated string (``"attn1,ff"``). Each one's input is reduced with the
            block's one matching and letter, and its output restored, as tomesd's ``merge_attn``,
            ``merge_crossattn`` and ``merge_mlp``. ``reduce`` concerns ``attn1`` only (with ``"kv"``, ``attn2``
            and ``ff`` are still reduced and restored). Stored in canonical order (attn1, attn2, ff).
        blocks: diffusion transformers only (a pipeline with a ``transformer``: SD3 / SD3.5, PixArt, Flux, or
            the transformer model; see :mod:`tofu_sd.dit`): the blocks to patch, by index in forward order,
            e.g. ``"0-11"`` or ``(0, 1, 5)``; ``None`` patches every block.

    Raises:
        ValueError: if an option is out of range or the object has no supported U-Net; the model is untouched.

    Threads and copies:
        A patched U-Net may be called from several threads at once: the hooks keep each call's state (its
        timestep, feature-map sizes and matchings) per thread, so every output equals that of the same call
        made alone. ``apply`` and ``remove`` themselves must not run while another thread calls the model.
        ``copy.deepcopy`` of a patched U-Net, or of a pipeline holding one, gives an independent model patched
        alike (its own hooks, running its own weights); ``remove`` on one leaves the other patched.

    Stacking:
        The hooks on the U-Net and on its ``Transformer2DModel`` s are torch module hooks, which leave their
        ``forward`` alone (see :mod:`tofu_sd.hooks`), so Token Fusion stacks with what wraps ``forward``, such as
        DeepCache's ``DeepCacheSDHelper``, in either order; either can then be removed (or disabled) and the
        other stays as it is alone.

    Example:
        ```python
        pipe = StableDiffusionPipeline.from_pretrained(...).to("cuda")
        tofu_sd.apply(pipe, ratio=0.5)
        image = pipe("A high-quality photograph of a goldfish.").images[0]
        tofu_sd.remove(pipe)
        ```
    """
    config = TokenFusionConfig(
        ratio=ratio, schedule=schedule, max_downsample=max_downsample, sx=sx, sy=sy, use_rand=use_rand, seed=seed,
        matching=matching, local_window=local_window, reduce=reduce, rematch_every=rematch_every, modules=modules,
        blocks=blocks,
    )
    if dit.handles(pipe_or_unet):
        dit.apply_dit(pipe_or_unet, config)
        return pipe_or_unet
    if config.blocks is not None:
        raise ValueError("blocks chooses blocks of diffusion transformers; a U-Net's are chosen by max_downsample.")
    apply_token_fusion(unwrap_unet(pipe_or_unet), config)
    _reset_compiled(pipe_or_unet)
    return pipe_or_unet


def remove(pipe_or_unet: T) -> T:
    """Remove Token Fusion from a pipeline or U-Net (a no-op if it was not applied) and return it."""
    if dit.handles(pipe_or_unet):
        dit.remove_dit(pipe_or_unet)
        return pipe_or_unet
    if remove_token_fusion(unwrap_unet(pipe_or_unet)):
        _reset_compiled(pipe_or_unet)
    return pipe_or_unet


def patched_blocks(pipe_or_unet: object) -> list[PatchedBlock]:
    """The blocks Token Fusion is applied to, in forward order, with their schedule letters (empty if none)."""
    state = get_state(pipe_or_unet)
    return list(state.blocks) if state is not None else []


def get_state(pipe_or_unet: object) -> TokenFusionState | None:
    """The configuration and blocks of the Token Fusion applied to a pipeline or U-Net, or None."""
    if dit.handles(pipe_or_unet):
        return dit.get_state(pipe_or_unet)
    return getattr(unwrap_unet(pipe_or_unet), _ATTR, None)


def _reset_compiled(pipe_or_unet: object) -> None:
    """A compiled U-Net has traced the old hooks: drop its graphs so the next call traces the new ones."""
    unet = getattr(pipe_or_unet, "unet", pipe_or_unet)
    if hasattr(unet, "_orig_mod"):
        torch._dynamo.reset()
