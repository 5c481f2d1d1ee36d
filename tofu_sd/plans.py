"""Plans: everything about a block call that does not depend on its tokens' values, for all blocks at once.

:func:`plan_blocks` turns the partitions of *all* patched blocks of a U-Net call into flat row indices in one
batched computation per call and grid (not one per block): a :class:`BlockPlan` per block. The constant
tensors that plans are built from (batch offsets, local matching's candidate tables) come from LRU caches,
keyed by shape, dtype and device.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

from .partition import cached, partition_order

#: Local matching groups up to this many cells of a row into one tile that shares its candidate destinations.
MAX_TILE_CELLS = 8


@dataclass(frozen=True)
class LocalTables:
    """Static tables of local matching on one grid (see :func:`_local_tables`)."""

    halo: torch.Tensor  #: ``(tiles * H,)`` the candidate cells of each tile (clamped into the grid)
    halo_cells: torch.Tensor  #: ``(B, tiles, H)`` the same, expanded over the batch (a view)
    bias: torch.Tensor  #: ``(B * tiles, S, H)`` 0 where a tile source may take the candidate, -inf elsewhere
    left_cand: torch.Tensor  #: ``(n_left, K)`` candidate cells of each leftover source (padded by repetition)


@dataclass(frozen=True)
class BlockPlan:
    """Everything about one block call that does not depend on its tokens' values.

    Attributes:
        rows: ``(B, N)`` rows of ``x.reshape(-1, C)`` in partition order, per batch element: sources, then the
            destinations (one per full cell, in cell order).
        num_src: sources per batch element (the first ``num_src`` columns of ``rows``).
        r: tokens removed per batch element (``<= num_src``).
        restore_base: ``(B * N,)`` the reduced row of each destination, at the destination's row (the source
            rows are overwritten by the matching).
        merged_base, unmerged_slots: ``(B, 1)`` and ``(B, num_src - r)``: reduced rows of the first destination
            and of the unmerged sources.
        local_rows: for local matching, ``rows`` regrouped as all batch elements' full-cell sources, then their
            leftover sources, then their destinations; ``None`` for global matching.
        local: the static tables of local matching, or ``None``.
    """

    rows: torch.Tensor
    num_src: int
    r: int
    restore_base: torch.Tensor
    merged_base: torch.Tensor
    unmerged_slots: torch.Tensor
    local_rows: torch.Tensor | None = None
    local: LocalTables | None = None


@functools.lru_cache(maxsize=64)
def slot_constants(batch: int, n: int, num_src: int, num_dst: int, r: int, device: torch.device):
    """Constants of a ``(batch, N, r)`` shape: ``(batch_rows, merged_base, unmerged_slots, dst_values)``.

    ``batch_rows`` ``(B, 1)`` is each batch element's first row in ``x.reshape(-1, C)``; ``merged_base`` and
    ``unmerged_slots`` are as in :class:`BlockPlan`; ``dst_values`` ``(1, B * num_dst)`` the reduced rows of the
    destinations, batch element by batch element. Cached: the tensors must not be modified."""
    kept = n - r
    per_batch = torch.arange(batch, device=device).unsqueeze(1)
    batch_rows = per_batch * n  # (B, 1)
    merged_base = per_batch * kept + (num_src - r)  # (B, 1)
    unmerged_slots = torch.arange(num_src - r, device=device) + per_batch * kept  # (B, num_src - r)
    dst_values = (torch.arange(num_dst, device=device) + per_batch * kept + (num_src - r)).reshape(1, -1)
    return batch_rows, merged_base, unmerged_slots, dst_values


def _tile_width(cells_w: int) -> int:
    return max(t for t in range(1, min(MAX_TILE_CELLS, cells_w) + 1) if cells_w % t == 0)


@functools.lru_cache(maxsize=32)
def _local_tables(
    h: int, w: int, sx: int, sy: int, window: int, batch: int, dtype: torch.dtype, device: torch.device,
    frames: int = 1, st: int = 1,
):  # fmt: skip
    """Candidate destinations of local matching on one grid (``frames x h x w`` in ``st x sy x sx`` cells).

    Sources of full cells are matched in *tiles* of ``T`` consecutive cells of a row (``T`` divides the cells
    per row, at most :data:`MAX_TILE_CELLS`): the tile's ``S = T * (k - 1)`` sources against the ``H =
    window_t * window * (T + window - 1)`` cells around it, one batched matmul for the whole grid. ``bias`` then
    leaves each source only the cells within ``window // 2`` cells of its own in every direction and inside the
    grid. Over frames the window is ``window_t = window`` cells, or 1 when the grid has one row of cells in time
    (an image: then the tables are those of the 2-D grid, bit for bit). Leftover sources (columns, rows and
    frames in no full cell) take the window around the nearest full cell.
    """
    cells_t, cells_h, cells_w, k = frames // st, h // sy, w // sx, st * sx * sy
    rad, window_t = window // 2, window if cells_t > 1 else 1
    rad_t = window_t // 2
    tile = _tile_width(cells_w)
    tiles_w = cells_w // tile
    span = tile + 2 * rad
    # Candidate cell (dt, dy, dx) of tile (tt, ti, tj): cell (tt + dt - rad_t, ti + dy - rad, tj * tile + dx - rad).
    tt, ti, tj, dt, dy, dx = (
        torch.arange(n, device=device).view([-1 if i == d else 1 for i in range(6)])
        for d, n in enumerate((cells_t, cells_h, tiles_w, window_t, window, span))
    )
    ct, ci, cj = tt + dt - rad_t, ti + dy - rad, tj * tile + dx - rad  # (cells_t, cells_h, tiles_w, wt, w, span)
    inside = (ct >= 0) & (ct < cells_t) & (ci >= 0) & (ci < cells_h) & (cj >= 0) & (cj < cells_w)
    cell = (ct.clamp(0, cells_t - 1) * cells_h + ci.clamp(0, cells_h - 1)) * cells_w + cj.clamp(0, cells_w - 1)
    rows = cells_t * cells_h * tiles_w
    halo = cell.reshape(rows, -1)
    # Source s of a tile is in the tile's cell s // (k - 1); candidate column dx is in its window when
    # |dx - rad - s // (k - 1)| <= rad (a tile's cells share their frame and row, so dt and dy always are).
    own = (torch.arange(tile * (k - 1), device=device) // (k - 1)).view(-1, 1)
    in_window = ((dx.reshape(1, -1) - rad - own).abs() <= rad).repeat(1, window_t * window)  # (S, H): (dt, dy, dx)
    allowed = inside.reshape(rows, 1, -1) & in_window.unsqueeze(0)
    bias = torch.zeros(allowed.shape, dtype=dtype, device=device).masked_fill_(~allowed, float("-inf"))
    bias = bias.unsqueeze(0).expand(batch, -1, -1, -1).reshape(-1, *allowed.shape[1:])
    left_cand = _leftover_candidates(h, w, sx, sy, frames, st, rad, rad_t, device)
    halo_cells = halo.unsqueeze(0).expand(batch, -1, -1)
    return LocalTables(halo.reshape(-1), halo_cells, bias, left_cand)


def _leftover_candidates(h, w, sx, sy, frames, st, rad, rad_t, device) -> torch.Tensor:
    """``(n_left, K)`` the candidate cells of each leftover source, in partition order (as
    :func:`~tofu_sd.partition.leftover_positions`, here in plain Python, which ``torch.compile`` takes as constants):
    the window around the nearest full cell, inside the grid, row-major over (frame, row, column), padded by
    repeating the first candidate (a repeated candidate never changes the first maximum)."""
    cells_t, cells_h, cells_w = frames // st, h // sy, w // sx
    size = (2 * rad_t + 1) * (2 * rad + 1) ** 2
    full_t, full_h, full_w = cells_t * st, cells_h * sy, cells_w * sx
    leftover = [(t, y, x) for t in range(full_t) for y in range(full_h) for x in range(full_w, w)]
    leftover += [(t, y, x) for t in range(full_t) for y in range(full_h, h) for x in range(w)]
    leftover += [(t, y, x) for t in range(full_t, frames) for y in range(h) for x in range(w)]
    left_rows = []
    for t, y, x in leftover:
        c = (min(t // st, cells_t - 1), min(y // sy, cells_h - 1), min(x // sx, cells_w - 1))
        cand = [
            (a * cells_h + b) * cells_w + d
            for a in range(c[0] - rad_t, c[0] + rad_t + 1)
            for b in range(c[1] - rad, c[1] + rad + 1)
            for d in range(c[2] - rad, c[2] + rad + 1)
            if 0 <= a < cells_t and 0 <= b < cells_h and 0 <= d < cells_w
        ]
        left_rows.append(cand + cand[:1] * (size - len(cand)))
    return torch.tensor(left_rows, dtype=torch.int64, device=device).reshape(-1, size)


@functools.lru_cache(maxsize=64)
def _local_layout(batch: int, n: int, ncs: int, num_src: int, device: torch.device):
    """Local matching's row layout: every batch element's full-cell sources, then leftover sources, then
    destinations. Returns the partition slot of each of the ``B * N`` rows and its batch offset."""
    slot = torch.arange(n, device=device).expand(batch, n)
    base = (torch.arange(batch, device=device) * n).unsqueeze(1).expand(batch, n)
    parts = [(0, ncs), (ncs, num_src), (num_src, n)]
    slots = torch.cat([slot[:, a:b].reshape(-1) for a, b in parts])
    return slots, torch.cat([base[:, a:b].reshape(-1) for a, b in parts])


def plan_blocks(
    h: int, w: int, sx: int, sy: int, batch: int, r: int, offsets: torch.Tensor | None = None,
    device: torch.device | str | None = None, *, blocks: int = 1, local_window: int | None = None,
    dtype: torch.dtype = torch.float32, frames: int = 1, st: int = 1,
) -> list[BlockPlan]:  # fmt: skip
    """The plans of ``blocks`` block calls on one ``h x w`` grid (``frames x h x w`` in ``st x sy x sx`` cells for
    a video; ``st <= frames``) at once, in a handful of batched operations.

    Args:
        offsets: ``(blocks, cells)`` destination offsets (e.g. :func:`~tofu_sd.partition.block_offsets`);
            ``None``: top-left.
        r: tokens to remove per batch element; clamped to the number of sources.
        local_window: the window side, in cells, for local matching; ``None`` plans global matching.
        dtype: dtype of the tokens to be matched (that of local matching's bias).
    """
    device = torch.device(offsets.device if offsets is not None else (device or "cpu"))
    order, num_src = partition_order(h, w, sx, sy, offsets, device, frames=frames, st=st)
    n, num_dst = frames * h * w, (frames // st) * (h // sy) * (w // sx)
    r = max(0, min(int(r), num_src))
    if order.dim() == 1:
        order = order.expand(blocks, -1)
    batch_rows, merged_base, unmerged_slots, dst_values = cached(
        slot_constants, batch, n, num_src, num_dst, r, device
    )
    rows = order.unsqueeze(1) + batch_rows  # (L, B, N)
    dst_rows = rows[:, :, num_src:].reshape(rows.shape[0], -1)
    restore_base = rows.view(rows.shape[0], -1).scatter(1, dst_rows, dst_values.expand_as(dst_rows))
    local_rows, local = None, None
    if local_window is not None and num_dst > 0 and r > 0:
        local = cached(_local_tables, h, w, sx, sy, local_window, batch, dtype, device, frames, st)
        slots, offsets_of_rows = cached(_local_layout, batch, n, num_dst * (st * sx * sy - 1), num_src, device)
        local_rows = order.index_select(1, slots) + offsets_of_rows
    return [
        BlockPlan(
            rows[i], num_src, r, restore_base[i], merged_base, unmerged_slots,
            None if local_rows is None else local_rows[i], local,
        )  # fmt: skip
        for i in range(rows.shape[0])
    ]
