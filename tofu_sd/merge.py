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

from dataclasses import dataclass

import torch

#: Reduction modes, by schedule letter.
MODES = {"P": "prune", "A": "mean", "M": "mlerp"}

_MASK32 = 0xFFFFFFFF


@dataclass(frozen=True)
class Matching:
    """Result of bipartite soft matching for one block call; all indices are ``int64`` on the tokens' device.

    Attributes:
        keep_idx: ``(B, N - r)`` original positions of the tokens that stay, unmerged sources first, then destinations.
        src_idx: ``(B, r)`` original positions of the source tokens that are reduced away.
        dst_slot: ``(B, r)`` slot, in the reduced sequence, of the destination each reduced source was matched to.
        restore_idx: ``(B, N)`` slot, in the reduced sequence, each original token takes its output from.
        num_dst: number of destination tokens (the last ``num_dst`` slots of the reduced sequence).
    """

    keep_idx: torch.Tensor
    src_idx: torch.Tensor
    dst_slot: torch.Tensor
    restore_idx: torch.Tensor
    num_dst: int

    @property
    def r(self) -> int:
        """Number of tokens removed."""
        return self.src_idx.shape[1]


def _pcg_hash(v: torch.Tensor) -> torch.Tensor:
    """PCG hash (Jarzynski & Olano, 2020) of 32-bit values held in int64: exact on every device, no overflow."""
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


