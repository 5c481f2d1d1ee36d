"""Chunked global matching against the unchunked one (bit for bit), local matching against a loop reference, the
batched per-call partitions against the per-block ones, and local matching through ``tofu_sd.apply``."""

import numpy as np
import pytest
import torch

import tofu_sd
from evaluation.tiny_random import tiny_unet, tiny_unet_inputs
from tofu_sd.merge import MIN_CHUNK_ROWS, chunk_bounds
from tofu_sd.partition import block_offsets, timestep_key
from tofu_sd.plans import plan_blocks
from tofu_sd.reference import (
    bipartite_soft_matching,
    cell_offsets,
    local_bipartite_soft_matching,
    partition,
    random_partition,
)

FIELDS = ("keep_rows", "restore_rows", "ranked_src_rows", "dst_idx")


def _assert_same_matching(a, b):
    for name in FIELDS:
        assert torch.equal(getattr(a, name), getattr(b, name)), name


def _bytes_for_rows(rows, batch, num_dst):
    return rows * batch * num_dst * 4  # float32 scores


# ---------------------------------------------------------------------------------------------- chunking


def test_chunk_bounds_cover_every_row_once_with_no_short_chunk():
    for n in (1, 63, 64, 65, 127, 128, 129, 1000, 3072):
        for per in (1, 64, 100, 512, 10_000):
            bounds = chunk_bounds(n, per)
            assert bounds[0][0] == 0 and bounds[-1][1] == n
            assert all(a[1] == b[0] for a, b in zip(bounds, bounds[1:]))
            if len(bounds) > 1:
                assert min(j - i for i, j in bounds) >= MIN_CHUNK_ROWS
    assert len(chunk_bounds(1000, 100)) == 10 and chunk_bounds(130, 64) == [(0, 64), (64, 130)]


@pytest.mark.parametrize("B,h,w,C", [(2, 32, 32, 16), (1, 31, 27, 8), (3, 24, 40, 32)])
def test_chunked_global_matching_equals_unchunked_exactly(B, h, w, C):
    g = torch.Generator().manual_seed(h * w)
    x = torch.randn(B, h * w, C, generator=g)
    dst, src = random_partition(h, w, 2, 2, 3, 1, timestep_key(700, "cpu"))
    r = src.numel() * 2 // 3
    whole = bipartite_soft_matching(x, dst, src, r, chunk_bytes=1 << 40)
    for rows in (MIN_CHUNK_ROWS, 100, 129, 250):
        assert len(chunk_bounds(src.numel(), rows)) > 1  # really chunked
        chunked = bipartite_soft_matching(x, dst, src, r, chunk_bytes=_bytes_for_rows(rows, B, dst.numel()))
        _assert_same_matching(chunked, whole)
    # The smallest budget still works (chunks of MIN_CHUNK_ROWS rows).
    _assert_same_matching(bipartite_soft_matching(x, dst, src, r, chunk_bytes=1), whole)


def test_chunked_matching_ties_at_chunk_borders():
    """Exact ties, within a row (equal destinations) and between rows on both sides of a chunk border."""
    B, h, w, C = 2, 24, 24, 8
    g = torch.Generator().manual_seed(1)
    x = torch.randn(B, h * w, C, generator=g)
    dst, src = partition(h, w, 2, 2)
    x[:, dst[5]] = x[:, dst[2]]  # destinations 2 and 5 are equal: a source's first best is 2
    x[:, dst[9]] = x[:, dst[2]]
    for s in (MIN_CHUNK_ROWS - 1, MIN_CHUNK_ROWS, 2 * MIN_CHUNK_ROWS - 1, 2 * MIN_CHUNK_ROWS, 3 * MIN_CHUNK_ROWS):
        x[:, src[s]] = x[:, dst[2]] * 2.0  # sources on both sides of the borders tie with each other
    whole = bipartite_soft_matching(x, dst, src, 300, chunk_bytes=1 << 40)
    chunked = bipartite_soft_matching(x, dst, src, 300, chunk_bytes=_bytes_for_rows(MIN_CHUNK_ROWS, B, dst.numel()))
    _assert_same_matching(chunked, whole)
    for b in range(B):
        merged = dict(zip(chunked.src_idx[b].tolist(), chunked.dst_idx[b].tolist()))
        for s in (MIN_CHUNK_ROWS - 1, MIN_CHUNK_ROWS, 2 * MIN_CHUNK_ROWS, 3 * MIN_CHUNK_ROWS):
            assert merged[int(src[s])] == 2  # the first of the equal best destinations


