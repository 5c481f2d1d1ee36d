"""Which tokens are destinations: one per ``sy x sx`` cell of the token grid (``st x sy x sx`` over the frames of a
video's ``frames x h x w`` grid), at a seeded random position.

The destination of a cell is chosen by a counter-based generator: a PCG hash of ``(seed, stream, timestep key,
cell index)``. Equal arguments give equal positions on any device, without a random generator's state, so
the two halves of a classifier-free-guidance batch, or a conditional and an unconditional call at the same
timestep, share one partition. ``stream`` separates the patched blocks of a U-Net.

The *partition order* of a grid's ``N`` tokens is: the sources of each full cell in cell order (row-major;
inside a cell the members other than the destination, row-major), then the tokens in no full cell (leftover
columns, then leftover rows, then leftover frames), then the destinations, one per cell in cell order. An image
grid is a video grid of one frame with ``st = 1``: the same order, bit for bit.
"""

from __future__ import annotations

import functools

import torch

_MASK32 = 0xFFFFFFFF


def cached(fn, *args):
    """``fn(*args)`` from its LRU cache in eager mode; under ``torch.compile`` the builder itself is traced.

    ``fn`` is a ``functools.lru_cache``-wrapped builder of constant tensors; callers must not modify what it
    returns (the tensors are shared by every call, and every thread, with the same arguments).
    """
    return fn.__wrapped__(*args) if torch.compiler.is_compiling() else fn(*args)


def _pcg_hash(v):
    """PCG hash (Jarzynski & Olano, 2020) of 32-bit values: an int64 tensor (exact on every device, no overflow)
    or a Python int (on the host, so nothing for torch.compile to break on)."""
    state = (v * 747796405 + 2891336453) & _MASK32
    word = (((state >> ((state >> 28) + 4)) ^ state) * 277803737) & _MASK32
    return (word >> 22) ^ word


def timestep_key(timestep: torch.Tensor | float | int | None, device: torch.device) -> torch.Tensor:
    """An ``int64`` key for a denoising timestep, computed on ``device`` without a host sync; the hash uses its
    low 32 bits.

    Timesteps are quantized to 1/64, so fractional timesteps of continuous schedulers get distinct keys; an
    integer timestep gets the key of the same float (one multiplication instead of a rounding).
    """
    if timestep is None:
        return torch.zeros((), dtype=torch.int64, device=device)
    t = torch.as_tensor(timestep, device=device).reshape(-1)[0]
    if t.is_floating_point():
        return (t.float() * 64).round().to(torch.int64)  # .float() is free for float32 timesteps
    return t.to(torch.int64) * 64  # a no-op cast for int64; int32 timesteps must not overflow in the hash


def _stream_base(seed: int, stream: int) -> int:
    return _pcg_hash(_pcg_hash(seed & _MASK32) ^ ((stream * 0x9E3779B9) & _MASK32))


@functools.lru_cache(maxsize=64)
def _stream_keys(cells: int, seed: int, streams: tuple[int, ...], device: torch.device) -> torch.Tensor:
    """``(len(streams), cells)`` the static part of the hash: one base per stream plus a spread cell counter."""
    bases = torch.tensor([_stream_base(seed, s) for s in streams], dtype=torch.int64, device=device)
    return bases.unsqueeze(1) + torch.arange(cells, device=device) * 0x85EBCA6B


def block_offsets(
    cells_h: int, cells_w: int, cell_size: int, seed: int, streams: tuple[int, ...], key: torch.Tensor
) -> torch.Tensor:
    """Random destination offsets in ``[0, cell_size)`` for several blocks at once: ``(len(streams), cells)``.

    Row ``i`` holds, for each cell in row-major order, the position (row-major inside the cell) of its
    destination in the block of stream ``streams[i]``: a hash of ``(seed, streams[i], key, cell index)``. The
    key (usually :func:`timestep_key`) may be any integer tensor; only its low 32 bits count.
    """
    static = cached(_stream_keys, cells_h * cells_w, seed, tuple(streams), key.device)
    return _pcg_hash((key * 0x27D4EB2F + static) & _MASK32) % cell_size


