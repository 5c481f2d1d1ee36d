"""Pure tensor functions of Token Fusion: partition, bipartite soft matching, reduce and restore.

Everything here works on token tensors of shape ``(B, N, C)`` laid out row-major over an ``h x w`` grid
and knows nothing about diffusers, so each piece can be tested on its own against the paper's formulas
(Algorithm 1, Eq. 5-6 and 9-10 of the Token Fusion paper).

The work of one block call is split in three:

- :func:`plan_blocks` turns the partitions of *all* patched blocks of a U-Net call into flat row indices at
  once (one batched computation per call, not one per block): a :class:`BlockPlan` per block.
- :func:`match` does bipartite soft matching on a block's input with its plan, either ``global`` (every
  source against every destination, as ToMe; computed in chunks of source rows, so the whole similarity
  matrix is never built and memory is O(N)) or ``local`` (every source against the destinations of the
  ``window x window`` cells around its own cell; O(N) time and memory). Either way the ``r`` best edges are
  chosen over the whole image. It returns a :class:`Matching`.
- :func:`reduce_tokens` and :func:`restore_tokens` apply a matching: pruned merging is one gather, average
  and MLERP merging one scatter-add over all tokens plus a few per-row operations, restoring one gather.

The reduced sequence is ``[unmerged source tokens..., destination tokens...]`` (Algorithm 1, line 19).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

#: Reduction modes, by schedule letter.
MODES = {"P": "prune", "A": "mean", "M": "mlerp"}
#: Matching kinds: every source against every destination, or against the destinations of nearby cells.
MATCHINGS = ("global", "local")

#: Global matching computes the similarity of at most this many bytes of (source, destination) pairs at a time.
CHUNK_BYTES = 32 << 20
#: ... in chunks of at least this many source rows, so that no chunk takes a BLAS path for tiny matrices,
#: which rounds differently (a chunk of 1 to 3 rows does, with MKL); the result equals the unchunked one.
MIN_CHUNK_ROWS = 64
#: Local matching groups up to this many cells of a row into one tile that shares its candidate destinations.
MAX_TILE_CELLS = 8

_MASK32 = 0xFFFFFFFF


def _cached(fn, *args):
    """``fn(*args)`` from its LRU cache in eager mode; under ``torch.compile`` the builder itself is traced."""
    return fn.__wrapped__(*args) if torch.compiler.is_compiling() else fn(*args)


@dataclass(frozen=True)
class Matching:
    """Result of bipartite soft matching for one block call; all indices are ``int64`` on the tokens' device.

    Indices are stored flat over the batch (rows of ``x.reshape(-1, C)``), for ``index_select`` and
    ``index_add_``, which are much faster than ``gather`` / ``scatter`` with an expanded index.

    Attributes:
        keep_rows: ``B * (N - r)`` rows of the tokens that stay, per batch element unmerged sources first,
            then destinations.
        restore_rows: ``B * N`` rows of the reduced sequence each original token takes its output from (its
            own slot, or its destination's); also the group of each token for average and MLERP merging.
        ranked_src_rows: ``(B, num_src)`` rows of the source tokens, most similar first: the first ``r`` are
            reduced away.
        dst_idx: ``(B, r)`` for each reduced source, the index (``0 .. num_dst - 1``) of its destination.
        num_tokens: N; num_dst: destinations per batch element (the last ``num_dst`` reduced slots).
    """

    keep_rows: torch.Tensor
    restore_rows: torch.Tensor
    ranked_src_rows: torch.Tensor
    dst_idx: torch.Tensor
    num_tokens: int
    num_dst: int

    @property
    def batch(self) -> int:
        return self.dst_idx.shape[0]

    @property
    def r(self) -> int:
        """Number of tokens removed per batch element."""
        return self.dst_idx.shape[1]

    @property
    def src_rows(self) -> torch.Tensor:
        """``B * r`` rows of the source tokens that are reduced away."""
        return self.ranked_src_rows[:, : self.r].reshape(-1)

    @property
    def dst_rows(self) -> torch.Tensor:
        """For each of those, the row (out of ``B * num_dst``) of the destination it was matched to."""
        offsets = torch.arange(self.batch, device=self.dst_idx.device).unsqueeze(1) * self.num_dst
        return (self.dst_idx + offsets).reshape(-1)

    def _per_batch(self, rows: torch.Tensor, stride: int) -> torch.Tensor:
        return rows.reshape(self.batch, -1) - torch.arange(self.batch, device=rows.device).unsqueeze(1) * stride

    @property
    def keep_idx(self) -> torch.Tensor:
        """``(B, N - r)`` original positions of the tokens that stay."""
        return self._per_batch(self.keep_rows, self.num_tokens)

    @property
    def src_idx(self) -> torch.Tensor:
        """``(B, r)`` original positions of the reduced sources."""
        return self._per_batch(self.src_rows, self.num_tokens)

    @property
    def dst_slot(self) -> torch.Tensor:
        """``(B, r)`` reduced-sequence slot of the destination each reduced source went to."""
        return self.dst_idx + (self.num_tokens - self.r - self.num_dst)

    @property
    def restore_idx(self) -> torch.Tensor:
        """``(B, N)`` reduced-sequence slot each original token takes its output from."""
        return self._per_batch(self.restore_rows, self.num_tokens - self.r)


# ---------------------------------------------------------------------------------------------------------
# Partition: which tokens are destinations (one per sy x sx cell) and which are sources.


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
def _cell_tables(h: int, w: int, sx: int, sy: int, device: torch.device):
    """Static index tables of an ``h x w`` grid in ``sy x sx`` cells, built once per grid and device.

    Returns ``(table, cell_of_slot, num_src)``. The *partition order* of the ``N`` tokens is: the sources of
    each full cell in cell order (row-major; inside a cell the ``k - 1`` members other than the destination,
    row-major), then the tokens in no full cell (leftover columns, then leftover rows), then the destinations,
    one per cell in cell order. ``table[i, o]`` is the position at slot ``i`` of that order when the
    destination of the slot's cell (``cell_of_slot[i]``) is its member ``o``.
    """
    cells_h, cells_w, k = h // sy, w // sx, sx * sy
    cells = cells_h * cells_w
    grid = torch.arange(h * w, device=device).view(h, w)
    members = grid[: cells_h * sy, : cells_w * sx].reshape(cells_h, sy, cells_w, sx).permute(0, 2, 1, 3)
    members = members.reshape(cells, k)
    # The k - 1 members other than o, in order: member m of the others is m + (m >= o).
    rest = torch.arange(k - 1, device=device).unsqueeze(0)
    others = rest + (rest >= torch.arange(k, device=device).unsqueeze(1)).long()  # (k, k - 1)
    leftover = torch.cat([grid[: cells_h * sy, cells_w * sx :].reshape(-1), grid[cells_h * sy :, :].reshape(-1)])
    src_table = members[:, others].permute(0, 2, 1).reshape(cells * (k - 1), k)
    table = torch.cat([src_table, leftover.unsqueeze(1).expand(-1, k), members])
    cell_ids = torch.arange(cells, device=device)
    cell_of_slot = torch.cat([cell_ids.repeat_interleave(k - 1), torch.zeros_like(leftover), cell_ids])
    return table, cell_of_slot, cells * (k - 1) + leftover.numel()


@functools.lru_cache(maxsize=64)
def _stream_keys(cells: int, seed: int, streams: tuple[int, ...], device: torch.device) -> torch.Tensor:
    """``(len(streams), cells)`` the static part of the hash: one base per stream plus a spread cell counter."""
    bases = torch.tensor([_stream_base(seed, s) for s in streams], dtype=torch.int64, device=device)
    return bases.unsqueeze(1) + torch.arange(cells, device=device) * 0x85EBCA6B


def block_offsets(
    cells_h: int, cells_w: int, cell_size: int, seed: int, streams: tuple[int, ...], key: torch.Tensor
) -> torch.Tensor:
    """Random destination offsets in ``[0, cell_size)`` for several blocks at once: ``(len(streams), cells)``.

    Row ``i`` equals :func:`cell_offsets` with ``stream=streams[i]``, flattened. The key may be any integer
    tensor; only its low 32 bits count.
    """
    static = _cached(_stream_keys, cells_h * cells_w, seed, tuple(streams), key.device)
    return _pcg_hash((key * 0x27D4EB2F + static) & _MASK32) % cell_size


def cell_offsets(
    cells_h: int, cells_w: int, cell_size: int, seed: int, stream: int, key: torch.Tensor
) -> torch.Tensor:
    """Random destination offsets in ``[0, cell_size)``, one per cell, shape ``(cells_h, cells_w)``.

    A counter-based generator: the offset of a cell is a hash of ``(seed, stream, key, cell index)``. Equal
    arguments give equal offsets on any device, so the two halves of a classifier-free-guidance batch, or
    the conditional and unconditional passes of a loop that runs them separately, share one partition.
    ``stream`` separates blocks; ``key`` is usually :func:`timestep_key`.
    """
    return block_offsets(cells_h, cells_w, cell_size, seed, (stream,), key).view(cells_h, cells_w)


def partition_order(
    h: int, w: int, sx: int, sy: int, offsets: torch.Tensor | None = None, device: torch.device | str | None = None
) -> tuple[torch.Tensor, int]:
    """Positions of the ``h x w`` grid in partition order (sources, then destinations), and the number of sources.

    ``offsets`` ``(L, cells)`` holds, for each of ``L`` blocks, each full cell's destination (row-major inside
    the cell); ``None`` puts every destination at its cell's top-left. Returns ``(order, num_src)`` with
    ``order`` of shape ``(L, N)``, or ``(N,)`` without offsets.
    """
    device = torch.device(offsets.device if offsets is not None else (device or "cpu"))
    table, cell_of_slot, num_src = _cached(_cell_tables, h, w, sx, sy, device)
    if offsets is None:
        return table[:, 0], num_src
    slot_offsets = offsets.index_select(1, cell_of_slot)  # (L, N): the offset of each slot's cell
    order = table.expand(offsets.shape[0], -1, -1).gather(2, slot_offsets.unsqueeze(2)).squeeze(2)
    return order, num_src


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


# ---------------------------------------------------------------------------------------------------------
# Plans: the per-block-call index tensors, computed for all blocks of a U-Net call at once.


@dataclass(frozen=True)
class LocalTables:
    """Static tables of local matching on one grid (see :func:`_local_tables`)."""

    tile: int  #: cells per tile (consecutive cells of a row)
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
    grid: tuple[int, int, int, int] = (0, 0, 1, 1)  #: ``(h, w, sx, sy)``


@functools.lru_cache(maxsize=64)
def _slot_constants(batch: int, n: int, num_src: int, num_dst: int, r: int, device: torch.device):
    """Batch offsets and reduced-row constants of a (batch, N, r) shape."""
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
def _local_tables(h: int, w: int, sx: int, sy: int, window: int, batch: int, dtype: torch.dtype, device: torch.device):
    """Candidate destinations of local matching on one grid.

    Sources of full cells are matched in *tiles* of ``T`` consecutive cells of a row (``T`` divides the cells
    per row, at most :data:`MAX_TILE_CELLS`): the tile's ``S = T * (k - 1)`` sources against the ``H =
    window * (T + window - 1)`` cells around it, one batched matmul for the whole grid. ``bias`` then leaves
    each source only the cells within ``window // 2`` cells of its own in both directions and inside the grid.
    Leftover sources (rows and columns in no full cell) take the window around the nearest full cell.
    """
    cells_h, cells_w, k = h // sy, w // sx, sx * sy
    rad = window // 2
    tile = _tile_width(cells_w)
    tiles_w = cells_w // tile
    span = tile + 2 * rad
    # Candidate cell (row dy, column dx) of tile (ti, tj): cell (ti + dy - rad, tj * tile + dx - rad).
    ti = torch.arange(cells_h, device=device).view(-1, 1, 1, 1)
    tj = torch.arange(tiles_w, device=device).view(1, -1, 1, 1)
    dy = torch.arange(window, device=device).view(1, 1, -1, 1)
    dx = torch.arange(span, device=device).view(1, 1, 1, -1)
    ci, cj = ti + dy - rad, tj * tile + dx - rad  # (cells_h, tiles_w, window, span) after broadcasting
    inside = (ci >= 0) & (ci < cells_h) & (cj >= 0) & (cj < cells_w)
    halo = (ci.clamp(0, cells_h - 1) * cells_w + cj.clamp(0, cells_w - 1)).reshape(cells_h * tiles_w, -1)
    # Source s of a tile is in the tile's cell s // (k - 1); candidate column dx is in its window when
    # |dx - rad - s // (k - 1)| <= rad.
    own = (torch.arange(tile * (k - 1), device=device) // (k - 1)).view(-1, 1)
    in_window = ((dx.reshape(1, -1) - rad - own).abs() <= rad).repeat(1, window)  # (S, H): row-major (dy, dx)
    allowed = inside.reshape(cells_h * tiles_w, 1, -1) & in_window.unsqueeze(0)
    bias = torch.zeros(allowed.shape, dtype=dtype, device=device).masked_fill_(~allowed, float("-inf"))
    bias = bias.unsqueeze(0).expand(batch, -1, -1, -1).reshape(-1, *allowed.shape[1:])
    # Leftover sources: the window around the nearest full cell, inside the grid, row-major, padded by
    # repeating the first candidate (a repeated candidate never changes the first maximum).
    left_rows = []
    leftover = [i * w + j for i in range(cells_h * sy) for j in range(cells_w * sx, w)]
    leftover += list(range(cells_h * sy * w, h * w))
    for pos in leftover:
        cy, cx = min(pos // w // sy, cells_h - 1), min(pos % w // sx, cells_w - 1)
        cand = [
            y * cells_w + x
            for y in range(cy - rad, cy + rad + 1)
            for x in range(cx - rad, cx + rad + 1)
            if 0 <= y < cells_h and 0 <= x < cells_w
        ]
        left_rows.append(cand + cand[:1] * (window * window - len(cand)))
    left_cand = torch.tensor(left_rows, dtype=torch.int64, device=device).reshape(-1, window * window)
    halo_cells = halo.unsqueeze(0).expand(batch, -1, -1)
    return LocalTables(tile, halo.reshape(-1), halo_cells, bias, left_cand)


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
    dtype: torch.dtype = torch.float32,
) -> list[BlockPlan]:  # fmt: skip
    """The plans of ``blocks`` block calls on one ``h x w`` grid at once, in a handful of batched operations.

    Args:
        offsets: ``(blocks, cells)`` destination offsets (e.g. :func:`block_offsets`); ``None``: top-left.
        r: tokens to remove per batch element; clamped to the number of sources.
        local_window: the window side, in cells, for local matching; ``None`` plans global matching.
        dtype: dtype of the tokens to be matched (that of local matching's bias).
    """
    device = torch.device(offsets.device if offsets is not None else (device or "cpu"))
    order, num_src = partition_order(h, w, sx, sy, offsets, device)
    n, num_dst = h * w, (h // sy) * (w // sx)
    r = max(0, min(int(r), num_src))
    if order.dim() == 1:
        order = order.expand(blocks, -1)
    batch_rows, merged_base, unmerged_slots, dst_values = _cached(
        _slot_constants, batch, n, num_src, num_dst, r, device
    )
    rows = order.unsqueeze(1) + batch_rows  # (L, B, N)
    dst_rows = rows[:, :, num_src:].reshape(rows.shape[0], -1)
    restore_base = rows.view(rows.shape[0], -1).scatter(1, dst_rows, dst_values.expand_as(dst_rows))
    local_rows, local = None, None
    if local_window is not None and num_dst > 0 and r > 0:
        local = _cached(_local_tables, h, w, sx, sy, local_window, batch, dtype, device)
        slots, offsets_of_rows = _cached(_local_layout, batch, n, num_dst * (sx * sy - 1), num_src, device)
        local_rows = order.index_select(1, slots) + offsets_of_rows
    return [
        BlockPlan(
            rows[i], num_src, r, restore_base[i], merged_base, unmerged_slots,
            None if local_rows is None else local_rows[i], local, (h, w, sx, sy),
        )  # fmt: skip
        for i in range(rows.shape[0])
    ]


# ---------------------------------------------------------------------------------------------------------
# Matching.


def _normalized(xs: torch.Tensor) -> torch.Tensor:
    """``xs`` divided by the norm of its last dimension (computed in float32, clamped so zero rows stay finite)."""
    norm = torch.linalg.vector_norm(xs, dim=-1, keepdim=True, dtype=torch.float32).clamp_min(1e-4)
    return xs / (norm if norm.dtype == xs.dtype else norm.to(xs.dtype))


def chunk_bounds(num_rows: int, rows_per_chunk: int) -> list[tuple[int, int]]:
    """Row ranges of the chunks of global matching: ``rows_per_chunk`` each, none under :data:`MIN_CHUNK_ROWS`
    (a short tail joins the chunk before it) unless there is a single chunk."""
    step = max(MIN_CHUNK_ROWS, rows_per_chunk)
    starts = list(range(0, num_rows, step))
    if len(starts) > 1 and num_rows - starts[-1] < MIN_CHUNK_ROWS:
        starts.pop()
    return list(zip(starts, starts[1:] + [num_rows]))


def _global_scores(metric: torch.Tensor, plan: BlockPlan, chunk_bytes: int):
    B, N = plan.rows.shape
    # The partition is shared by the batch: gather along tokens, whatever the strides of ``metric``.
    xn = _normalized(metric.index_select(1, plan.rows[0]))
    a, b = xn[:, : plan.num_src], xn[:, plan.num_src :]
    bt = b.transpose(1, 2)  # (B, C, num_dst)
    per_row = B * b.shape[1] * xn.element_size()
    bounds = chunk_bounds(plan.num_src, max(1, chunk_bytes // per_row))
    if len(bounds) == 1:
        return torch.bmm(a, bt).max(dim=-1)
    node_max = xn.new_empty(B, plan.num_src)
    node_idx = torch.empty(B, plan.num_src, dtype=torch.int64, device=xn.device)
    for i, j in bounds:  # per source row: max and first argmax over all destinations, as unchunked
        torch.max(torch.bmm(a[:, i:j], bt), dim=-1, out=(node_max[:, i:j], node_idx[:, i:j]))
    return node_max, node_idx


def _local_scores(metric: torch.Tensor, plan: BlockPlan):
    t = plan.local
    B, N = plan.rows.shape
    C = metric.shape[-1]
    num_dst = N - plan.num_src
    ncs = t.bias.shape[0] // B * t.bias.shape[1]  # full-cell sources per batch element
    xn = _normalized(metric.reshape(-1, C).index_select(0, plan.local_rows))
    dst = xn[B * plan.num_src :].view(B, num_dst, C)
    tiles, S, H = t.bias.shape[0] // B, t.bias.shape[1], t.bias.shape[2]
    cand = dst.index_select(1, t.halo).view(B * tiles, H, C)
    scores = torch.baddbmm(t.bias, xn[: B * ncs].view(B * tiles, S, C), cand.transpose(1, 2))
    node_max, best = scores.max(dim=-1)  # (B * tiles, S): first maximum in row-major cell order
    node_idx = t.halo_cells.gather(2, best.view(B, tiles, S)).view(B, ncs)
    node_max = node_max.view(B, ncs)
    n_left = t.left_cand.shape[0]
    if n_left:
        K = t.left_cand.shape[1]
        left = xn[B * ncs : B * plan.num_src].view(B * n_left, 1, C)
        cand = dst.index_select(1, t.left_cand.view(-1)).view(B * n_left, K, C)
        left_max, left_best = torch.bmm(left, cand.transpose(1, 2)).view(B, n_left, K).max(dim=-1)
        left_idx = t.left_cand.expand(B, -1, -1).gather(2, left_best.unsqueeze(2)).squeeze(2)
        node_max, node_idx = torch.cat([node_max, left_max], 1), torch.cat([node_idx, left_idx], 1)
    return node_max, node_idx


@torch.no_grad()
def match(metric: torch.Tensor, plan: BlockPlan, *, chunk_bytes: int = CHUNK_BYTES) -> Matching | None:
    """Bipartite soft matching of ``metric`` ``(B, N, C)`` with a block's plan; ``None`` if nothing is reduced.

    Each source's best destination (cosine similarity; the first one on ties) is searched among all
    destinations (global plan) or those of the cells around it (local plan); the ``r`` sources with the most
    similar best destination over the whole image are reduced.
    """
    B, N = plan.rows.shape
    num_dst = N - plan.num_src
    if plan.r <= 0 or num_dst == 0:
        return None
    if plan.local is not None:
        node_max, node_idx = _local_scores(metric, plan)
    else:
        node_max, node_idx = _global_scores(metric, plan, chunk_bytes)
    order = node_max.argsort(dim=-1, descending=True)
    ranked = plan.rows[:, : plan.num_src].gather(1, order)  # source rows, most similar first
    r = plan.r
    keep_rows = torch.cat([ranked[:, r:], plan.rows[:, plan.num_src :]], dim=1).view(-1)
    dst_idx = node_idx.gather(1, order[:, :r])
    reduced_rows = torch.cat([dst_idx + plan.merged_base, plan.unmerged_slots], dim=1)
    restore_rows = plan.restore_base.scatter(0, ranked.view(-1), reduced_rows.view(-1))
    return Matching(keep_rows, restore_rows, ranked, dst_idx, N, num_dst)


def _explicit_plan(metric: torch.Tensor, dst_pos: torch.Tensor, src_pos: torch.Tensor, r: int) -> BlockPlan:
    B, N, _ = metric.shape
    device = metric.device
    num_src, num_dst = src_pos.numel(), dst_pos.numel()
    r = max(0, min(int(r), num_src))
    batch_rows, merged_base, unmerged_slots, dst_values = _slot_constants(B, N, num_src, num_dst, r, device)
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
    or no destination). The similarities are computed ``chunk_bytes`` at a time (see :data:`CHUNK_BYTES`).
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


# ---------------------------------------------------------------------------------------------------------
# Reduce and restore.


def gather_tokens(x: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """Rows ``rows`` (flat over the batch, ``B * M`` of them) of ``x`` ``(B, N, C)``, as ``(B, M, C)``."""
    B, _, C = x.shape
    return x.reshape(-1, C).index_select(0, rows).view(B, -1, C)


def reduce_tokens(x: torch.Tensor, m: Matching, mode: str) -> torch.Tensor:
    """Reduce ``x`` ``(B, N, C)`` to ``(B, N - r, C)`` with ``mode`` ``"prune"``, ``"mean"`` or ``"mlerp"``.

    - ``prune``: the reduced sources are dropped; destinations are unchanged (one gather).
    - ``mean``: each destination becomes the mean of its group (itself and the sources matched to it), Eq. 6.
    - ``mlerp``: the group mean, rescaled to the largest norm in the group, Eq. 9-10.

    Average and MLERP sum every group with one scatter-add of all tokens into their reduced rows (a group of
    one is its token, bit for bit). They are computed in at least float32, so half-precision inputs neither
    overflow nor lose the mean.
    """
    if mode == "prune":
        return gather_tokens(x, m.keep_rows)
    if mode not in ("mean", "mlerp"):
        raise ValueError(f"unknown reduction mode {mode!r}; expected 'prune', 'mean' or 'mlerp'")
    B, N, C = x.shape
    work = torch.float32 if x.dtype in (torch.float16, torch.bfloat16) else x.dtype
    flat = x.reshape(-1, C)
    if flat.dtype != work:
        flat = flat.to(work)
    kept = N - m.r
    total = flat.new_zeros(B * kept, C).index_add_(0, m.restore_rows, flat)
    if mode == "mean":
        count = torch.ones(B, m.num_dst, dtype=work, device=x.device)
        count.scatter_add_(1, m.dst_idx, torch.ones(m.dst_idx.shape, dtype=work, device=x.device))
        total.view(B, kept, C)[:, kept - m.num_dst :].div_(count.unsqueeze(-1))
    else:
        # MLERP: mean / ||mean|| * max ||x_k|| = sum / ||sum|| * max ||x_k||; for a group of one, scale 1.
        total_norm = torch.linalg.vector_norm(total, dim=-1)
        # Every reduced row receives at least its own token, so without include_self nothing of total_norm stays.
        max_norm = total_norm.scatter_reduce(
            0, m.restore_rows, torch.linalg.vector_norm(flat, dim=-1), "amax", include_self=False
        )
        total.mul_((max_norm / total_norm.clamp_min(1e-12)).unsqueeze(1))
    total = total.view(B, kept, C)
    return total if total.dtype == x.dtype else total.to(x.dtype)


def restore_tokens(y: torch.Tensor, m: Matching) -> torch.Tensor:
    """Unmerge ``y`` ``(B, N - r, C)`` back to ``(B, N, C)``: every reduced source takes its destination's output."""
    return gather_tokens(y, m.restore_rows)
