"""The hooks that find, once per block call, the matching that a patched block reduces with.

- :class:`CallHook` (torch hooks on the model) starts and ends the model call's :class:`~tofu_sd.state.CallState`
  at the call's timestep (the random partition's key, and the step count of ``rematch_every``);
- :class:`GridHook` (torch hooks on each module whose call carries a token grid: a U-Net's
  ``Transformer2DModel`` s, or the diffusion transformer itself) records that grid as its family finds it
  (``(h, w)``, or a video's ``(frames, h, w)``);
- :class:`MatchingHook` (a registry hook on each patched block) matches the block's input tokens on that grid,
  or takes the matching stored at an earlier step (``rematch_every``) or kept for a recomputation (gradient
  checkpointing), and frees it when the block returns.

The hooks that use the matching are in :mod:`tofu_sd.reducing`; how they are installed, in
:mod:`tofu_sd.hooking` and :mod:`tofu_sd.install`.
"""

from __future__ import annotations

from typing import Callable

import torch
from diffusers.hooks import ModelHook

from .arguments import argument
from .cache_tests import tested_blocks
from .state import BlockState, CallState, GridState, grid_3d

CALL_HOOK = "tofu_sd.call"
GRID_HOOK = "tofu_sd.grid"
MATCHING_HOOK = "tofu_sd.matching"


def _checkpointing(model: torch.nn.Module) -> bool:
    """Whether a module of ``model`` runs its blocks under gradient checkpointing (diffusers' flag)."""
    return any(getattr(module, "gradient_checkpointing", False) is True for module in model.modules())


class CallHook(ModelHook):
    """Starts the model call at its timestep (``timestep(args, kwargs)``) and ends it, even one that raised.

    A call made with gradients on a model whose blocks are checkpointed keeps its matchings for the blocks'
    recomputation (:class:`~tofu_sd.state.RecomputeStore`). Of the patched ``blocks``, those a step cache tests
    at this call (:mod:`tofu_sd.cache_tests`) are left unreduced (:attr:`CallState.untouched`)."""

    def __init__(self, call: CallState, timestep: Callable, blocks: tuple[torch.nn.Module, ...] = ()) -> None:
        super().__init__()
        self.call, self.timestep, self.blocks = call, timestep, blocks

    def pre_forward(self, module, *args, **kwargs):
        keep = torch.is_grad_enabled() and _checkpointing(module)
        self.call.untouched = tested_blocks(self.blocks)
        self.call.start(self.timestep(args, kwargs), keep)
        return args, kwargs

    def post_forward(self, module, output):
        self.call.finish()
        return output


class GridHook(ModelHook):
    """Records the token grid of its module's call, ``grid(module, args, kwargs)`` (``None`` if it has none)."""

    def __init__(self, state: GridState, grid: Callable) -> None:
        super().__init__()
        self.state, self.grid = state, grid

    def pre_forward(self, module, *args, **kwargs):
        self.state.grid = self.grid(module, args, kwargs)
        return args, kwargs

    def post_forward(self, module, output):
        self.state.grid = None
        return output


class MatchingHook(ModelHook):
    """Bipartite soft matching on the block's input hidden states ``(B, N, C)`` (the image tokens), once per block
    call, for the whole batch: the matching kept for this very input if the call is a recomputation under
    gradient checkpointing, else (on the grid of the call in progress) the one stored at the last matching step
    of ``rematch_every`` or a new one. Every reduced sub-module of the block uses it; it is freed when the block
    returns. With ``text_len`` (single-stream blocks), also records the number of text tokens that the block
    puts in front of the image tokens (its ``encoder_hidden_states`` argument). With ``image_last`` (single-stream
    blocks whose model concatenated ``[text, image]`` before them: Chroma, FLUX.2), the input is that sequence:
    the matching is taken on its last ``h * w`` tokens, and the tokens in front of them are the text. With
    ``image_first`` (single-stream blocks whose input is ``[image, rest]``: Z-Image), on its first ``h * w`` tokens;
    ``text_len`` then records the number of tokens after them."""

    def __init__(
        self, call: CallState, grid: GridState, state: BlockState, index: int, text_len: bool = False,
        image_last: bool = False, image_first: bool = False,
    ):  # fmt: skip
        super().__init__()
        self.call, self.grid, self.state, self.index, self.text_len = call, grid, state, index, text_len
        self.image_last, self.image_first = image_last, image_first

    def pre_forward(self, module, *args, **kwargs):
        x = argument(args, kwargs, 0, "hidden_states")
        self.state.clear()
        if not isinstance(x, torch.Tensor) or x.ndim != 3 or self.index in self.call.untouched:
            return args, kwargs
        m = self.call.recompute.find(self.index, x)
        grid, part = self.grid.grid, self.image_last or self.image_first
        if m is None and grid is not None:
            f, h, w = grid_3d(grid)
            if f * h * w == x.shape[1] and not part:
                m = self.call.matching(self.index, (f, h, w), x)
            elif f * h * w < x.shape[1] and part:
                m = self._match_part(x, (f, h, w))
        self.state.matching = m
        if m is not None and part:
            self.state.text_len = x.shape[1] - m.num_tokens
        elif m is not None and self.text_len:
            self.state.text_len = argument(args, kwargs, 1, "encoder_hidden_states").shape[1]
        return args, kwargs

    def _match_part(self, x: torch.Tensor, grid: tuple[int, int, int]):
        """The matching of the last (``image_first``: first) ``f * h * w`` tokens of ``x``. If the call keeps it
        for a checkpointed block's recomputation, it is kept under ``x`` too, the tensor that the recomputation
        gets again (the call state keeps it under the image slice, which does not outlive this hook)."""
        n = grid[0] * grid[1] * grid[2]
        image = x[:, :n] if self.image_first else x[:, x.shape[1] - n :]
        m = self.call.matching(self.index, grid, image)
        if m is not None and self.call.recompute.find(self.index, image) is m:
            self.call.recompute.keep(self.index, x, m)
        return m

    def post_forward(self, module, output):
        self.state.clear()  # free the indices between calls
        return output
