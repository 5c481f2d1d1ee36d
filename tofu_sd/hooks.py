"""diffusers hooks that put Token Fusion around a U-Net's transformer blocks without copying their code.

Four small hooks cooperate through plain state objects:

- :class:`TimestepHook` on the U-Net records the timestep of the call (it keys the random partition, and
  counts the steps that ``rematch_every`` reuses matchings across);
- :class:`FeatureMapHook` on each ``Transformer2DModel`` records the height and width of its feature map;
- :class:`MatchingHook` on each patched ``BasicTransformerBlock`` matches tokens on the block's input (or takes
  the matching stored at an earlier step);
- on the block's ``attn1``, :class:`SelfAttentionHook` (``reduce="tokens"``) reduces its input and restores its
  output, or :class:`KeyValueHook` (``reduce="kv"``) passes the reduced tokens as its keys and values, with
  proportional attention's log-size bias as its attention mask.

The state objects (:class:`CallState`, :class:`GridState`, :class:`BlockState`) are thread-local: each thread
that calls the U-Net sees its own timestep, step count, grids and matchings, so concurrent calls do not mix.
"""

from __future__ import annotations

import threading
from typing import Any, Callable

import torch
from diffusers.hooks import HookRegistry, ModelHook
from diffusers.models.attention_processor import AttnProcessor, SlicedAttnProcessor

from .config import TokenFusionConfig
from .merge import MODES, Matching, log_size_bias, match, reduce_tokens, restore_tokens
from .partition import block_offsets, timestep_key
from .plans import BlockPlan, plan_blocks

TIMESTEP_HOOK = "tofu_sd.timestep"
FEATURE_MAP_HOOK = "tofu_sd.feature_map"
MATCHING_HOOK = "tofu_sd.matching"
SELF_ATTENTION_HOOK = "tofu_sd.self_attention"
HOOK_NAMES = (TIMESTEP_HOOK, FEATURE_MAP_HOOK, MATCHING_HOOK, SELF_ATTENTION_HOOK)

#: With ``rematch_every > 1``, matchings are stored for the first this many calls of a step (a conditional and
#: an unconditional call, say, or the two evaluations of a second-order sampler); later calls always match.
MAX_CALLS_PER_STEP = 4


def _argument(args: tuple, kwargs: dict, index: int, name: str) -> Any:
    if name in kwargs:
        return kwargs[name]
    return args[index] if len(args) > index else None


def _with_arguments(args: tuple, kwargs: dict, values: dict[int, tuple[str, Any]]) -> tuple[tuple, dict]:
    """``args`` and ``kwargs`` with argument ``name`` (at position ``index``) set, for each ``index: (name, value)``."""
    args, kwargs = list(args), dict(kwargs)
    for index, (name, value) in values.items():
        if name not in kwargs and len(args) > index:
            args[index] = value
        else:
            kwargs[name] = value
    return tuple(args), kwargs


def _host_timestep(timestep) -> float | None:
    """The (first) timestep as a Python float; a tensor on an accelerator is copied to the host (a sync)."""
    if timestep is None:
        return None
    if isinstance(timestep, torch.Tensor):
        return float(timestep.reshape(-1)[0])
    return float(timestep)


