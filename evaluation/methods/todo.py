"""ToDo (token downsampling) as a peer baseline: this project's re-implementation from the paper's description.

Smith et al. 2024, "ToDo: Token Downsampling for Efficient Generation of High-Resolution Images": in the
U-Net's highest-resolution transformer blocks, self-attention keeps every query but takes its keys and values
from a downsampled token grid. Here the grid is average-pooled in ``ky x kx`` windows (2x2 by default), so with
N queries on an ``h x w`` grid attention sees ``ceil(h / ky) * ceil(w / kx)`` keys:

    attn1(X) = softmax(Q K_p^T / sqrt(d)) V_p,   Q = X W_q,  K_p = P W_k,  V_p = P W_v,  P = avgpool(X)

with the module's own projections, heads and output projection. Windows that overhang a grid whose size is not
a multiple of the pooling average the tokens they cover.

It is wired into each patched block's ``attn1`` with a diffusers hook that passes the pooled tokens as
``encoder_hidden_states`` (for self-attention modules diffusers' processors take keys and values from it, with
no cross-attention norm), so diffusers' own block and attention code runs unchanged. The grid's height and width
come from the input of the ``Transformer2DModel`` holding the block, as for Token Fusion. This is a peer
baseline for the evaluation, not part of the ``tofu_sd`` plugin.

As a method of the registry (``todo``), its parameter is the pooling, named by the fraction of keys it removes
(:class:`Pooling`): ``todo`` is 2x2, ``todo@0.5`` 1x2.
"""

from __future__ import annotations

import contextlib
import math

import torch
import torch.nn.functional as F
from diffusers.hooks import ModelHook

from tofu_sd import TokenFusionConfig
from tofu_sd.arguments import argument
from tofu_sd.families.unet import UNetFamily
from tofu_sd.hooking import register_innermost, unregister_all
from tofu_sd.hooks import GridHook
from tofu_sd.state import GridState

from ..families import unet_of, unet_sites

from ..errors import EvaluationError
from .base import Parameter, format_ratio

GRID_HOOK = "evaluation.todo.feature_map"
POOL_HOOK = "evaluation.todo.pooled_keys"
HOOK_NAMES = (GRID_HOOK, POOL_HOOK)
_ATTR = "_evaluation_todo"

DEFAULT_POOL = (2, 2)
# Poolings (ky, kx) a --ratios value is mapped to: the one whose fraction of keys removed is nearest.
SWEEP_POOLS = ((1, 2), (2, 2), (2, 4), (4, 4))


def keys_removed(pool: tuple[int, int]) -> float:
    """Fraction of the keys (and values) that ``ky x kx`` pooling removes on a grid divisible by it."""
    ky, kx = pool
    return 1 - 1 / (ky * kx)


def pool_for_ratio(ratio: float) -> tuple[int, int] | None:
    """The pooling of :data:`SWEEP_POOLS` whose keys-removed fraction is nearest ``ratio``; ``None`` when no
    pooling at all (0 removed) is nearer, i.e. for ratios under 0.25."""
    candidates = [(0.0, None)] + [(keys_removed(p), p) for p in SWEEP_POOLS]
    return min(candidates, key=lambda c: (abs(c[0] - ratio), c[0]))[1]


def pool_tokens(x: torch.Tensor, grid: tuple[int, int], pool: tuple[int, int]) -> torch.Tensor:
    """Average-pool ``(B, h*w, C)`` row-major tokens in ``ky x kx`` windows -> ``(B, ceil(h/ky)*ceil(w/kx), C)``."""
    b, n, c = x.shape
    h, w = grid
    image = x.transpose(1, 2).reshape(b, c, h, w)
    # ceil_mode with no padding: an overhanging window averages only the tokens it covers.
    pooled = F.avg_pool2d(image, kernel_size=pool, stride=pool, ceil_mode=True)
    return pooled.flatten(2).transpose(1, 2)


