"""The hooks that put Token Fusion around a U-Net's transformer blocks without copying their code.

Small hooks cooperate through plain state objects:

- :class:`TimestepHook` on the U-Net records the timestep of the call (it keys the random partition, and
  counts the steps that ``rematch_every`` reuses matchings across);
- :class:`FeatureMapHook` on each ``Transformer2DModel`` records the height and width of its feature map;
- :class:`MatchingHook` on each patched ``BasicTransformerBlock`` matches tokens on the block's input (or takes
  the matching stored at an earlier step), once per block call, and frees the matching at the block's end;
- on each of the block's sub-modules that :attr:`~tofu_sd.TokenFusionConfig.modules` names (``attn1``,
  ``attn2``, ``ff``), :class:`ReduceRestoreHook` reduces the module's input with the block's matching and
  schedule letter and restores its output (as tomesd's ``merge_attn`` / ``merge_crossattn`` / ``merge_mlp``),
  except on ``attn1`` with ``reduce="kv"``: there :class:`KeyValueHook` passes the reduced tokens as its keys and
  values, with proportional attention's log-size bias as its attention mask.

How they are installed. The two outer hooks, on the U-Net and on the ``Transformer2DModel`` s, are torch's own
module hooks (a forward pre-hook with keyword arguments and a forward hook, :class:`TorchHooks`), kept with
their handles and removed by them. Torch runs them in ``Module.__call__`` whatever the module's ``forward`` is,
and they leave ``forward`` alone. Other packages replace ``forward`` on exactly these modules: DeepCache assigns
``module.forward = wrapper`` on the U-Net and on its down / mid / up blocks, their transformers, resnets and
samplers, and assigns back what it saved when disabled (accelerate's offloading hooks also replace
``forward``). A diffusers registry hook replaces ``forward`` as well, and puts back what it wrapped when
removed, so on these modules it would discard a wrapper installed after it (``tofu_sd.remove`` under DeepCache
dropped DeepCache's wrappers) or be discarded with one installed before it (DeepCache's ``disable`` dropped
Token Fusion's timestep and feature-map hooks: nothing was reduced any more). With torch hooks either package
can be enabled first and either removed while the other stays exactly as it is alone.

The block-level hooks (on the ``BasicTransformerBlock`` and its ``attn1`` / ``attn2`` / ``ff``, which DeepCache
never wraps) stay in diffusers' :class:`~diffusers.hooks.HookRegistry`, named ``tofu_sd.*``: they run inside
their module's ``forward``, so in a compiled block they are part of its graph.

One thing differs for ``torch.compile``: it runs the hooks of a module it compiles (``torch.compile(unet)``)
outside the module's graph, as frames of their own, and drops writes to a ``threading.local``'s attributes made
there. :class:`CallState`, written by the U-Net's hook, therefore keeps its per-thread data on a plain object per
thread; the U-Net's hook is then traced on its own, sees ``torch.compiler.is_compiling()`` and leaves the
step count alone, so a U-Net compiled whole matches at every call, as documented for ``rematch_every``.

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

# Torch hooks (see :class:`TorchHooks`) on the U-Net and on each Transformer2DModel.
TIMESTEP_HOOK = "tofu_sd.timestep"
FEATURE_MAP_HOOK = "tofu_sd.feature_map"
OUTER_HOOK_NAMES = (TIMESTEP_HOOK, FEATURE_MAP_HOOK)
# diffusers registry hooks on each patched block and on its reduced sub-modules.
MATCHING_HOOK = "tofu_sd.matching"
SELF_ATTENTION_HOOK = "tofu_sd.self_attention"
CROSS_ATTENTION_HOOK = "tofu_sd.cross_attention"
FEED_FORWARD_HOOK = "tofu_sd.feed_forward"
#: The registry hook on each sub-module of a block that :attr:`~tofu_sd.TokenFusionConfig.modules` can name.
MODULE_HOOKS = {"attn1": SELF_ATTENTION_HOOK, "attn2": CROSS_ATTENTION_HOOK, "ff": FEED_FORWARD_HOOK}
HOOK_NAMES = (MATCHING_HOOK, *MODULE_HOOKS.values())

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


class _PerThread(threading.local):
    """``value``: an object made by ``factory()``, a fresh one in each thread that uses it."""

    def __init__(self, factory: Callable[[], Any]) -> None:
        self.value = factory()


class _CallData:
    """One thread's part of a :class:`CallState`."""

    def __init__(self) -> None:
        self.timestep: torch.Tensor | float | None = None
        self.plans: dict[tuple, list[BlockPlan]] = {}
        # The step count (see `TokenFusionConfig.rematch_every`): the previous call's timestep, the index of the
        # current step in its pipeline call and of the current call in its step.
        self.previous: float | None = None
        self.step = self.position = 0
        self.reusing = self.storing = False  # whether this call looks up / stores matchings
        self.matchings: dict[tuple, Matching] = {}  # mutated in place only (see `_count_step`)


