"""diffusers hooks that put Token Fusion around a U-Net's transformer blocks without copying their code.

Four small hooks cooperate through plain state objects:

- :class:`TimestepHook` on the U-Net records the timestep of the call (it keys the random partition);
- :class:`FeatureMapHook` on each ``Transformer2DModel`` records the height and width of its feature map;
- :class:`MatchingHook` on each patched ``BasicTransformerBlock`` matches tokens on the block's input;
- :class:`SelfAttentionHook` on the block's ``attn1`` reduces its input and restores its output.
"""

from __future__ import annotations

from typing import Any

import torch
from diffusers.hooks import HookRegistry, ModelHook

from .config import TokenFusionConfig
from .merge import (
    MODES,
    BlockPlan,
    Matching,
    block_offsets,
    match,
    plan_blocks,
    reduce_tokens,
    restore_tokens,
    timestep_key,
)

TIMESTEP_HOOK = "tofu_sd.timestep"
FEATURE_MAP_HOOK = "tofu_sd.feature_map"
MATCHING_HOOK = "tofu_sd.matching"
SELF_ATTENTION_HOOK = "tofu_sd.self_attention"
HOOK_NAMES = (TIMESTEP_HOOK, FEATURE_MAP_HOOK, MATCHING_HOOK, SELF_ATTENTION_HOOK)


def _argument(args: tuple, kwargs: dict, index: int, name: str) -> Any:
    if name in kwargs:
        return kwargs[name]
    return args[index] if len(args) > index else None


class CallState:
    """What the current U-Net call knows: its timestep, and the plans of all patched blocks, derived once per call
    and grid (the partitions of all blocks in one batched computation, not one per block)."""

    def __init__(self, config: TokenFusionConfig, num_blocks: int) -> None:
        self.config, self.num_blocks = config, num_blocks
        self.timestep: torch.Tensor | float | None = None
        self.plans: dict[tuple, list[BlockPlan]] = {}

    def start(self, timestep) -> None:
        self.timestep, self.plans = timestep, {}

    def plan(self, index: int, h: int, w: int, x: torch.Tensor) -> BlockPlan:
        """The plan of block ``index`` on an ``h x w`` grid for tokens ``x``, computed with its siblings'."""
        batch, device = x.shape[0], x.device
        cache_key = (h, w, batch, device, x.dtype)
        plans = self.plans.get(cache_key)
        if plans is None:
            c = self.config
            offsets = None
            if c.use_rand:
                key = timestep_key(self.timestep, device)
                offsets = block_offsets(h // c.sy, w // c.sx, c.sx * c.sy, c.seed or 0, tuple(range(self.num_blocks)), key)
            plans = plan_blocks(
                h, w, c.sx, c.sy, batch, int(h * w * c.ratio), offsets, device, blocks=self.num_blocks,
                local_window=c.local_window if c.matching == "local" else None, dtype=x.dtype,
            )  # fmt: skip
            self.plans[cache_key] = plans
        return plans[index]

class GridState:
    """Height and width of the feature map a ``Transformer2DModel`` is processing, or ``None``."""

    def __init__(self) -> None:
        self.grid: tuple[int, int] | None = None


class BlockState:
    """The matching of the block call in progress, and whether ``attn1`` used it."""

    def __init__(self) -> None:
        self.matching: Matching | None = None
        self.reduced = False


class TimestepHook(ModelHook):
    """Records the U-Net's ``timestep`` argument for the blocks' random partitions."""

    def __init__(self, call: CallState) -> None:
        super().__init__()
        self.call = call

    def pre_forward(self, module, *args, **kwargs):
        self.call.start(_argument(args, kwargs, 1, "timestep"))
        return args, kwargs

    def post_forward(self, module, output):
        self.call.start(None)  # free the call's plans
        return output


class FeatureMapHook(ModelHook):
    """Records the real ``(height, width)`` of the 4-D input of a ``Transformer2DModel``."""

    def __init__(self, state: GridState) -> None:
        super().__init__()
        self.state = state

    def pre_forward(self, module, *args, **kwargs):
        hidden_states = _argument(args, kwargs, 0, "hidden_states")
        self.state.grid = tuple(hidden_states.shape[-2:]) if hidden_states.ndim == 4 else None
        return args, kwargs

    def post_forward(self, module, output):
        self.state.grid = None
        return output


class MatchingHook(ModelHook):
    """Bipartite soft matching on the block's input hidden states X, once per block call, for the whole batch."""

    def __init__(self, call: CallState, grid: GridState, state: BlockState, index: int):
        super().__init__()
        self.call, self.grid, self.state, self.index = call, grid, state, index

    def pre_forward(self, module, *args, **kwargs):
        x = _argument(args, kwargs, 0, "hidden_states")
        self.state.matching, self.state.reduced = None, False
        grid = self.grid.grid
        if grid is not None and x.ndim == 3 and grid[0] * grid[1] == x.shape[1]:
            self.state.matching = match(x, self.call.plan(self.index, grid[0], grid[1], x))
        return args, kwargs

    def post_forward(self, module, output):
        self.state.matching = None  # free the indices between calls
        return output


class SelfAttentionHook(ModelHook):
    """Runs ``attn1`` on the reduced tokens, then gives every token its output back (one gather)."""

    def __init__(self, state: BlockState, letter: str) -> None:
        super().__init__()
        self.state, self.letter, self.mode = state, letter, MODES[letter]

    def pre_forward(self, module, *args, **kwargs):
        m = self.state.matching
        x = _argument(args, kwargs, 0, "hidden_states")
        # A mask is laid out for the full token set, so a masked call is left alone.
        if m is None or _argument(args, kwargs, 2, "attention_mask") is not None or x.shape[1] != m.num_tokens:
            return args, kwargs
        x = reduce_tokens(x, m, self.mode)
        self.state.reduced = True
        if "hidden_states" in kwargs:
            return args, {**kwargs, "hidden_states": x}
        return (x, *args[1:]), kwargs

    def post_forward(self, module, output):
        if not self.state.reduced:
            return output
        m, self.state.matching, self.state.reduced = self.state.matching, None, False  # free before the MLP
        if isinstance(output, tuple):
            return (restore_tokens(output[0], m), *output[1:])
        return restore_tokens(output, m)


def register(module: torch.nn.Module, hook: ModelHook, name: str) -> None:
    """Register ``hook`` on ``module`` through diffusers' hook registry."""
    HookRegistry.check_if_exists_or_initialize(module).register_hook(hook, name)


def unregister_all(root: torch.nn.Module, names: tuple[str, ...] = HOOK_NAMES) -> bool:
    """Remove every hook named in ``names`` (default: Token Fusion's) under ``root``; True if any was there."""
    found = False
    for module in root.modules():
        registry = getattr(module, "_diffusers_hook", None)
        if registry is None:
            continue
        for name in names:
            if registry.get_hook(name) is not None:
                registry.remove_hook(name, recurse=False)
                found = True
        if not registry.hooks:
            # Leave the module as it was before its first hook: no registry and, unless something else (an
            # offloading hook, say) installed its own, the class's forward rather than a copy of it.
            del module._diffusers_hook
            forward = module.__dict__.get("forward")
            if getattr(forward, "__self__", None) is module and forward.__func__ is type(module).forward:
                del module.forward
    return found