def cell_offsets(
    cells_h: int, cells_w: int, cell_size: int, seed: int, stream: int, key: torch.Tensor
) -> torch.Tensor:
    """Random destination offsets in ``[0, cell_size)``, one per cell, shape ``(cells_h, cells_w)``.

    A counter-based generator: the offset of a cell is a hash of ``(seed, stream, key, cell index)``. Equal
    arguments give equal offsets on any device, so the two halves of a classifier-free-guidance batch, or
    the conditional and unconditional passes of a loop that runs them separately, share one partition.
    ``stream`` separates blocks; ``key`` is usually :func:`timestep_key`.
    """
    base = _pcg_hash(torch.tensor((seed & _MASK32) ^ ((stream * 0x9E3779B9) & _MASK32), dtype=torch.int64))
    base = _pcg_hash((base.to(key.device) + key) & _MASK32)
    cells = torch.arange(cells_h * cells_w, device=key.device, dtype=torch.int64)
    return (_pcg_hash((base + cells * 0x85EBCA6B) & _MASK32) % cell_size).view(cells_h, cells_w)


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
    if offsets is not None:
        device = offsets.device
    cells_h, cells_w, k = h // sy, w // sx, sx * sy
    if offsets is None:
        offsets = torch.zeros(cells_h, cells_w, dtype=torch.int64, device=device)
    row0 = torch.arange(cells_h, device=device)[:, None] * sy
    col0 = torch.arange(cells_w, device=device)[None, :] * sx
    dst_pos = ((row0 + offsets // sx) * w + col0 + offsets % sx).reshape(-1)

    # The k - 1 other members of each cell: member m' of the others is m' + (m' >= offset).
    others = torch.arange(k - 1, device=device)
    members = others + (others >= offsets[..., None]).to(others.dtype)
    src_cells = (row0[..., None] + members // sx) * w + col0[..., None] + members % sx
    grid = torch.arange(h * w, device=device).view(h, w)
    leftover = torch.cat([grid[: cells_h * sy, cells_w * sx :].reshape(-1), grid[cells_h * sy :, :].reshape(-1)])
    src_pos = torch.cat([src_cells.reshape(-1), leftover])
    return dst_pos, src_pos


def gather_tokens(x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """``x[b, idx[b, i], :]`` for ``x`` of shape ``(B, N, C)`` and ``idx`` of shape ``(B, M)``."""
    return x.gather(1, idx.unsqueeze(-1).expand(-1, -1, x.shape[-1]))


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
    norm = torch.linalg.vector_norm(metric, dim=-1, keepdim=True, dtype=torch.float32)
    metric = metric / norm.clamp_min(1e-4).to(metric.dtype)
    scores = metric[:, src_pos] @ metric[:, dst_pos].transpose(-1, -2)  # (B, num_src, num_dst)

    node_max, node_idx = scores.max(dim=-1)
    order = node_max.argsort(dim=-1, descending=True)
    merged, unmerged = order[:, :r], order[:, r:]
    num_unm = num_src - r

    src_idx = src_pos[merged]
    dst_slot = node_idx.gather(1, merged) + num_unm
    keep_idx = torch.cat([src_pos[unmerged], dst_pos.expand(B, num_dst)], dim=1)

    slots = torch.arange(N - r, device=metric.device).expand(B, N - r)
    restore_idx = torch.empty(B, N, dtype=torch.int64, device=metric.device)
    restore_idx.scatter_(1, keep_idx, slots)
    restore_idx.scatter_(1, src_idx, dst_slot)
    return Matching(keep_idx=keep_idx, src_idx=src_idx, dst_slot=dst_slot, restore_idx=restore_idx, num_dst=num_dst)


def reduce_tokens(x: torch.Tensor, m: Matching, mode: str) -> torch.Tensor:
    """Reduce ``x`` ``(B, N, C)`` to ``(B, N - r, C)`` with ``mode`` ``"prune"``, ``"mean"`` or ``"mlerp"``.

    - ``prune``: the reduced sources are dropped; destinations are unchanged (no gather of sources, no scatter).
    - ``mean``: each destination becomes the mean of its group (itself and the sources matched to it), Eq. 6.
    - ``mlerp``: the group mean, rescaled to the largest norm in the group, Eq. 9-10.

    Merging is computed in at least float32, so half-precision inputs neither overflow nor lose the mean.
    """
    kept = gather_tokens(x, m.keep_idx)
    if mode == "prune":
        return kept
    if mode not in ("mean", "mlerp"):
        raise ValueError(f"unknown reduction mode {mode!r}; expected 'prune', 'mean' or 'mlerp'")

    work = torch.promote_types(x.dtype, torch.float32)
    dst = kept[:, -m.num_dst :].to(work)
    src = gather_tokens(x, m.src_idx).to(work)
    dst_idx = m.dst_slot - (kept.shape[1] - m.num_dst)
    merged = dst.scatter_reduce(1, dst_idx.unsqueeze(-1).expand_as(src), src, reduce="mean", include_self=True)
    if mode == "mlerp":
        merged = _rescale_to_max_norm(merged, dst, src, dst_idx)
    kept[:, -m.num_dst :] = merged.to(x.dtype)
    return kept


def _rescale_to_max_norm(
    mean: torch.Tensor, dst: torch.Tensor, src: torch.Tensor, dst_idx: torch.Tensor
) -> torch.Tensor:
    """MLERP (Eq. 10): ``mean / ||mean|| * max_k ||x_k||`` for groups that received sources; others unchanged.

    The result's norm never exceeds the group's largest norm, and a zero mean stays zero.
    """
    dst_norm = torch.linalg.vector_norm(dst, dim=-1)
    max_norm = dst_norm.scatter_reduce(1, dst_idx, torch.linalg.vector_norm(src, dim=-1), reduce="amax")
    scale = max_norm / torch.linalg.vector_norm(mean, dim=-1).clamp_min(torch.finfo(mean.dtype).tiny)
    grew = torch.zeros_like(dst_norm, dtype=torch.bool).scatter_(1, dst_idx, True)
    return mean * torch.where(grew, scale, torch.ones_like(scale)).unsqueeze(-1)


def restore_tokens(y: torch.Tensor, m: Matching) -> torch.Tensor:
    """Unmerge ``y`` ``(B, N - r, C)`` back to ``(B, N, C)``: every reduced source takes its destination's output."""
    return gather_tokens(y, m.restore_idx)