class CallState:
    """What the current U-Net call knows: its timestep, and the plans of all patched blocks, derived once per call
    and grid (the partitions of all blocks in one batched computation, not one per block); with
    ``rematch_every > 1``, also the step count and the matchings stored at the last matching step.

    Thread-local: each thread that uses it gets its own timestep, plans, step count and matchings. They live on a
    plain object per thread (:class:`_PerThread`), not as attributes of a ``threading.local``: ``torch.compile``
    compiles the U-Net's own hooks (:class:`TimestepHook`, outside the U-Net's graph) as frames of their own, and
    drops their writes to a ``threading.local``'s attributes; writes to a plain object stay."""

    def __init__(self, config: TokenFusionConfig, num_blocks: int) -> None:
        self.config, self.num_blocks = config, num_blocks
        self.seed = 0 if config.seed is None else config.seed  # `apply` stores 0; a bare config may hold None
        self._thread = _PerThread(_CallData)

    @property
    def timestep(self) -> torch.Tensor | float | None:
        """The timestep of this thread's U-Net call in progress."""
        return self._thread.value.timestep

    @property
    def matchings(self) -> dict[tuple, Matching]:
        """This thread's stored matchings (``rematch_every > 1``)."""
        return self._thread.value.matchings

    def start(self, timestep) -> None:
        """Begin a U-Net call at ``timestep``."""
        now = self._thread.value
        now.timestep, now.plans = timestep, {}
        now.reusing = now.storing = False
        # Inside a compiled graph the count would be traced state: the graph would branch on it (recompiling at
        # every step); every call matches there instead.
        if self.config.rematch_every > 1 and not torch.compiler.is_compiling():
            self._count_step(now, _host_timestep(timestep))

    def finish(self) -> None:
        """End the U-Net call: free its plans (stored matchings stay for the next steps)."""
        now = self._thread.value
        now.timestep, now.plans = None, {}
        now.reusing = now.storing = False

    def _count_step(self, now: _CallData, value: float | None) -> None:
        previous, now.previous = now.previous, value
        if value is None or previous is None or value > previous:  # a new pipeline call
            now.step, now.position = 0, 0
        elif value < previous:  # the next step
            now.step, now.position = now.step + 1, 0
        else:  # another call of the same step
            now.position += 1
        matching_step = now.step % self.config.rematch_every == 0
        if matching_step and now.position == 0:
            now.matchings.clear()  # in place: a compiled block may hold this dict
        now.reusing = not matching_step
        now.storing = now.position < MAX_CALLS_PER_STEP

    def matching(self, index: int, h: int, w: int, x: torch.Tensor) -> Matching | None:
        """The matching of block ``index`` for tokens ``x`` on an ``h x w`` grid: at a reuse step the one stored
        for the same block, grid, batch, device, dtype and position in the step, else a new one (stored)."""
        now = self._thread.value
        if not (now.reusing or now.storing):  # rematch_every=1, or a compiled graph: nothing stored to read
            return match(x, self.plan(index, h, w, x))
        key = (index, h, w, x.shape[0], x.device, x.dtype, now.position)
        if now.reusing:
            stored = now.matchings.get(key)
            if stored is not None:
                return stored
        m = match(x, self.plan(index, h, w, x))
        if now.storing and m is not None:
            now.matchings[key] = m
        return m

    def plan(self, index: int, h: int, w: int, x: torch.Tensor) -> BlockPlan:
        """The plan of block ``index`` on an ``h x w`` grid for tokens ``x``, computed with its siblings'."""
        now = self._thread.value
        batch, device = x.shape[0], x.device
        cache_key = (h, w, batch, device, x.dtype)
        plans = now.plans.get(cache_key)
        if plans is None:
            c = self.config
            offsets = None
            if c.use_rand:
                key = timestep_key(now.timestep, device)
                offsets = block_offsets(h // c.sy, w // c.sx, c.sx * c.sy, self.seed, tuple(range(self.num_blocks)), key)
            plans = plan_blocks(
                h, w, c.sx, c.sy, batch, int(h * w * c.ratio), offsets, device, blocks=self.num_blocks,
                local_window=c.local_window if c.matching == "local" else None, dtype=x.dtype,
            )  # fmt: skip
            now.plans[cache_key] = plans
        return plans[index]


class GridState(threading.local):
    """Height and width of the feature map a ``Transformer2DModel`` is processing, or ``None`` (thread-local)."""

    def __init__(self) -> None:
        self.grid: tuple[int, int] | None = None


class BlockState(threading.local):
    """What the hooks of one patched block share during a block call (thread-local): the block's matching (set on
    the block's input, freed at the block's end), the matching the sub-module call in progress was reduced with
    (its output is restored with it), and how many batch rows of the block's tokens a chunked feed-forward has
    taken so far."""

    def __init__(self) -> None:
        self.matching: Matching | None = None
        self.reduced: Matching | None = None
        self.rows_done = 0

    def clear(self) -> None:
        self.matching, self.reduced, self.rows_done = None, None, 0


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
    at a reuse step of ``rematch_every``, the matching stored at the last matching step). Every reduced
    sub-module of the block uses it; it is freed when the block returns."""

    def __init__(self, call: CallState, grid: GridState, state: BlockState, index: int):
        super().__init__()
        self.call, self.grid, self.state, self.index = call, grid, state, index

    def pre_forward(self, module, *args, **kwargs):
        x = _argument(args, kwargs, 0, "hidden_states")
        self.state.clear()
        grid = self.grid.grid
        if grid is not None and x.ndim == 3 and grid[0] * grid[1] == x.shape[1]:
            self.state.matching = self.call.matching(self.index, grid[0], grid[1], x)
        return args, kwargs

    def post_forward(self, module, output):
        self.state.clear()  # free the indices between calls
        return output


class _AttentionHook(ModelHook):
    """A hook on a sub-module of a patched block that reduces with the block's matching and schedule letter."""

    def __init__(self, state: BlockState, letter: str) -> None:
        super().__init__()
        self.state, self.letter, self.mode = state, letter, MODES[letter]