class CallState(threading.local):
    """What the current U-Net call knows: its timestep, and the plans of all patched blocks, derived once per call
    and grid (the partitions of all blocks in one batched computation, not one per block); with
    ``rematch_every > 1``, also the step count and the matchings stored at the last matching step.

    Thread-local: a thread's first use sets up its own copy (with the constructor's arguments)."""

    def __init__(self, config: TokenFusionConfig, num_blocks: int) -> None:
        self.config, self.num_blocks = config, num_blocks
        self.seed = 0 if config.seed is None else config.seed  # `apply` stores 0; a bare config may hold None
        self.timestep: torch.Tensor | float | None = None
        self.plans: dict[tuple, list[BlockPlan]] = {}
        # The step count (see `TokenFusionConfig.rematch_every`): the previous call's timestep, the index of the
        # current step in its pipeline call and of the current call in its step.
        self.previous: float | None = None
        self.step = self.position = 0
        self.reusing = self.storing = False  # whether this call looks up / stores matchings
        self.matchings: dict[tuple, Matching] = {}  # mutated in place only (see `_count_step`)

    def start(self, timestep) -> None:
        """Begin a U-Net call at ``timestep``."""
        self.timestep, self.plans = timestep, {}
        self.reusing = self.storing = False
        # Inside a compiled graph the count would be traced state: the graph would branch on it (recompiling at
        # every step); every call matches there instead.
        if self.config.rematch_every > 1 and not torch.compiler.is_compiling():
            self._count_step(_host_timestep(timestep))

    def finish(self) -> None:
        """End the U-Net call: free its plans (stored matchings stay for the next steps)."""
        self.timestep, self.plans = None, {}
        self.reusing = self.storing = False

    def _count_step(self, value: float | None) -> None:
        previous, self.previous = self.previous, value
        if value is None or previous is None or value > previous:  # a new pipeline call
            self.step, self.position = 0, 0
        elif value < previous:  # the next step
            self.step, self.position = self.step + 1, 0
        else:  # another call of the same step
            self.position += 1
        matching_step = self.step % self.config.rematch_every == 0
        if matching_step and self.position == 0:
            self.matchings.clear()  # in place: a compiled block may hold this dict
        self.reusing = not matching_step
        self.storing = self.position < MAX_CALLS_PER_STEP

    def matching(self, index: int, h: int, w: int, x: torch.Tensor) -> Matching | None:
        """The matching of block ``index`` for tokens ``x`` on an ``h x w`` grid: at a reuse step the one stored
        for the same block, grid, batch, device, dtype and position in the step, else a new one (stored)."""
        if not (self.reusing or self.storing):  # rematch_every=1, or a compiled graph: nothing stored to read
            return match(x, self.plan(index, h, w, x))
        key = (index, h, w, x.shape[0], x.device, x.dtype, self.position)
        if self.reusing:
            stored = self.matchings.get(key)
            if stored is not None:
                return stored
        m = match(x, self.plan(index, h, w, x))
        if self.storing and m is not None:
            self.matchings[key] = m
        return m

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
                offsets = block_offsets(h // c.sy, w // c.sx, c.sx * c.sy, self.seed, tuple(range(self.num_blocks)), key)
            plans = plan_blocks(
                h, w, c.sx, c.sy, batch, int(h * w * c.ratio), offsets, device, blocks=self.num_blocks,
                local_window=c.local_window if c.matching == "local" else None, dtype=x.dtype,
            )  # fmt: skip
            self.plans[cache_key] = plans
        return plans[index]


class GridState(threading.local):
    """Height and width of the feature map a ``Transformer2DModel`` is processing, or ``None`` (thread-local)."""

    def __init__(self) -> None:
        self.grid: tuple[int, int] | None = None


class BlockState(threading.local):
    """The matching of the block call in progress, and whether ``attn1`` used it (thread-local)."""

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
        self.call.finish()  # free the call's plans
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
    """Bipartite soft matching on the block's input hidden states X, once per block call, for the whole batch (or,
    at a reuse step of ``rematch_every``, the matching stored at the last matching step)."""

    def __init__(self, call: CallState, grid: GridState, state: BlockState, index: int):
        super().__init__()
        self.call, self.grid, self.state, self.index = call, grid, state, index

    def pre_forward(self, module, *args, **kwargs):
        x = _argument(args, kwargs, 0, "hidden_states")
        self.state.matching, self.state.reduced = None, False
        grid = self.grid.grid
        if grid is not None and x.ndim == 3 and grid[0] * grid[1] == x.shape[1]:
            self.state.matching = self.call.matching(self.index, grid[0], grid[1], x)
        return args, kwargs

    def post_forward(self, module, output):
        self.state.matching = None  # free the indices between calls
        return output


class _AttentionHook(ModelHook):
    """A hook on a patched block's ``attn1`` that reduces with the block's matching and schedule letter."""

    def __init__(self, state: BlockState, letter: str) -> None:
        super().__init__()
        self.state, self.letter, self.mode = state, letter, MODES[letter]


class SelfAttentionHook(_AttentionHook):
    """Runs ``attn1`` on the reduced tokens, then gives every token its output back (one gather)."""

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


class KeyValueHook(_AttentionHook):
    """Runs ``attn1`` with every token as a query and the reduced tokens as its keys and values, through the
    attention processor's own ``encoder_hidden_states``, with proportional attention's ``log(size)`` bias as an
    additive ``attention_mask`` of shape ``(B, 1, N - r)`` (broadcast over heads and queries by diffusers).

    ``attn1`` must take its keys and values from ``encoder_hidden_states`` unchanged (no ``norm_cross``,
    ``group_norm`` or ``spatial_norm``; :func:`check_key_value_attention`). Calls that already have keys and
    values of their own or an attention mask are left alone."""

    def pre_forward(self, module, *args, **kwargs):
        m = self.state.matching
        x = _argument(args, kwargs, 0, "hidden_states")
        if (
            m is None
            or _argument(args, kwargs, 1, "encoder_hidden_states") is not None
            or _argument(args, kwargs, 2, "attention_mask") is not None
            or x.shape[1] != m.num_tokens
        ):
            return args, kwargs
        tokens = reduce_tokens(x, m, self.mode)
        bias = log_size_bias(m, _bias_dtype(module, x.dtype))
        return _with_arguments(args, kwargs, {1: ("encoder_hidden_states", tokens), 2: ("attention_mask", bias)})


def _bias_dtype(attn: torch.nn.Module, dtype: torch.dtype) -> torch.dtype:
    """The dtype of the logit bias: the tokens', except float32 for the processors that add the mask to upcast
    float32 scores (``get_attention_scores`` with ``upcast_attention``); scaled-dot-product attention takes a
    mask in the query's dtype."""
    if getattr(attn, "upcast_attention", False) and isinstance(attn.processor, (AttnProcessor, SlicedAttnProcessor)):
        return torch.float32
    return dtype


def check_key_value_attention(name: str, attn: torch.nn.Module) -> None:
    """Raise ``ValueError`` if ``attn`` would not compute its keys and values from ``encoder_hidden_states`` as
    from its own input (``reduce="kv"`` passes the reduced tokens there)."""
    extra = [part for part in ("norm_cross", "group_norm", "spatial_norm") if getattr(attn, part, None) is not None]
    if extra:
        raise ValueError(
            f"reduce='kv' cannot patch {name}: its {', '.join(extra)} would treat keys and values passed as "
            "encoder_hidden_states unlike its own input; use reduce='tokens'."
        )


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
            if is_class_forward(module, module.__dict__.get("forward")):
                del module.forward
    return found


def is_class_forward(module: torch.nn.Module, forward: Any) -> bool:
    """Whether ``forward`` is only ``module``'s own class ``forward``, bound to it (no wrapper of anyone's)."""
    return getattr(forward, "__self__", None) is module and getattr(forward, "__func__", None) is type(module).forward


def hooked_modules(root: torch.nn.Module, names: tuple[str, ...] = HOOK_NAMES) -> dict[torch.nn.Module, Callable]:
    """The modules under ``root`` with hooks named in ``names``, each with the forward that those hooks wrap.

    That forward is the module's class ``forward`` (bound) unless something had replaced it before the first
    hook was registered. Raises ``TypeError`` if one of these modules also has other diffusers hooks: then its
    registry is not Token Fusion's alone (a deep copy could neither keep nor drop it correctly).
    """
    wrapped: dict[torch.nn.Module, Callable] = {}
    for qualified, module in root.named_modules():
        registry = getattr(module, "_diffusers_hook", None)
        if registry is None or not any(name in registry.hooks for name in names):
            continue
        others = [name for name in registry.hooks if name not in names]
        if others:
            raise TypeError(
                f"cannot deep-copy: {qualified or type(module).__name__} has diffusers hooks besides Token Fusion's "
                f"({', '.join(others)}), and a copy of a diffusers hook stays bound to the original module. Remove "
                "those hooks, or Token Fusion (tofu_sd.remove), before copying; apply them to the copy after."
            )
        wrapped[module] = next(iter(registry.hooks.values())).fn_ref.forward  # what the first hook wrapped
    return wrapped
