"""Pure tensor functions of Token Fusion: partition, bipartite soft matching, reduce and restore.

Everything here works on token tensors of shape ``(B, N, C)`` laid out row-major over an ``h x w`` grid
and knows nothing about diffusers, so each piece can be tested on its own against the paper's formulas
(Algorithm 1, Eq. 5-6 and 9-10 of the Token Fusion paper).

The reduced sequence is ``[unmerged source tokens..., destination tokens...]`` (Algorithm 1, line 19).
A :class:`Matching` holds every index the reduce and restore steps need, precomputed once per block call so
that pruned merging is a single gather, average / MLERP merging a gather plus one scatter, and restoring the
full token set a single gather.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

#: Reduction modes, by schedule letter.
MODES = {"P": "prune", "A": "mean", "M": "mlerp"}

_MASK32 = 0xFFFFFFFF


@dataclass(frozen=True)
class Matching:
    """Result of bipartite soft matching for one block call; all indices are ``int64`` on the tokens' device.

    Indices are stored flat over the batch (rows of ``x.reshape(-1, C)``), for ``index_select`` and
    ``index_add_``, which are much faster than ``gather`` / ``scatter`` with an expanded index.

    Attributes:
        keep_rows: ``B * (N - r)`` rows of the tokens that stay, per batch element unmerged sources first,
            then destinations.
        src_rows: ``B * r`` rows of the source tokens that are reduced away.
        dst_rows: for each of those, the row (out of ``B * num_dst``) of the destination it was matched to.
        restore_rows: ``B * N`` rows of the reduced sequence each original token takes its output from.
        num_tokens: N; num_dst: destinations per batch element (the last ``num_dst`` reduced slots).
    """

    keep_rows: torch.Tensor
    src_rows: torch.Tensor
    dst_rows: torch.Tensor
    restore_rows: torch.Tensor
    num_tokens: int
    num_dst: int

    @property
    def batch(self) -> int:
        return self.restore_rows.numel() // self.num_tokens

    @property
    def r(self) -> int:
        """Number of tokens removed per batch element."""
        return self.src_rows.numel() // self.batch

    def _per_batch(self, rows: torch.Tensor, stride: int) -> torch.Tensor:
        return rows.view(self.batch, -1) - torch.arange(self.batch, device=rows.device).unsqueeze(1) * stride

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
        return self._per_batch(self.dst_rows, self.num_dst) + (self.num_tokens - self.r - self.num_dst)

    @property
    def restore_idx(self) -> torch.Tensor:
        """``(B, N)`` reduced-sequence slot each original token takes its output from."""
        return self._per_batch(self.restore_rows, self.num_tokens - self.r)


def _pcg_hash(v):
    """PCG hash (Jarzynski & Olano, 2020) of 32-bit values: an int64 tensor (exact on every device, no overflow)
    or a Python int (on the host, so nothing for torch.compile to break on)."""
    state = (v * 747796405 + 2891336453) & _MASK32
    word = (((state >> ((state >> 28) + 4)) ^ state) * 277803737) & _MASK32
    return (word >> 22) ^ word


def timestep_key(timestep: torch.Tensor | float | int | None, device: torch.device) -> torch.Tensor:
    """A 32-bit integer key for a denoising timestep, computed on ``device`` without a host sync.

    Timesteps are quantized to 1/64, so fractional timesteps of continuous schedulers get distinct keys.
    """
    if timestep is None:
        return torch.zeros((), dtype=torch.int64, device=device)
    t = torch.as_tensor(timestep, device=device).reshape(-1)[0]
    return (t.float() * 64).round().to(torch.int64) & _MASK32


def _tables(h: int, w: int, sx: int, sy: int, device: torch.device):
    # Dynamo traces the builder itself (its cache is a host-side detail); eager calls hit the cache.
    build = _cell_tables.__wrapped__ if torch.compiler.is_compiling() else _cell_tables
    return build(h, w, sx, sy, device)


@functools.lru_cache(maxsize=64)
def _cell_tables(h: int, w: int, sx: int, sy: int, device: torch.device):
    """Static index tables of an ``h x w`` grid in ``sy x sx`` cells, built once per grid and device.

    Returns ``(members, others, leftover, cell_ids)``: the flat positions of each full cell's ``k`` members
    (row-major inside the cell), for each possible destination ``o`` the ``k - 1`` other members, the positions
    in no full cell, and ``0 .. cells - 1`` spread by a large odd constant (the hash's counter).
    """
    cells_h, cells_w, k = h // sy, w // sx, sx * sy
    grid = torch.arange(h * w, device=device).view(h, w)
    members = grid[: cells_h * sy, : cells_w * sx].reshape(cells_h, sy, cells_w, sx).permute(0, 2, 1, 3)
    members = members.reshape(cells_h * cells_w, k)
    # The k - 1 members other than o, in order: member m of the others is m + (m >= o).
    rest = torch.arange(k - 1, device=device).unsqueeze(0)
    others = rest + (rest >= torch.arange(k, device=device).unsqueeze(1)).long()
    leftover = torch.cat([grid[: cells_h * sy, cells_w * sx :].reshape(-1), grid[cells_h * sy :, :].reshape(-1)])
    cell_ids = torch.arange(cells_h * cells_w, device=device) * 0x85EBCA6B
    return members, others, leftover, cell_ids


def cell_offsets(
    cells_h: int, cells_w: int, cell_size: int, seed: int, stream: int, key: torch.Tensor
) -> torch.Tensor:
    """Random destination offsets in ``[0, cell_size)``, one per cell, shape ``(cells_h, cells_w)``.

    A counter-based generator: the offset of a cell is a hash of ``(seed, stream, key, cell index)``. Equal
    arguments give equal offsets on any device, so the two halves of a classifier-free-guidance batch, or
    the conditional and unconditional passes of a loop that runs them separately, share one partition.
    ``stream`` separates blocks; ``key`` is usually :func:`timestep_key`.
    """
    cells = torch.arange(cells_h * cells_w, device=key.device) * 0x85EBCA6B
    return _offsets(seed, stream, key, cells, cell_size).view(cells_h, cells_w)


def _offsets(seed: int, stream: int, key: torch.Tensor, cell_ids: torch.Tensor, cell_size: int) -> torch.Tensor:
    base = _pcg_hash(_pcg_hash(seed & _MASK32) ^ ((stream * 0x9E3779B9) & _MASK32))  # host ints: no device work
    return _pcg_hash((key * 0x27D4EB2F + base + cell_ids) & _MASK32) % cell_size


def partition(
    h: int, w: int, sx: int, sy: int, offsets: torch.Tensor | None = None, device: torch.device | str | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Split the ``h x w`` token grid into destination and source positions.

    Each full ``sy x sx`` cell holds one destination, at ``offsets[i, j]`` (row-major inside the cell; top-left
    when ``offsets`` is ``None``); every other token, including the rows and columns left over when ``h`` or
    ``w`` is not a multiple of ``sy`` or ``sx``, is a source.

    Returns:
        ``(dst_pos, src_pos)``: 1-D ``int64`` tensors of flat positions, ``h // sy * (w // sx)`` destinations
        and the rest sources.
    """
    device = torch.device(offsets.device if offsets is not None else (device or "cpu"))
    members, others, leftover, _ = _tables(h, w, sx, sy, device)
    if offsets is None:
        offsets = torch.zeros(members.shape[0], dtype=torch.int64, device=device)
    offsets = offsets.reshape(-1, 1)
    dst_pos = members.gather(1, offsets).reshape(-1)
    src_pos = torch.cat([members.gather(1, others[offsets[:, 0]]).reshape(-1), leftover])
    return dst_pos, src_pos


def random_partition(
    h: int, w: int, sx: int, sy: int, seed: int, stream: int, key: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`partition` with the offsets of :func:`cell_offsets`, reusing the grid's cached tables."""
    _, _, _, cell_ids = _tables(h, w, sx, sy, key.device)
    return partition(h, w, sx, sy, _offsets(seed, stream, key, cell_ids, sx * sy))


def gather_tokens(x: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """Rows ``rows`` (flat over the batch, ``B * M`` of them) of ``x`` ``(B, N, C)``, as ``(B, M, C)``."""
    B, _, C = x.shape
    return x.reshape(-1, C).index_select(0, rows).view(B, -1, C)


def _flat(idx: torch.Tensor, stride: int) -> torch.Tensor:
    """Per-batch indices ``(B, M)`` into rows of a ``(B * stride, C)`` view."""
    return (idx + torch.arange(idx.shape[0], device=idx.device).unsqueeze(1) * stride).reshape(-1)


@torch.no_grad()
def bipartite_soft_matching(
    metric: torch.Tensor, dst_pos: torch.Tensor, src_pos: torch.Tensor, r: int
) -> Matching | None:
    """Match each source token to its most similar destination (cosine similarity) and keep the ``r`` best edges.

    ``r`` is clamped to the number of source tokens. Each batch element gets its own matching over the shared
    partition. Returns ``None`` when nothing is reduced (``r <= 0`` or no destination).
    """
    B, N, _ = metric.shape
    num_src, num_dst = src_pos.numel(), dst_pos.numel()
    r = min(int(r), num_src)
    if r <= 0 or num_dst == 0:
        return None

    # Cosine similarity; the clamp keeps zero tokens finite (they match anything with score 0).
    a, b = metric[:, src_pos], metric[:, dst_pos]
    for t in (a, b):
        t.div_(torch.linalg.vector_norm(t, dim=-1, keepdim=True, dtype=torch.float32).clamp_min(1e-4).to(t.dtype))
    scores = torch.bmm(a, b.transpose(1, 2).contiguous())  # (B, num_src, num_dst); contiguous rhs: faster on CPU

    node_max, node_idx = scores.max(dim=-1)
    order = node_max.argsort(dim=-1, descending=True)
    merged, unmerged = order[:, :r], order[:, r:]
    num_unm = num_src - r

    src_idx = src_pos[merged]
    dst_idx = node_idx.gather(1, merged)
    keep_idx = torch.cat([src_pos[unmerged], dst_pos.expand(B, num_dst)], dim=1)

    slots = torch.arange(N - r, device=metric.device).expand(B, N - r)
    restore_idx = torch.empty(B, N, dtype=torch.int64, device=metric.device)
    restore_idx.scatter_(1, keep_idx, slots)
    restore_idx.scatter_(1, src_idx, dst_idx + num_unm)
    return Matching(
        keep_rows=_flat(keep_idx, N), src_rows=_flat(src_idx, N), dst_rows=_flat(dst_idx, num_dst),
        restore_rows=_flat(restore_idx, N - r), num_tokens=N, num_dst=num_dst,
    )


def reduce_tokens(x: torch.Tensor, m: Matching, mode: str) -> torch.Tensor:
    """Reduce ``x`` ``(B, N, C)`` to ``(B, N - r, C)`` with ``mode`` ``"prune"``, ``"mean"`` or ``"mlerp"``.

    - ``prune``: the reduced sources are dropped; destinations are unchanged (no gather of sources, no scatter).
    - ``mean``: each destination becomes the mean of its group (itself and the sources matched to it), Eq. 6.
    - ``mlerp``: the group mean, rescaled to the largest norm in the group, Eq. 9-10.

    Merging is computed in at least float32, so half-precision inputs neither overflow nor lose the mean.
    """
    kept = gather_tokens(x, m.keep_rows)
    if mode == "prune":
        return kept
    if mode not in ("mean", "mlerp"):
        raise ValueError(f"unknown reduction mode {mode!r}; expected 'prune', 'mean' or 'mlerp'")

    B, _, C = x.shape
    work = torch.promote_types(x.dtype, torch.float32)
    dst = kept[:, -m.num_dst :].reshape(-1, C).to(work)  # (B * num_dst, C), a copy
    src = x.reshape(-1, C).index_select(0, m.src_rows).to(work)  # (B * r, C)
    ones = torch.ones_like(m.dst_rows, dtype=work)
    count = torch.ones(dst.shape[0], dtype=work, device=dst.device).index_add_(0, m.dst_rows, ones)
    merged = dst.index_add(0, m.dst_rows, src).div_(count.unsqueeze(1))
    if mode == "mlerp":
        merged = _rescale_to_max_norm(merged, dst, src, m.dst_rows, count)
    kept[:, -m.num_dst :] = merged.view(B, m.num_dst, C).to(x.dtype)
    return kept


def _rescale_to_max_norm(
    mean: torch.Tensor, dst: torch.Tensor, src: torch.Tensor, dst_rows: torch.Tensor, count: torch.Tensor
) -> torch.Tensor:
    """MLERP (Eq. 10): ``mean / ||mean|| * max_k ||x_k||`` for groups that received sources; others unchanged.

    The result's norm never exceeds the group's largest norm, and a zero mean stays zero.
    """
    dst_norm = torch.linalg.vector_norm(dst, dim=-1)
    max_norm = dst_norm.scatter_reduce(0, dst_rows, torch.linalg.vector_norm(src, dim=-1), reduce="amax")
    scale = max_norm / torch.linalg.vector_norm(mean, dim=-1).clamp_min(torch.finfo(mean.dtype).tiny)
    return mean * torch.where(count > 1, scale, torch.ones_like(scale)).unsqueeze(-1)


def restore_tokens(y: torch.Tensor, m: Matching) -> torch.Tensor:
    """Unmerge ``y`` ``(B, N - r, C)`` back to ``(B, N, C)``: every reduced source takes its destination's output."""
    return gather_tokens(y, m.restore_rows)