class ReduceRestoreHook(_AttentionHook):
    """Runs the module (``attn1``, ``attn2`` or ``ff``) on the reduced tokens, then gives every token its output
    back (one gather): tomesd's ``m`` / ``u`` around that module.

    Only the ``hidden_states`` argument is reduced: ``attn2`` keeps its keys and values (the text,
    ``encoder_hidden_states``). A call that does not carry the block's tokens is left alone: a different token
    count or batch (a chunk of diffusers' sequence-chunked feed-forward, say), or a mask laid out per query
    (any ``attn1`` mask; an ``attn2`` mask of shape ``(B, N, T)``). With ``chunks=True`` (the ``ff``), a call
    on fewer batch rows is taken as the next chunk of diffusers' batch-chunked feed-forward (a block's
    ``set_chunk_feed_forward(chunk_size, dim=0)``) and reduced with those rows of the matching."""

    def __init__(self, state: BlockState, letter: str, *, chunks: bool = False, key_mask: bool = False) -> None:
        super().__init__(state, letter)
        self.chunks, self.key_mask = chunks, key_mask  # key_mask: a (B, 1, T) mask is over keys only (attn2)

    def pre_forward(self, module, *args, **kwargs):
        m = self.state.matching
        self.state.reduced = None
        x = _argument(args, kwargs, 0, "hidden_states")
        if m is None or not isinstance(x, torch.Tensor) or x.ndim != 3 or x.shape[1] != m.num_tokens:
            return args, kwargs
        mask = _argument(args, kwargs, 2, "attention_mask")
        if mask is not None and not (self.key_mask and (mask.ndim < 3 or mask.shape[-2] == 1)):
            return args, kwargs  # laid out for the full token set
        if x.shape[0] != m.batch:
            start = self.state.rows_done
            if not self.chunks or start + x.shape[0] > m.batch:
                return args, kwargs
            self.state.rows_done = start + x.shape[0]
            m = batch_rows(m, start, start + x.shape[0])
        self.state.reduced = m
        return _with_arguments(args, kwargs, {0: ("hidden_states", reduce_tokens(x, m, self.mode))})

    def post_forward(self, module, output):
        m, self.state.reduced = self.state.reduced, None
        if m is None:
            return output
        if isinstance(output, tuple):
            return (restore_tokens(output[0], m), *output[1:])
        return restore_tokens(output, m)


