"""The state that Token Fusion's hooks share during a model call: per call, per token grid, per block.

All of it is thread-local: each thread that calls a patched model sees its own timestep, step count, grids and
matchings, so concurrent calls do not mix. :class:`CallState` keeps its per-thread data on a plain object per
thread (:class:`_PerThread`) rather than as attributes of a ``threading.local``: ``torch.compile`` drops writes
to a ``threading.local``'s attributes made in a frame it compiles on its own, and keeps writes to a plain
object. The one exception is :class:`RecomputeStore`, shared by all threads on purpose (see there).
"""

from __future__ import annotations

import threading
import weakref
from typing import Any, Callable

import torch

from .arguments import host_timestep
from .config import TokenFusionConfig
from .merge import Matching, match
from .partition import block_offsets, timestep_key
from .plans import BlockPlan, plan_blocks

#: With ``rematch_every > 1``, matchings are stored for the first this many calls of a step (a conditional and
#: an unconditional call, say, or the two evaluations of a second-order sampler); later calls always match.
MAX_CALLS_PER_STEP = 4


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
        self.keep = False  # whether this call's matchings are kept for a recomputation (gradient checkpointing)


class CallState:
    """What the current model call knows: its timestep, and the plans of all patched blocks, derived once per call
    and grid (the partitions of all blocks in one batched computation, not one per block); with
    ``rematch_every > 1``, also the step count and the matchings stored at the last matching step; and, under
    gradient checkpointing, the matchings that a block's recomputation must take again (:attr:`recompute`)."""

    def __init__(self, config: TokenFusionConfig, num_blocks: int) -> None:
        self.config, self.num_blocks = config, num_blocks
        self.seed = 0 if config.seed is None else config.seed  # `apply` stores 0; a bare config may hold None
        self._thread = _PerThread(_CallData)
        self.recompute = RecomputeStore(num_blocks)
        #: The blocks left unreduced: those a step cache on the model tests (:mod:`tofu_sd.cache_tests`), looked
        #: up at each model call. A property of the model, not of a thread.
        self.untouched: frozenset[int] = frozenset()

    @property
    def timestep(self) -> torch.Tensor | float | None:
        """The timestep of this thread's model call in progress."""
        return self._thread.value.timestep

    @property
    def matchings(self) -> dict[tuple, Matching]:
        """This thread's stored matchings (``rematch_every > 1``)."""
        return self._thread.value.matchings

    def start(self, timestep, keep: bool = False) -> None:
        """Begin a model call at ``timestep``; ``keep``: keep its matchings for a recomputation of its blocks."""
        now = self._thread.value
        now.timestep, now.plans, now.keep = timestep, {}, keep
        now.reusing = now.storing = False
        # Inside a compiled graph the count would be traced state: the graph would branch on it (recompiling at
        # every step); every call matches there instead.
        if self.config.rematch_every > 1 and not torch.compiler.is_compiling():
            self._count_step(now, host_timestep(timestep))

    def finish(self) -> None:
        """End the model call: free its plans (stored matchings stay for the next steps)."""
        now = self._thread.value
        now.timestep, now.plans, now.keep = None, {}, False
        now.reusing = now.storing = False

    def new_pipeline_call(self) -> None:
        """Make this thread's next model call the first step of a new pipeline call (and drop stored matchings)."""
        now = self._thread.value
        now.previous = None
        now.matchings.clear()

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

    def matching(self, index: int, grid: tuple[int, ...], x: torch.Tensor) -> Matching | None:
        """The matching of block ``index`` for tokens ``x`` on a ``grid`` (``(h, w)``, or ``(frames, h, w)``): at
        a reuse step the one stored for the same block, grid, batch, device, dtype and position in the step, else
        a new one (stored)."""
        now = self._thread.value
        grid = grid_3d(grid)
        if not (now.reusing or now.storing):  # rematch_every=1, or a compiled graph: nothing stored to read
            m = match(x, self.plan(index, grid, x))
        else:
            m = self._stored_or_new(now, index, grid, x)
        if now.keep and m is not None:
            self.recompute.keep(index, x, m)
        return m

    def _stored_or_new(self, now: _CallData, index: int, grid: tuple, x: torch.Tensor) -> Matching | None:
        key = (index, grid, x.shape[0], x.device, x.dtype, now.position)
        if now.reusing:
            stored = now.matchings.get(key)
            if stored is not None:
                return stored
        m = match(x, self.plan(index, grid, x))
        if now.storing and m is not None:
            now.matchings[key] = m
        return m

    def plan(self, index: int, grid: tuple[int, int, int], x: torch.Tensor) -> BlockPlan:
        """The plan of block ``index`` on a ``(frames, h, w)`` grid for tokens ``x``, computed with its siblings'.
        Cells span ``st`` frames (``config.st``; at most the grid's frames, 1 if unset)."""
        now = self._thread.value
        batch, device = x.shape[0], x.device
        cache_key = (grid, batch, device, x.dtype)
        plans = now.plans.get(cache_key)
        if plans is None:
            c = self.config
            f, h, w = grid
            st = min(c.st or 1, f)
            offsets = None
            if c.use_rand:
                key = timestep_key(now.timestep, device)
                cells_th, size = f // st * (h // c.sy), st * c.sx * c.sy  # cell rows over frames; tokens per cell
                offsets = block_offsets(cells_th, w // c.sx, size, self.seed, tuple(range(self.num_blocks)), key)
            plans = plan_blocks(
                h, w, c.sx, c.sy, batch, int(f * h * w * c.ratio), offsets, device, blocks=self.num_blocks,
                local_window=c.local_window if c.matching == "local" else None, dtype=x.dtype, frames=f, st=st,
            )  # fmt: skip
            now.plans[cache_key] = plans
        return plans[index]


class RecomputeStore:
    """The matchings of block calls that gradient checkpointing will run again, found by their input tensor.

    A checkpointed block is recomputed during the backward pass, after the model call has ended (its grid and
    timestep are gone), and on accelerators in the autograd engine's thread. To give the same output and save
    the same tensors, the recomputation must reduce with the matching of its original forward. So a model call
    made with gradients and checkpointing on keeps each block's matching here with a weak reference to the
    block's input: the recomputation gets the same tensor object (non-reentrant checkpointing) or a detached
    alias of it (reentrant checkpointing: same storage, shape and strides). An entry lives as long as its input
    does: once the graph that holds the input is freed, it is dropped at the next :meth:`keep`. Shared by all
    threads (the backward may run in another one), behind a lock."""

    def __init__(self, num_blocks: int) -> None:
        self._entries: list[list[tuple[weakref.ref, tuple, Matching]]] = [[] for _ in range(num_blocks)]
        self._lock = threading.Lock()
        self._any = False

    @staticmethod
    def _key(x: torch.Tensor) -> tuple:
        return (x.data_ptr(), tuple(x.shape), x.stride(), x.dtype, x.device)

    def keep(self, index: int, x: torch.Tensor, m: Matching) -> None:
        with self._lock:
            for entries in self._entries:
                entries[:] = [entry for entry in entries if entry[0]() is not None]
            self._entries[index].append((weakref.ref(x), self._key(x), m))
            self._any = True

    def __len__(self) -> int:
        """The number of kept matchings whose input is still alive."""
        with self._lock:
            return sum(entry[0]() is not None for entries in self._entries for entry in entries)

    def find(self, index: int, x: torch.Tensor) -> Matching | None:
        """The matching kept for block ``index``'s call on ``x`` (or an alias of it), or ``None``."""
        if not self._any:  # no lock on the inference path
            return None
        key = self._key(x)
        with self._lock:
            for ref, entry_key, m in reversed(self._entries[index]):
                kept = ref()
                if kept is not None and (kept is x or entry_key == key):
                    return m
        return None


class GridState(threading.local):
    """The token grid ``(height, width)`` (a video's: ``(frames, height, width)``, tokens frame-major) of the module
    call in progress that holds some patched blocks (a U-Net's ``Transformer2DModel``, or a diffusion transformer
    itself), or ``None`` (thread-local)."""

    def __init__(self) -> None:
        self.grid: tuple[int, ...] | None = None


def grid_3d(grid: tuple[int, ...]) -> tuple[int, int, int]:
    """A token grid as ``(frames, height, width)``: an image's ``(height, width)`` is one frame."""
    return (1, *grid) if len(grid) == 2 else tuple(grid)


class BlockState(threading.local):
    """What the hooks of one patched block share during a block call (thread-local).

    Attributes:
        matching: the block's matching (set on the block's input, freed at the block's end).
        reduced: the matching the sub-module call in progress was reduced with (its output is restored with it).
        rows_done: how many batch rows of the block's tokens a batch-chunked feed-forward has taken so far.
        text_len: the number of text tokens in front of the image tokens (single-stream blocks).
        rotary, rotary_text: the rotary tables that the rotary hooks apply, for the image queries and keys (flat
            over the batch) and for the text ones.
    """

    def __init__(self) -> None:
        self.clear()

    def clear(self) -> None:
        self.matching: Matching | None = None
        self.reduced: Matching | None = None
        self.rows_done = 0
        self.text_len: int | None = None
        self.rotary: tuple[torch.Tensor, torch.Tensor] | None = None
        self.rotary_text: tuple[torch.Tensor, torch.Tensor] | None = None
