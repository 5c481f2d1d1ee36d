"""The explicit-partition API, in the style of tomesd: a partition given as destination and source positions.

The plugin itself plans all blocks of a U-Net call at once (:func:`tofu_sd.plans.plan_blocks`); these functions
do the same work for one partition at a time, in the form that the tests' loop-based references (and tomesd's
``bipartite_soft_matching_random2d``) take. They return the same :class:`~tofu_sd.merge.Matching`.
"""

from __future__ import annotations

import torch

from .merge import CHUNK_BYTES, Matching, match
from .partition import block_offsets, partition_order
from .plans import BlockPlan, plan_blocks, slot_constants


def cell_offsets(
    cells_h: int, cells_w: int, cell_size: int, seed: int, stream: int, key: torch.Tensor
) -> torch.Tensor:
    """Random destination offsets in ``[0, cell_size)``, one per cell, shape ``(cells_h, cells_w)``.

    The offsets of one block: row ``stream`` of :func:`~tofu_sd.partition.block_offsets`, as a grid. ``key`` is
    usually :func:`~tofu_sd.partition.timestep_key`.
    """
    return block_offsets(cells_h, cells_w, cell_size, seed, (stream,), key).view(cells_h, cells_w)


def partition(
    h: int, w: int, sx: int, sy: int, offsets: torch.Tensor | None = None, device: torch.device | str | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Split the ``h x w`` token grid into destination and source positions.

    Each full ``sy x sx`` cell holds one destination, at ``offsets[i, j]`` (row-major inside the cell; top-left
    when ``offsets`` is ``None``); every other token, including the rows and columns left over when ``h`` or
    ``w`` is not a multiple of ``sy`` or ``sx``, is a source.

    Returns:
        ``(dst_pos, src_pos)``: 1-D ``int64`` tensors of flat positions, ``h // sy * (w // sx)`` destinations
        (in cell order) and the rest sources (in partition order).
    """
    if offsets is not None:
        offsets = offsets.reshape(1, -1)
    order, num_src = partition_order(h, w, sx, sy, offsets, device)
    order = order.reshape(-1)
    return order[num_src:], order[:num_src]


def random_partition(
    h: int, w: int, sx: int, sy: int, seed: int, stream: int, key: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`partition` with the offsets of :func:`cell_offsets`."""
    return partition(h, w, sx, sy, cell_offsets(h // sy, w // sx, sx * sy, seed, stream, key))


def _explicit_plan(metric: torch.Tensor, dst_pos: torch.Tensor, src_pos: torch.Tensor, r: int) -> BlockPlan:
    """The global-matching plan of ``metric`` ``(B, N, C)`` with the given partition."""
    B, N, _ = metric.shape
    device = metric.device
    num_src, num_dst = src_pos.numel(), dst_pos.numel()
    r = max(0, min(int(r), num_src))
    batch_rows, merged_base, unmerged_slots, dst_values = slot_constants(B, N, num_src, num_dst, r, device)
    rows = torch.cat([src_pos, dst_pos]).to(device).unsqueeze(0) + batch_rows
    restore_base = torch.zeros(B * N, dtype=torch.int64, device=device)
    restore_base[rows[:, num_src:].reshape(-1)] = dst_values.view(-1)
    return BlockPlan(rows, num_src, r, restore_base, merged_base, unmerged_slots)


@torch.no_grad()
def bipartite_soft_matching(
    metric: torch.Tensor, dst_pos: torch.Tensor, src_pos: torch.Tensor, r: int, *, chunk_bytes: int = CHUNK_BYTES
) -> Matching | None:
    """Match each source token to its most similar destination (cosine similarity) and keep the ``r`` best edges.

    Global matching over an explicit partition. ``r`` is clamped to the number of source tokens. Each batch
    element gets its own matching over the shared partition. Returns ``None`` when nothing is reduced (``r <= 0``
    or no destination). The similarities are computed ``chunk_bytes`` at a time (see
    :data:`~tofu_sd.merge.CHUNK_BYTES`).
    """
    return match(metric, _explicit_plan(metric, dst_pos, src_pos, r), chunk_bytes=chunk_bytes)


@torch.no_grad()
def local_bipartite_soft_matching(
    metric: torch.Tensor, h: int, w: int, sx: int, sy: int, r: int, offsets: torch.Tensor | None = None,
    window: int = 3,
) -> Matching | None:  # fmt: skip
    """Local matching on an ``h x w`` grid: each source only against the destinations of the ``window x window``
    cells centred on its own cell (for tokens in no full cell, the nearest full cell), clipped to the grid."""
    B = metric.shape[0]
    if offsets is not None:
        offsets = offsets.reshape(1, -1)
    plan = plan_blocks(h, w, sx, sy, B, r, offsets, metric.device, local_window=window, dtype=metric.dtype)[0]
    return match(metric, plan)