#: The hook of ``attn1`` with ``reduce="tokens"`` (its name before ``attn2`` and ``ff`` could be reduced too).
SelfAttentionHook = ReduceRestoreHook


def batch_rows(m: Matching, start: int, stop: int) -> Matching:
    """The matching of batch rows ``start:stop`` of ``m``, for those rows' tokens alone."""
    n, kept = m.num_tokens, m.num_tokens - m.r
    return Matching(
        keep_rows=m.keep_rows[start * kept : stop * kept] - start * n,
        restore_rows=m.restore_rows[start * n : stop * n] - start * kept,
        ranked_src_rows=m.ranked_src_rows[start:stop] - start * n,
        dst_idx=m.dst_idx[start:stop],
        num_tokens=n,
        num_dst=m.num_dst,
    )


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


class TorchHooks:
    """A :class:`~diffusers.hooks.ModelHook`'s ``pre_forward`` and ``post_forward`` run as torch's own forward
    pre-hook (with keyword arguments) and forward hook of ``module``, named ``name``.

    Unlike a registry hook it leaves ``module.forward`` alone, so a wrapper that someone assigns to
    ``module.forward`` before or after it (DeepCache, accelerate) is neither discarded nor kept calling it: see
    the module docstring. The forward hook is also called when the forward raises (``always_call``), so the
    call's state is freed then too. :meth:`remove` removes exactly these two hooks, through their handles.

    ``torch.compile(module)`` runs the module's own hooks outside its graph and compiles them as frames of their
    own (see :class:`CallState` for what that means for their state)."""

    def __init__(self, module: torch.nn.Module, hook: ModelHook, name: str) -> None:
        self.hook, self.name = hook, name

        def pre(module, args, kwargs):
            return hook.pre_forward(module, *args, **kwargs)

        def post(module, args, output):
            return hook.post_forward(module, output)

        for function in (pre, post):
            function.tofu_sd_hooks = self  # how :func:`torch_hooks` recognizes them
        self.functions = (pre, post)  # the very objects torch stores (a deep copy leaves them out)
        self.handles = (
            module.register_forward_pre_hook(pre, with_kwargs=True),
            module.register_forward_hook(post, always_call=True),
        )

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()

    def remove_from_copy(self, twin: torch.nn.Module) -> None:
        """Remove these hooks' entries from ``twin``, a deep copy of their module (whose hook dictionaries hold
        what the copy made of them under the same handle ids)."""
        ids = [handle.id for handle in self.handles]
        for table in (
            twin._forward_pre_hooks, twin._forward_pre_hooks_with_kwargs,
            twin._forward_hooks, twin._forward_hooks_with_kwargs, twin._forward_hooks_always_called,
        ):  # fmt: skip
            for key in ids:
                table.pop(key, None)


def attach(module: torch.nn.Module, hook: ModelHook, name: str) -> TorchHooks:
    """Run ``hook`` around ``module``'s calls as torch module hooks named ``name`` (:class:`TorchHooks`)."""
    return TorchHooks(module, hook, name)


def torch_hooks(
    root: torch.nn.Module, names: tuple[str, ...] = OUTER_HOOK_NAMES
) -> list[tuple[torch.nn.Module, TorchHooks]]:
    """The :class:`TorchHooks` named in ``names`` (default: Token Fusion's) under ``root``, with their modules."""
    found = []
    for module in root.modules():
        for function in list(module._forward_pre_hooks.values()):
            owner = getattr(function, "tofu_sd_hooks", None)
            if isinstance(owner, TorchHooks) and owner.name in names and function is owner.functions[0]:
                found.append((module, owner))
    return found


def get_torch_hook(module: torch.nn.Module, name: str) -> ModelHook | None:
    """The hook that :func:`attach` put on ``module`` itself under ``name``, or None."""
    for owner_module, owner in torch_hooks(module, (name,)):
        if owner_module is module:
            return owner.hook
    return None


def detach_all(root: torch.nn.Module, names: tuple[str, ...] = OUTER_HOOK_NAMES) -> bool:
    """Remove every :class:`TorchHooks` named in ``names`` (default: Token Fusion's) under ``root``; True if any
    was there."""
    found = torch_hooks(root, names)
    for _, owner in found:
        owner.remove()
    return bool(found)


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
