"""The one hook stack: install Token Fusion's hooks on a model as its family says, remove them, deep-copy.

For every patched block (a :class:`~tofu_sd.families.Site`): a :class:`~tofu_sd.hooks.MatchingHook` on the block,
and on each of its :class:`~tofu_sd.families.Part` s the hook of its kind (:mod:`tofu_sd.reducing`), plus the
rotary hooks where the family has rotary positions; registry hooks, each innermost (:mod:`tofu_sd.hooking`).
Once per model a :class:`~tofu_sd.hooks.CallHook`, and once per grid-carrying module a
:class:`~tofu_sd.hooks.GridHook`, as torch module hooks (run as Python outside compiled graphs where they sit on
the model itself). A ``reduce="kv"`` attention without ``to_kv`` gets a
:class:`~tofu_sd.reducing.KeyValueProjection` for fused projections; a family's joint attention (SD3, Flux) a
:class:`~tofu_sd.joint_kv.JointKeyValueHook` instead, which runs it. :func:`uninstall` removes exactly these.
"""

from __future__ import annotations

import torch

from .config import TokenFusionConfig
from .families import Family, Site
from .hooking import TorchHooks, get_torch_hook, register_innermost, torch_hooks, unregister_all
from .hooks import CALL_HOOK, GRID_HOOK, MATCHING_HOOK, CallHook, GridHook, MatchingHook
from .joint_kv import JointKeyValueHook
from .reducing import (
    REDUCE_HOOK,
    ROTARY_HOOK,
    KeyValueHook,
    KeyValueProjection,
    LeadingImageHook,
    ReduceRestoreHook,
    RotaryHook,
    SingleStreamHook,
)
from .state import BlockState, CallState, GridState


def install(model: torch.nn.Module, family: Family, sites: list[Site], schedule: str, config: TokenFusionConfig) -> None:
    """Hook Token Fusion into ``model`` at ``sites`` with one letter of ``schedule`` each; on failure, what was
    hooked is removed and the error raised."""
    try:
        call = CallState(config, len(sites))
        blocks = tuple(site.block for site in sites)
        TorchHooks(model, CallHook(call, family.timestep, blocks), CALL_HOOK, eager=True)
        grids: dict[int, GridState] = {}
        for index, (site, letter) in enumerate(zip(sites, schedule)):
            grid = grids.get(id(site.grid_module))
            if grid is None:
                grid = grids[id(site.grid_module)] = GridState()
                eager = site.grid_module is model  # outside a compiled model's graph (it may read on the host)
                TorchHooks(site.grid_module, GridHook(grid, family.grid), GRID_HOOK, eager=eager)
            matching = MatchingHook(
                call, grid, BlockState(), index, site.single_stream, site.image_last, site.image_first
            )
            _install_block(family, site, letter, matching, config)
    except BaseException:
        uninstall(model)
        raise


def _install_block(family: Family, site: Site, letter: str, matching: MatchingHook, config: TokenFusionConfig) -> None:
    register_innermost(site.block, matching, MATCHING_HOOK)
    state = matching.state
    for part in family.parts(site, config):
        module = site.block.get_submodule(part.name)
        if part.kind == "kv" and family.joint_attention is not None:
            hook = JointKeyValueHook(state, letter, family.joint_attention, text_first=site.single_stream)
            register_innermost(module, hook, REDUCE_HOOK)
            continue
        if part.kind == "kv":
            register_innermost(module, KeyValueHook(state, letter), REDUCE_HOOK)
            if not hasattr(module, "to_kv"):
                module.to_kv = KeyValueProjection(module)
            continue
        if part.kind == "single" and site.image_first:
            hook = LeadingImageHook(state, letter, family.token_rotary)
        elif part.kind == "single":
            hook = SingleStreamHook(state, letter)
        else:
            rotary = family.rotary_layout if family.rotary_norms else None
            hook = ReduceRestoreHook(
                state, letter, chunks=part.chunks, key_mask=part.key_mask, joint_mask=part.joint_mask, rotary=rotary
            )
        register_innermost(module, hook, REDUCE_HOOK)
        for norm, text in family.rotary_norms:
            if getattr(module, norm, None) is not None:
                register_innermost(getattr(module, norm), RotaryHook(state, text, family.rotary_layout), ROTARY_HOOK)


def uninstall(model: torch.nn.Module) -> bool:
    """Remove every hook and key-value projection of Token Fusion's from ``model``; True if there was any."""
    found = torch_hooks(model)
    for _, owner in found:
        owner.remove()
    projections = [m for m in model.modules() if isinstance(m.__dict__.get("to_kv"), KeyValueProjection)]
    for module in projections:
        del module.__dict__["to_kv"]
    return unregister_all(model) or bool(found) or bool(projections)


def call_state(model: torch.nn.Module) -> CallState | None:
    """The :class:`~tofu_sd.state.CallState` of the Token Fusion installed on ``model``, or ``None``."""
    hook = get_torch_hook(model, CALL_HOOK)
    return None if hook is None else hook.call
