"""The pure tensor functions against the paper's formulas, with loop-based references written independently."""

import pytest
import torch

from tofu_sd.merge import reduce_tokens, restore_tokens
from tofu_sd.partition import timestep_key
from tofu_sd.reference import bipartite_soft_matching, cell_offsets, partition, random_partition


def _grid_of(pos, w):
    return [(int(p) // w, int(p) % w) for p in pos]


@pytest.mark.parametrize("h,w,sx,sy", [(8, 8, 2, 2), (7, 9, 2, 2), (6, 10, 3, 2), (5, 5, 1, 1), (4, 6, 2, 3)])
def test_partition_one_destination_per_full_cell(h, w, sx, sy):
    g = torch.Generator().manual_seed(0)
    offsets = torch.randint(sx * sy, (h // sy, w // sx), generator=g)
    dst, src = partition(h, w, sx, sy, offsets)
    assert sorted(dst.tolist() + src.tolist()) == list(range(h * w))  # disjoint and complete
    assert dst.numel() == (h // sy) * (w // sx)
    for i, j in _grid_of(dst, w):
        ci, cj = i // sy, j // sx
        assert ci < h // sy and cj < w // sx  # never in the leftover rows / columns
        o = int(offsets[ci, cj])
        assert (i - ci * sy, j - cj * sx) == (o // sx, o % sx)
    cells = {(i // sy, j // sx) for i, j in _grid_of(dst, w)}
    assert len(cells) == dst.numel()


def test_partition_without_offsets_is_top_left():
    dst, _ = partition(5, 7, 2, 2)
    assert _grid_of(dst, 7) == [(i, j) for i in (0, 2) for j in (0, 2, 4)]


def test_cell_offsets_seeded_and_spread():
    key = timestep_key(torch.tensor(981.0), torch.device("cpu"))
    a = cell_offsets(32, 32, 4, seed=0, stream=3, key=key)
    assert a.shape == (32, 32) and a.min() >= 0 and a.max() < 4
    assert torch.equal(a, cell_offsets(32, 32, 4, seed=0, stream=3, key=key))
    for other in (
        cell_offsets(32, 32, 4, seed=1, stream=3, key=key),
        cell_offsets(32, 32, 4, seed=0, stream=4, key=key),
        cell_offsets(32, 32, 4, seed=0, stream=3, key=timestep_key(961, "cpu")),
    ):
        assert (other != a).float().mean() > 0.5
    counts = torch.bincount(a.flatten(), minlength=4).float()
    assert (counts / counts.sum() - 0.25).abs().max() < 0.05  # 1024 draws: uniform within 5 points


def test_random_partition_is_partition_at_seeded_offsets():
    key = timestep_key(torch.tensor(801), "cpu")
    for h, w, sx, sy in [(8, 8, 2, 2), (7, 9, 3, 2)]:
        offsets = cell_offsets(h // sy, w // sx, sx * sy, seed=5, stream=2, key=key)
        expected = partition(h, w, sx, sy, offsets)
        for got, want in zip(random_partition(h, w, sx, sy, seed=5, stream=2, key=key), expected):
            assert torch.equal(got, want)


def test_timestep_key_takes_first_of_batched_timesteps():
    assert timestep_key(torch.tensor([999, 999]), "cpu") == timestep_key(999, "cpu")
    assert timestep_key(999.5, "cpu") != timestep_key(999, "cpu")
    # Integer timesteps of any width get the key of the same float timestep, as int64 (no overflow in the hash).
    for t in (torch.tensor(999, dtype=torch.int32), torch.tensor(999), 999, torch.tensor(999.0)):
        key = timestep_key(t, "cpu")
        assert key.dtype == torch.int64 and key == 999 * 64


def _reference_matching(x, dst, src, r):
    """Bipartite soft matching by loops: best destination per source, the r most similar sources."""
    out = []
    for b in range(x.shape[0]):
        xn = x[b] / x[b].norm(dim=-1, keepdim=True)
        edges = []
        for s in src.tolist():
            sims = [float(xn[s] @ xn[d]) for d in dst.tolist()]
            best = max(range(len(sims)), key=sims.__getitem__)
            edges.append((sims[best], s, dst[best].item()))
        edges.sort(reverse=True)
        out.append({s: d for _, s, d in edges[:r]})
    return out


def _random_case(B=2, h=6, w=6, C=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, h * w, C, generator=g)
    offsets = torch.randint(4, (h // 2, w // 2), generator=g)
    dst, src = partition(h, w, 2, 2, offsets)
    return x, dst, src


def test_matching_equals_loop_reference():
    x, dst, src = _random_case()
    r = 13
    m = bipartite_soft_matching(x, dst, src, r)
    ref = _reference_matching(x, dst, src, r)
    for b in range(x.shape[0]):
        dst_of = {int(p): int(m.keep_idx[b, slot]) for p, slot in zip(m.src_idx[b], m.dst_slot[b])}
        assert dst_of == ref[b]
        assert set(m.keep_idx[b].tolist()) == set(range(x.shape[1])) - set(ref[b])


def test_r_is_clamped_to_sources_and_zero_means_none():
    x, dst, src = _random_case()
    assert bipartite_soft_matching(x, dst, src, 0) is None
    m = bipartite_soft_matching(x, dst, src, 10_000)
    assert m.r == src.numel() and m.keep_idx.shape[1] == dst.numel()


def _groups(m, b):
    """dst position -> list of positions in its group (itself first)."""
    groups = {int(p): [int(p)] for p in m.keep_idx[b, -m.num_dst :]}
    for s, slot in zip(m.src_idx[b].tolist(), m.dst_slot[b].tolist()):
        groups[int(m.keep_idx[b, slot])].append(s)
    return groups


def test_pruned_keeps_destinations_and_unmerged_exactly():
    x, dst, src = _random_case()
    m = bipartite_soft_matching(x, dst, src, 12)
    out = reduce_tokens(x, m, "prune")
    assert out.shape == (2, 36 - 12, 8)
    for b in range(2):
        for slot, pos in enumerate(m.keep_idx[b].tolist()):
            assert torch.equal(out[b, slot], x[b, pos])
        assert not set(m.src_idx[b].tolist()) & set(m.keep_idx[b].tolist())


def test_average_is_scatter_mean_over_group_including_destination():
    x, dst, src = _random_case(seed=1)
    m = bipartite_soft_matching(x, dst, src, 15)
    out = reduce_tokens(x, m, "mean")
    n_unm = out.shape[1] - m.num_dst
    for b in range(2):
        assert torch.equal(out[b, :n_unm], x[b, m.keep_idx[b, :n_unm]])
        for slot in range(n_unm, out.shape[1]):
            group = _groups(m, b)[int(m.keep_idx[b, slot])]
            torch.testing.assert_close(out[b, slot], x[b, group].mean(0))


def test_mlerp_has_mean_direction_and_group_max_norm():
    x, dst, src = _random_case(seed=2)
    x = x * torch.rand(2, 36, 1) * 5  # varied norms
    m = bipartite_soft_matching(x, dst, src, 18)
    out = reduce_tokens(x, m, "mlerp")
    n_unm = out.shape[1] - m.num_dst
    merged_groups = 0
    for b in range(2):
        for slot in range(n_unm, out.shape[1]):
            group = _groups(m, b)[int(m.keep_idx[b, slot])]
            if len(group) == 1:
                assert torch.equal(out[b, slot], x[b, group[0]])  # untouched destination, bit-exact
                continue
            merged_groups += 1
            mean = x[b, group].mean(0)
            expected = mean / mean.norm() * x[b, group].norm(dim=-1).max()  # Eq. 9-10
            torch.testing.assert_close(out[b, slot], expected)
    assert merged_groups > 0


def test_mlerp_zero_norm_and_half_precision_stay_finite():
    x, dst, src = _random_case(seed=3)
    x[:, :, :] = 0
    m = bipartite_soft_matching(x, dst, src, 18)
    assert torch.equal(reduce_tokens(x, m, "mlerp"), torch.zeros(2, 18, 8))
    # Opposite tokens: the mean is zero, so is the result (not NaN).
    y = torch.zeros(1, 4, 2)
    y[0, 0] = torch.tensor([1.0, 0.0])
    y[0, 1] = torch.tensor([-1.0, 0.0])
    m = bipartite_soft_matching(y + torch.tensor([0.0, 1e-3]), *partition(2, 2, 2, 1), 1)
    assert torch.isfinite(reduce_tokens(y, m, "mlerp")).all()
    # fp16 tokens with large values and large groups (sum far beyond fp16 range).
    h = torch.full((1, 64, 16), 3000.0).half()
    h[:, ::4] *= -1
    m = bipartite_soft_matching(h, *partition(8, 8, 2, 2), 48)
    for mode in ("mean", "mlerp"):
        out = reduce_tokens(h, m, mode)
        assert out.dtype == torch.float16 and torch.isfinite(out).all()


def test_restore_gives_each_reduced_source_its_destination_output():
    x, dst, src = _random_case(seed=4)
    m = bipartite_soft_matching(x, dst, src, 16)
    y = torch.arange(20, dtype=torch.float32).view(1, 20, 1).expand(2, 20, 3)  # output = slot id
    full = restore_tokens(y, m)
    assert full.shape == (2, 36, 3)
    for b in range(2):
        slot_of = {int(p): slot for slot, p in enumerate(m.keep_idx[b])}
        for s, d_slot in zip(m.src_idx[b].tolist(), m.dst_slot[b].tolist()):
            slot_of[s] = d_slot
        assert [slot_of[p] for p in range(36)] == full[b, :, 0].long().tolist()


def test_restore_of_reduce_is_identity_on_kept_tokens():
    x, dst, src = _random_case(seed=5)
    m = bipartite_soft_matching(x, dst, src, 9)
    back = restore_tokens(reduce_tokens(x, m, "prune"), m)
    kept = m.keep_idx
    assert torch.equal(back.gather(1, kept[..., None].expand(-1, -1, 8)), x.gather(1, kept[..., None].expand(-1, -1, 8)))


def test_matching_is_deterministic_and_independent_of_the_batch():
    x, dst, src = _random_case(seed=6)
    a, b = bipartite_soft_matching(x, dst, src, 10), bipartite_soft_matching(x, dst, src, 10)
    assert torch.equal(a.restore_idx, b.restore_idx) and torch.equal(a.keep_idx, b.keep_idx)
    alone = bipartite_soft_matching(x[1:], dst, src, 10)  # the second element in a batch of its own
    for name in ("keep_idx", "restore_idx", "src_idx", "dst_idx"):
        assert torch.equal(getattr(alone, name)[0], getattr(a, name)[1]), name


def test_unmerged_sources_pass_through_every_mode_bit_exact():
    """Average and MLERP sum every group by one scatter-add; a group of one must still be its token exactly."""
    x, dst, src = _random_case(seed=7)
    x = x * torch.rand(2, 36, 1) * 7
    m = bipartite_soft_matching(x, dst, src, 11)
    n_unm = 36 - 11 - m.num_dst
    for mode in ("prune", "mean", "mlerp"):
        out = reduce_tokens(x, m, mode)
        for b in range(2):
            assert torch.equal(out[b, :n_unm], x[b, m.keep_idx[b, :n_unm]]), mode