def leftover_positions(grid: torch.Tensor, sx: int, sy: int, st: int = 1) -> torch.Tensor:
    """The positions of ``grid`` ``(frames, h, w)`` (its flat positions) in no full ``st x sy x sx`` cell, in
    partition order: leftover columns, then leftover rows (of the frames in full cells), then leftover frames."""
    t, h, w = (n // s * s for n, s in zip(grid.shape, (st, sy, sx)))
    return torch.cat([grid[:t, :h, w:].reshape(-1), grid[:t, h:, :].reshape(-1), grid[t:].reshape(-1)])


@functools.lru_cache(maxsize=64)
def _cell_tables(h: int, w: int, sx: int, sy: int, device: torch.device, frames: int = 1, st: int = 1):
    """Static index tables of a ``frames x h x w`` grid in ``st x sy x sx`` cells, built once per grid and device.

    Returns ``(table, cell_of_slot, num_src)``: ``table[i, o]`` is the position at slot ``i`` of the partition
    order when the destination of the slot's cell (``cell_of_slot[i]``) is its member ``o``.
    """
    cells_t, cells_h, cells_w, k = frames // st, h // sy, w // sx, st * sx * sy
    cells = cells_t * cells_h * cells_w
    grid = torch.arange(frames * h * w, device=device).view(frames, h, w)
    members = grid[: cells_t * st, : cells_h * sy, : cells_w * sx].reshape(cells_t, st, cells_h, sy, cells_w, sx)
    members = members.permute(0, 2, 4, 1, 3, 5).reshape(cells, k)
    # The k - 1 members other than o, in order: member m of the others is m + (m >= o).
    rest = torch.arange(k - 1, device=device).unsqueeze(0)
    others = rest + (rest >= torch.arange(k, device=device).unsqueeze(1)).long()  # (k, k - 1)
    leftover = leftover_positions(grid, sx, sy, st)
    src_table = members[:, others].permute(0, 2, 1).reshape(cells * (k - 1), k)
    table = torch.cat([src_table, leftover.unsqueeze(1).expand(-1, k), members])
    cell_ids = torch.arange(cells, device=device)
    cell_of_slot = torch.cat([cell_ids.repeat_interleave(k - 1), torch.zeros_like(leftover), cell_ids])
    return table, cell_of_slot, cells * (k - 1) + leftover.numel()


def partition_order(
    h: int, w: int, sx: int, sy: int, offsets: torch.Tensor | None = None, device: torch.device | str | None = None,
    *, frames: int = 1, st: int = 1,
) -> tuple[torch.Tensor, int]:  # fmt: skip
    """Positions of the ``h x w`` grid (``frames x h x w``: frame-major) in partition order (sources, then
    destinations), and the number of sources.

    ``offsets`` ``(L, cells)`` holds, for each of ``L`` blocks, each full cell's destination (row-major inside
    the cell: over frames, rows, columns); ``None`` puts every destination at its cell's first member. Returns
    ``(order, num_src)`` with ``order`` of shape ``(L, N)``, or ``(N,)`` without offsets.
    """
    device = torch.device(offsets.device if offsets is not None else (device or "cpu"))
    table, cell_of_slot, num_src = cached(_cell_tables, h, w, sx, sy, device, frames, st)
    if offsets is None:
        return table[:, 0], num_src
    if offsets.shape[1] == 0:  # no full cell (a grid thinner than a cell): no destination to place
        return table[:, 0].expand(offsets.shape[0], -1), num_src
    slot_offsets = offsets.index_select(1, cell_of_slot)  # (L, N): the offset of each slot's cell
    order = table.expand(offsets.shape[0], -1, -1).gather(2, slot_offsets.unsqueeze(2)).squeeze(2)
    return order, num_src
