"""Matching and merging, as a few pure tensor functions: bipartite soft matching, reduce and restore.

Everything here works on token tensors of shape ``(B, N, C)`` laid out row-major over an ``h x w`` grid
and knows nothing about diffusers, so each piece can be tested on its own against the paper's formulas
(Algorithm 1, Eq. 5-6 and 9-10 of the Token Fusion paper). A block call's partition comes as a
:class:`~tofu_sd.plans.BlockPlan` (see :mod:`tofu_sd.plans` and :mod:`tofu_sd.partition`).

- :func:`match` does bipartite soft matching on a block's input with its plan, either ``global`` (every
  source against every destination, as ToMe; computed in chunks of source rows, so the whole similarity
  matrix is never built and memory is O(N)) or ``local`` (every source against the destinations of the
  ``window x window`` cells around its own cell; O(N) time and memory). Either way the ``r`` best edges are
  chosen over the whole image. It returns a :class:`Matching`.
- :func:`reduce_tokens` and :func:`restore_tokens` apply a matching: pruned merging is one gather, average
  and MLERP merging one scatter-add over all tokens plus a few per-row operations, restoring one gather.
  Both are differentiable in the tokens (for training, e.g. LoRA); the matching itself is not.
- :func:`log_size_bias` is proportional attention's logit bias for keys and values made of reduced tokens.

The reduced sequence is ``[unmerged source tokens..., destination tokens...]`` (Algorithm 1, line 19).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .plans import BlockPlan

#: Reduction modes, by schedule letter.
MODES = {"P": "prune", "A": "mean", "M": "mlerp"}
#: Matching kinds: every source against every destination, or against the destinations of nearby cells.
MATCHINGS = ("global", "local")

#: Global matching computes the similarity of at most this many bytes of (source, destination) pairs at a time.
CHUNK_BYTES = 32 << 20
#: ... in chunks of at least this many source rows, so that no chunk takes a BLAS path for tiny matrices,
#: which rounds differently (a chunk of 1 to 3 rows does, with MKL); the result equals the unchunked one.
MIN_CHUNK_ROWS = 64


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


def _normalized(xs: torch.Tensor) -> torch.Tensor:
    """``xs`` divided by the norm of its last dimension (computed in at least float32, clamped so zero rows stay
    finite)."""
    work = torch.promote_types(xs.dtype, torch.float32)  # half precision in float32; float64 stays float64
    norm = torch.linalg.vector_norm(xs, dim=-1, keepdim=True, dtype=work).clamp_min(1e-4)
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
    overflow nor lose the mean. Every mode is differentiable in ``x`` (the matching is held fixed).
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
    total = flat.new_zeros(B * (N - m.r), C).index_add_(0, m.restore_rows, flat)  # the sum of every group
    merged = _group_means(total, m) if mode == "mean" else _mlerp(total, flat, m)
    merged = merged.view(B, N - m.r, C)
    return merged if merged.dtype == x.dtype else merged.to(x.dtype)


def destination_sizes(m: Matching, dtype: torch.dtype) -> torch.Tensor:
    """``(B, num_dst)`` the size of each destination's group: 1 plus the number of sources reduced into it."""
    count = torch.ones(m.batch, m.num_dst, dtype=dtype, device=m.dst_idx.device)
    return count.scatter_add_(1, m.dst_idx, torch.ones(m.dst_idx.shape, dtype=dtype, device=m.dst_idx.device))


def _group_means(total: torch.Tensor, m: Matching) -> torch.Tensor:
    """Group sums ``(B * (N - r), C)`` divided by the group sizes (the destinations' groups; the rest are of one)."""
    B, kept = m.batch, m.num_tokens - m.r
    count = destination_sizes(m, total.dtype)
    # In place is safe for autograd: a division's backward needs only the divisor, a constant here.
    total.view(B, kept, -1)[:, kept - m.num_dst :].div_(count.unsqueeze(-1))
    return total


def log_size_bias(m: Matching, dtype: torch.dtype) -> torch.Tensor:
    """Proportional attention's additive logit bias for keys made of the reduced tokens: ``(B, 1, N - r)``.

    Slot ``j`` of the reduced sequence holds ``log(s_j)``, ``s_j`` the number of original tokens it stands for:
    0 for the unmerged sources (the first ``N - r - num_dst`` slots), ``log(group size)`` for the destinations.
    With it, ``s`` identical keys and values reduced to one give the same attention as the ``s`` tokens.
    Computed in at least float32, returned in ``dtype``; shaped to broadcast over heads and queries in
    diffusers' ``Attention.prepare_attention_mask``.
    """
    sizes = destination_sizes(m, torch.promote_types(dtype, torch.float32))
    unmerged = sizes.new_zeros(m.batch, m.num_tokens - m.r - m.num_dst)
    return torch.cat([unmerged, sizes.log()], dim=1).unsqueeze(1).to(dtype)


def _mlerp(total: torch.Tensor, flat: torch.Tensor, m: Matching) -> torch.Tensor:
    """MLERP of each group from its sum: mean / ||mean|| * max ||x_k|| = sum / ||sum|| * max ||x_k||.

    A group of one keeps its token (scale 1). ``flat`` holds the tokens, ``(B * N, C)``.
    """
    total_norm = torch.linalg.vector_norm(total, dim=-1)
    # Every reduced row receives at least its own token. The -inf start can equal no maximum: amax's backward
    # shares a maximum's gradient among the values equal to it, those of the start included.
    start = torch.full_like(total_norm, float("-inf"))
    norms = torch.linalg.vector_norm(flat, dim=-1)
    max_norm = start.scatter_reduce(0, m.restore_rows, norms, "amax", include_self=False)
    # Out of place: the norm's backward needs ``total`` as it was (and the product has the same bits).
    return total * (max_norm / total_norm.clamp_min(1e-12)).unsqueeze(1)


def restore_tokens(y: torch.Tensor, m: Matching) -> torch.Tensor:
    """Unmerge ``y`` ``(B, N - r, C)`` back to ``(B, N, C)``: every reduced source takes its destination's output."""
    return gather_tokens(y, m.restore_rows)