# ---------------------------------------------------------------------------------------------- local matching


def _local_reference(x, h, w, sx, sy, offsets, r, window):
    """Local matching by loops, in float64: for each source, the first most similar destination among the cells
    of the window (row-major) around its cell (the nearest full cell for leftover tokens); the r best edges."""
    cells_h, cells_w = h // sy, w // sx
    dst, src = partition(h, w, sx, sy, offsets)
    dst_of_cell = dst.tolist()  # cell order
    rad = window // 2
    out = []
    for b in range(x.shape[0]):
        xn = x[b].double()
        xn = xn / xn.norm(dim=-1, keepdim=True).clamp_min(1e-4)
        edges = []
        for s in src.tolist():
            cy, cx = min(s // w // sy, cells_h - 1), min(s % w // sx, cells_w - 1)
            best, best_cell = None, None
            for y in range(cy - rad, cy + rad + 1):
                for xx in range(cx - rad, cx + rad + 1):
                    if 0 <= y < cells_h and 0 <= xx < cells_w:
                        sim = float(xn[s] @ xn[dst_of_cell[y * cells_w + xx]])
                        if best is None or sim > best:
                            best, best_cell = sim, y * cells_w + xx
            edges.append((best, s, best_cell))
        edges.sort(key=lambda e: -e[0])
        out.append({s: c for _, s, c in edges[:r]})
    return out


@pytest.mark.parametrize(
    "h,w,sx,sy,window", [(16, 16, 2, 2, 3), (15, 13, 2, 2, 3), (12, 20, 3, 2, 1), (14, 18, 2, 2, 5), (9, 64, 2, 2, 3)]
)
def test_local_matching_equals_loop_reference(h, w, sx, sy, window):
    g = torch.Generator().manual_seed(h + w + window)
    B = 2
    x = torch.randn(B, h * w, 8, generator=g)
    offsets = torch.randint(sx * sy, (h // sy, w // sx), generator=g)
    r = int(h * w * 0.4)
    m = local_bipartite_soft_matching(x, h, w, sx, sy, r, offsets, window=window)
    ref = _local_reference(x, h, w, sx, sy, offsets, r, window)
    for b in range(B):
        assert dict(zip(m.src_idx[b].tolist(), m.dst_idx[b].tolist())) == ref[b]
        assert set(m.keep_idx[b].tolist()) == set(range(h * w)) - set(ref[b])


def test_local_matching_ties_take_the_first_cell_of_the_window():
    h, w = 10, 12
    x = torch.ones(1, h * w, 4)  # every similarity is 1
    m = local_bipartite_soft_matching(x, h, w, 2, 2, 80, window=3)
    cells_w = w // 2
    for s, d in zip(m.src_idx[0].tolist(), m.dst_idx[0].tolist()):
        cy, cx = s // w // 2, s % w // 2
        assert d == max(cy - 1, 0) * cells_w + max(cx - 1, 0)  # top-left cell of the clipped window


def test_local_matching_with_a_window_over_the_whole_grid_is_global():
    g = torch.Generator().manual_seed(5)
    x = torch.randn(2, 12 * 12, 8, generator=g)
    offsets = torch.randint(4, (6, 6), generator=g)
    dst, src = partition(12, 12, 2, 2, offsets)
    local = local_bipartite_soft_matching(x, 12, 12, 2, 2, 60, offsets, window=11)
    glob = bipartite_soft_matching(x, dst, src, 60)
    for b in range(2):
        assert dict(zip(local.src_idx[b].tolist(), local.dst_idx[b].tolist())) == dict(
            zip(glob.src_idx[b].tolist(), glob.dst_idx[b].tolist())
        )


def test_local_matching_merges_only_within_the_window():
    g = torch.Generator().manual_seed(2)
    h = w = 32
    x = torch.randn(2, h * w, 16, generator=g)
    m = local_bipartite_soft_matching(x, h, w, 2, 2, h * w // 2, window=3)
    dst, _ = partition(h, w, 2, 2)
    for b in range(2):
        for s, d in zip(m.src_idx[b].tolist(), m.dst_idx[b].tolist()):
            p = int(dst[d])
            assert abs(s // w // 2 - p // w // 2) <= 1 and abs(s % w // 2 - p % w // 2) <= 1


# ---------------------------------------------------------------------------------------------- per-call plans


def test_batched_plans_equal_per_block_partitions():
    key = timestep_key(torch.tensor(641), "cpu")
    for h, w, sx, sy in [(16, 16, 2, 2), (15, 13, 3, 2)]:
        offsets = block_offsets(h // sy, w // sx, sx * sy, 7, (0, 1, 2, 3), key)
        plans = plan_blocks(h, w, sx, sy, 3, 40, offsets, blocks=4)
        for stream, plan in enumerate(plans):
            assert torch.equal(offsets[stream].view(h // sy, w // sx), cell_offsets(h // sy, w // sx, sx * sy, 7, stream, key))
            dst, src = random_partition(h, w, sx, sy, 7, stream, key)
            expected = torch.cat([src, dst])
            for b in range(3):
                assert torch.equal(plan.rows[b] - b * h * w, expected)


# ---------------------------------------------------------------------------------------------- through apply


def run(unet, **kw):
    with torch.no_grad():
        return unet(**tiny_unet_inputs(unet, **kw)).sample


def test_local_matching_in_the_unet_reduces_like_global_and_removes_exactly(unet_sd15):
    reference = run(unet_sd15)
    tofu_sd.apply(unet_sd15, matching="local")
    state = tofu_sd.get_state(unet_sd15)
    assert state.config.matching == "local" and state.config.local_window == 3
    seen = {}
    attn = unet_sd15.down_blocks[0].attentions[0].transformer_blocks[0].attn1.to_q
    handle = attn.register_forward_pre_hook(lambda _, args: seen.update(n=args[0].shape[1]))
    local = run(unet_sd15)
    handle.remove()
    assert seen["n"] == 256 - 128
    tofu_sd.apply(unet_sd15)
    assert not torch.equal(run(unet_sd15), local)
    tofu_sd.remove(unet_sd15)
    assert torch.equal(run(unet_sd15), reference)


@pytest.mark.parametrize("h,w", [(16, 16), (15, 13)])
def test_local_matching_every_schedule_letter(h, w):
    unet = tiny_unet("sd15")
    outs = {}
    for schedule in ("P", "A", "M"):
        tofu_sd.apply(unet, matching="local", schedule=schedule, sx=2, sy=2)
        outs[schedule] = run(unet, height=h, width=w)
        assert torch.isfinite(outs[schedule]).all()
    assert not torch.allclose(outs["P"], outs["A"]) and not torch.allclose(outs["A"], outs["M"])


def test_local_matching_batch_independence():
    unet = tiny_unet("sd15")
    tofu_sd.apply(unet, matching="local", seed=3)
    inputs = tiny_unet_inputs(unet, batch=3)
    with torch.no_grad():
        together = unet(**inputs).sample
        for i in range(3):
            alone = unet(inputs["sample"][i : i + 1], inputs["timestep"], inputs["encoder_hidden_states"][i : i + 1]).sample
            torch.testing.assert_close(alone[0], together[i], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"matching": "nearby"}, r"matching must be 'global' .* or 'local'"),
        ({"matching": "local", "local_window": 2}, r"local_window must be an odd number"),
        ({"local_window": 0}, r"local_window must be an odd number"),
        ({"local_window": 3.0}, r"local_window must be an int"),
        ({"ratio": "0.5"}, r"ratio must be a real number"),
        ({"ratio": True}, r"ratio must be a real number"),
        ({"ratio": torch.tensor([0.5, 0.5])}, r"ratio must be a real number"),
    ],
)
def test_bad_matching_options_raise_and_leave_the_model_untouched(unet_sd15, kwargs, match):
    tofu_sd.apply(unet_sd15, ratio=0.3)
    before = run(unet_sd15)
    with pytest.raises(ValueError, match=match):
        tofu_sd.apply(unet_sd15, **kwargs)
    assert torch.equal(run(unet_sd15), before)
    assert tofu_sd.get_state(unet_sd15).config.ratio == 0.3


@pytest.mark.parametrize("ratio", [np.float32(0.5), np.float64(0.5), torch.tensor(0.5), torch.tensor([0.5]), 0.5])
def test_ratio_accepts_any_real_number(unet_sd15, ratio):
    tofu_sd.apply(unet_sd15, ratio=ratio)
    config = tofu_sd.get_state(unet_sd15).config
    assert type(config.ratio) is float and config.ratio == 0.5
    out = run(unet_sd15)
    tofu_sd.apply(unet_sd15, ratio=0.5)
    assert torch.equal(run(unet_sd15), out)