class PooledKeysHook(ModelHook):
    """Gives a self-attention module pooled keys and values; queries (and so outputs) stay one per token."""

    def __init__(self, grid: GridState, pool: tuple[int, int]) -> None:
        super().__init__()
        self.grid, self.pool = grid, pool
        self.calls = 0  #: calls that ran on pooled keys (for tests and diagnostics)

    def pre_forward(self, module, *args, **kwargs):
        x = argument(args, kwargs, 0, "hidden_states")
        grid = self.grid.grid
        if (
            grid is None
            or x.ndim != 3
            or grid[0] * grid[1] != x.shape[1]
            or argument(args, kwargs, 1, "encoder_hidden_states") is not None  # cross-attention: not ours
            or argument(args, kwargs, 2, "attention_mask") is not None  # a mask is laid out for all keys
        ):
            return args, kwargs
        pooled = pool_tokens(x, grid, self.pool)
        self.calls += 1
        kwargs = dict(kwargs)
        if len(args) > 1:  # encoder_hidden_states given positionally (as None)
            args = (args[0], pooled, *args[2:])
        else:
            kwargs["encoder_hidden_states"] = pooled
        return args, kwargs


def apply_todo(pipe_or_unet, pool: tuple[int, int] = DEFAULT_POOL, max_downsample: int = 1) -> list[str]:
    """Hook ToDo into the same blocks Token Fusion patches; returns their names. Replaces an earlier ToDo patch."""
    unet = unet_of(pipe_or_unet)
    sites = unet_sites(unet, max_downsample)
    if not sites:
        raise ValueError(f"{type(unet).__name__} has no BasicTransformerBlock to apply ToDo to")
    remove_todo(unet)
    grids: dict[int, GridState] = {}
    try:
        for site in sites:
            if id(site.grid_module) not in grids:
                grids[id(site.grid_module)] = GridState()
                register_innermost(site.grid_module, GridHook(grids[id(site.grid_module)], UNetFamily().grid), GRID_HOOK)
            register_innermost(site.block.attn1, PooledKeysHook(grids[id(site.grid_module)], tuple(pool)), POOL_HOOK)
    except BaseException:
        remove_todo(unet)
        raise
    names = [site.name for site in sites]
    setattr(unet, _ATTR, {"pool": tuple(pool), "blocks": names})
    return names


def remove_todo(pipe_or_unet) -> bool:
    """Remove ToDo's hooks (and only them); True if any was there. The model is then exactly as before."""
    unet = unet_of(pipe_or_unet)
    found = unregister_all(unet, HOOK_NAMES)
    if hasattr(unet, _ATTR):
        delattr(unet, _ATTR)
    return found


def pooled_key_count(grid: tuple[int, int], pool: tuple[int, int]) -> int:
    """Number of keys ToDo leaves on an ``h x w`` grid."""
    return math.ceil(grid[0] / pool[0]) * math.ceil(grid[1] / pool[1])


# ---------------------------------------------------------------- as a method of the registry


class Pooling(Parameter):
    """ToDo's ``ky x kx`` pooling, named by the fraction of keys it removes (``todo@0.75`` is 2x2); unsuffixed,
    2x2 whatever the run's ``--ratio``."""

    uses_run_ratio = False

    def pool(self, name: str, value: float | None) -> tuple[int, int]:
        """The pooling of ``value`` (2x2, ToDo's default, for None)."""
        if value is None:
            return DEFAULT_POOL
        for pool in SWEEP_POOLS:
            if abs(keys_removed(pool) - value) < 1e-9:
                return pool
        choices = ", ".join(f"todo@{format_ratio(keys_removed(p))} ({p[0]}x{p[1]})" for p in SWEEP_POOLS)
        raise EvaluationError(
            f"{name!r}: ToDo's ratio is the fraction of keys its pooling removes; use one of {choices}. "
            "With --ratios, each ratio is mapped to the nearest of them."
        )

    def check(self, name: str, value: float, options: TokenFusionConfig) -> None:
        self.pool(name, value)

    def for_sweep(self, ratio: float) -> float | None:
        pool = pool_for_ratio(ratio)
        return None if pool is None else keys_removed(pool)


POOLING = Pooling()


def todo_params(value: float | None, options: TokenFusionConfig) -> dict:
    pool = POOLING.pool("todo" if value is None else f"todo@{format_ratio(value)}", value)
    return {"ratio": keys_removed(pool), "pool": list(pool), "keys_removed": keys_removed(pool)}


def describe(params: dict) -> str:
    ky, kx = params["pool"]
    return f"keys and values pooled {ky}x{kx} ({params['keys_removed']:.0%} removed)"


@contextlib.contextmanager
def todo_patch(pipe, options: TokenFusionConfig, params: dict):
    """ToDo with the name's pooling, on the blocks that tofu_sd would patch with ``options.max_downsample``."""
    apply_todo(pipe, tuple(params["pool"]), options.max_downsample)
    try:
        yield
    finally:
        remove_todo(pipe)
