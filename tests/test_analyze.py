"""Functional-linearity analysis (paper Eq. 8): the maths on closed forms, the pairs, the pipeline run, the CLI."""

import json
import math

import numpy as np
import pytest
import torch
from PIL import Image

import tofu_sd
from evaluation.analyze import AnalyzeConfig, analyze, matched_pairs
from evaluation.linearity import (
    DEFAULT_THRESHOLD,
    FUNCTIONS,
    TIMESTEP_GROUPS,
    functional_linearity,
    interpolation_points,
    path_linearity,
    propose_schedule,
    query_attention,
    summarize,
    timestep_group,
)
from evaluation.cli import main
from evaluation.errors import EvaluationError
from tofu_sd import TokenFusionConfig
from evaluation.families import unet_sites
from tofu_sd.families.unet import transformer_block_sites
from tofu_sd.reference import bipartite_soft_matching, cell_offsets, partition

# --- Eq. 8 on closed forms ----------------------------------------------------------------------------------------


def test_interpolation_points_are_the_segment_with_exact_ends():
    x1, x2 = torch.randn(3, 5, dtype=torch.float64), torch.randn(3, 5, dtype=torch.float64)
    points = interpolation_points(x1, x2, 5)
    assert points.shape == (3, 5, 5)
    assert torch.equal(points[:, 0], x1) and torch.equal(points[:, -1], x2)
    for i, t in enumerate((0.0, 0.25, 0.5, 0.75, 1.0)):
        torch.testing.assert_close(points[:, i], (1 - t) * x1 + t * x2)


@pytest.mark.parametrize("num_points", [2, 3, 17, 40])
def test_fl_of_an_affine_function_is_one(num_points):
    g = torch.Generator().manual_seed(0)
    weight, bias = torch.randn(8, 6, generator=g, dtype=torch.float64), torch.randn(6, generator=g, dtype=torch.float64)
    x1, x2 = torch.randn(10, 8, generator=g, dtype=torch.float64), torch.randn(10, 8, generator=g, dtype=torch.float64)
    fl = functional_linearity(lambda x: x @ weight + bias, x1, x2, num_points)
    assert fl.shape == (10,)
    torch.testing.assert_close(fl, torch.ones(10, dtype=torch.float64), rtol=0, atol=1e-12)


def test_fl_of_relu_across_a_corner_is_one_over_sqrt2():
    # X(t) = (1 - 2t, 2t - 1): ReLU's output goes (1, 0) -> (0, 0) -> (0, 1): chord sqrt(2), path length 2.
    x1, x2 = torch.tensor([1.0, -1.0], dtype=torch.float64), torch.tensor([-1.0, 1.0], dtype=torch.float64)
    for odd in (3, 5, 17, 33):  # t = 1/2 is a grid point: exact
        assert functional_linearity(torch.relu, x1, x2, odd).item() == pytest.approx(1 / math.sqrt(2), abs=1e-12)
    for even in (2, 4, 16, 50):  # the segment across t = 1/2 cuts the corner: length 2 - (2 - sqrt(2)) / (P - 1)
        expected = math.sqrt(2) / (2 - (2 - math.sqrt(2)) / (even - 1))
        assert functional_linearity(torch.relu, x1, x2, even).item() == pytest.approx(expected, abs=1e-12)


def test_fl_of_abs_with_an_off_centre_zero():
    # |x| from -1 to 3 goes 1 -> 0 -> 3: chord 2, length 4 (zero at t = 1/4, a grid point of 5, 9, 17 points).
    x1, x2 = torch.tensor([[-1.0]], dtype=torch.float64), torch.tensor([[3.0]], dtype=torch.float64)
    for points in (5, 9, 17):
        assert functional_linearity(torch.abs, x1, x2, points).item() == pytest.approx(0.5, abs=1e-12)


def test_fl_converges_on_a_half_circle():
    # f(x) = (cos pi x, sin pi x) from 0 to 1: a half circle, FL -> chord / arc = 2 / pi. With P points the path
    # has P - 1 chords of 2 sin(pi / (2 (P - 1))) each.
    def f(x):
        return torch.cat([torch.cos(math.pi * x), torch.sin(math.pi * x)], dim=-1)

    x1, x2 = torch.zeros(1, dtype=torch.float64), torch.ones(1, dtype=torch.float64)
    errors = []
    for points in (2, 3, 5, 9, 17, 33, 65, 129):
        fl = functional_linearity(f, x1, x2, points).item()
        assert fl == pytest.approx(1 / ((points - 1) * math.sin(math.pi / (2 * (points - 1)))), abs=1e-12)
        errors.append(fl - 2 / math.pi)
    assert errors[0] == pytest.approx(1 - 2 / math.pi)  # two points: a straight line
    assert all(e > 0 for e in errors) and all(a > b for a, b in zip(errors, errors[1:]))  # an upper bound, falling
    assert errors[4] / (2 / math.pi) < 2e-3  # the default 17 points: within 0.2%
    assert errors[-1] < 2e-5


def test_fl_of_a_constant_path_is_one_and_values_stay_in_range():
    assert path_linearity(torch.ones(2, 5, 3)).tolist() == [1.0, 1.0]
    wiggle = torch.randn(100, 7, 4, generator=torch.Generator().manual_seed(1))
    fl = path_linearity(wiggle)
    assert bool(((fl >= 0) & (fl <= 1)).all()) and fl.max() < 1
    with pytest.raises(ValueError, match="at least 2"):
        interpolation_points(torch.zeros(3), torch.ones(3), 1)


def test_propose_schedule_and_timestep_groups():
    assert propose_schedule([0.5, 0.7071, 0.71, 1.0, None], DEFAULT_THRESHOLD, "PPMMA") == "PPMMA"
    assert propose_schedule([0.9, 0.9], 0.95, "MM") == "PP"
    assert propose_schedule([float("nan")], 0.5, "M") == "M"
    with pytest.raises(ValueError):
        propose_schedule([0.5], 0.5, "PM")
    assert [timestep_group(t, 1000) for t in (999, 667, 666, 334, 333, 0)] == [
        "early", "early", "middle", "middle", "late", "late"
    ]  # fmt: skip


def test_summary_statistics_of_known_values():
    values = np.array([0.2, 0.4, 0.4, 0.6, 1.0])
    stats = summarize(values)
    assert stats["count"] == 5 and stats["mean"] == pytest.approx(0.52)
    assert stats["std"] == pytest.approx(np.sqrt(((values - 0.52) ** 2).mean()))  # population std: 0.2713
    assert stats["median"] == pytest.approx(0.4) and stats["q25"] == pytest.approx(0.4)
    assert stats["q05"] == pytest.approx(0.2 + 0.2 * 0.2) and stats["q95"] == pytest.approx(0.6 + 0.8 * 0.4)
    assert summarize(np.array([]))["std"] is None


# --- the pairs and the attention function are those of the reduction ------------------------------------------


@pytest.mark.parametrize("use_rand", [True, False])
def test_pairs_are_those_the_reduction_merges(use_rand):
    x = torch.randn(2, 6 * 10, 16, generator=torch.Generator().manual_seed(0))
    offsets = cell_offsets(3, 5, 4, seed=3, stream=2, key=torch.tensor(401)) if use_rand else None
    dst_pos, src_pos = partition(6, 10, 2, 2, offsets)
    m = bipartite_soft_matching(x, dst_pos, src_pos, 30)
    src, dst = matched_pairs(m)
    assert src.shape == dst.shape == (2, 30)
    assert set(src.flatten().tolist()) <= set(src_pos.tolist()) and set(dst.flatten().tolist()) <= set(dst_pos.tolist())
    # Restoring gives each reduced source its destination's output: the pair is (source, that destination) ...
    assert torch.equal(m.restore_idx.gather(1, src), m.restore_idx.gather(1, dst))
    # ... and that destination is the source's most similar one (cosine), the pairs in descending similarity.
    unit = torch.nn.functional.normalize(x, dim=-1)
    sims = unit[:, src_pos] @ unit[:, dst_pos].transpose(1, 2)
    for b in range(2):
        best = dst_pos[sims[b].argmax(dim=1)]
        lookup = {int(p): int(d) for p, d in zip(src_pos, best)}
        assert [lookup[int(p)] for p in src[b]] == dst[b].tolist()
        pair_sims = (unit[b, src[b]] * unit[b, dst[b]]).sum(-1)
        assert bool((pair_sims[:-1] >= pair_sims[1:] - 1e-6).all())
        assert pair_sims.min() >= sims[b].max(dim=1).values.sort(descending=True).values[29] - 1e-6


def test_query_attention_gives_each_token_its_own_output(unet_sd15):
    attn = unet_sd15.down_blocks[0].attentions[0].transformer_blocks[0].attn1
    z = torch.randn(2, 64, attn.to_q.in_features, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        full = attn(z)
        picked = query_attention(attn, z[:, [3, 40]], z)
    torch.testing.assert_close(picked, full[:, [3, 40]], rtol=1e-5, atol=1e-6)


# --- the analysis on a whole pipeline -------------------------------------------------------------------------------


class _Processor:
    """attn1 replacement, a function of the query only: linear (value then output projection), or ``sin(w x)``."""

    def __init__(self, linear: bool) -> None:
        self.linear = linear

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, **kwargs):
        if self.linear:
            return attn.to_out[0](attn.to_v(hidden_states))
        return torch.sin(1e4 * hidden_states)


class _Sine(torch.nn.Module):
    def forward(self, x):
        return torch.sin(1e4 * x)


def _patched_sites(pipe):
    return unet_sites(pipe.unet, 1)


@pytest.fixture
def known_pipe(tiny_pipe_factory):
    """Tiny pipeline whose patched blocks 0 and 3 have a wildly non-linear attn1 (the others a linear one), and
    blocks 1 and 2 a non-linear feed-forward (the others a linear one)."""
    pipe = tiny_pipe_factory()
    for i, site in enumerate(_patched_sites(pipe)):
        site.block.attn1.set_processor(_Processor(linear=i not in (0, 3)))
        width = site.block.ff.net[-1].out_features
        site.block.ff = _Sine() if i in (1, 2) else torch.nn.Linear(width, width)
    return pipe


def test_proposal_on_blocks_whose_linearity_is_known(known_pipe, tmp_path):
    config = AnalyzeConfig(out=str(tmp_path / "a"), model="tiny-random", classes=[0], steps=2, max_pairs=8)
    result = analyze(config, known_pipe, progress=False)
    assert result["default_schedule"] == "PPMMM"
    assert result["proposed_schedule"] == "PMMPM"
    attn = [b["fl"]["self_attention"]["mean"] for b in result["blocks"]]
    ff = [b["fl"]["feed_forward"]["mean"] for b in result["blocks"]]
    for i in range(5):
        assert (attn[i] < 0.3) if i in (0, 3) else (attn[i] == pytest.approx(1, abs=1e-5))
        assert (ff[i] < 0.3) if i in (1, 2) else (ff[i] == pytest.approx(1, abs=1e-5))
    by_ff = analyze(AnalyzeConfig(**{**config.__dict__, "decision": "feed_forward"}), known_pipe, progress=False)
    assert by_ff["proposed_schedule"] == "MPPMM"
    either = analyze(AnalyzeConfig(**{**config.__dict__, "decision": "min"}), known_pipe, progress=False)
    assert either["proposed_schedule"] == "PPPPM"
    lenient = analyze(AnalyzeConfig(**{**config.__dict__, "threshold": 0.01}), known_pipe, progress=False)
    assert lenient["proposed_schedule"] == "MMMMM"


def test_analysis_output_counts_groups_and_schedule_apply(tiny_pipe_factory, tmp_path):
    pipe = tiny_pipe_factory()
    steps, classes, max_pairs = 3, [0, 1], 16
    config = AnalyzeConfig(out=str(tmp_path / "fl"), model="tiny-random", classes=classes, steps=steps, max_pairs=max_pairs)
    result = analyze(config, pipe, progress=False)
    on_disk = json.loads((tmp_path / "fl" / "fl.json").read_text())
    assert on_disk["proposed_schedule"] == result["proposed_schedule"]
    with Image.open(tmp_path / "fl" / "fl.png") as image:
        assert image.format == "PNG" and image.size[0] > 400

    # The blocks apply patches, in forward order.
    names = [b["name"] for b in result["blocks"]]
    tofu_sd.apply(pipe, schedule=result["proposed_schedule"])
    assert names == [b.name for b in tofu_sd.patched_blocks(pipe)]
    assert "".join(b.letter for b in tofu_sd.patched_blocks(pipe)) == result["proposed_schedule"]
    tofu_sd.remove(pipe)

    # Every U-Net call is measured: 2 halves (CFG) x prompts x pairs, spread over the scheduler's timesteps.
    pipe.scheduler.set_timesteps(steps)
    groups = [timestep_group(float(t), 1000) for t in pipe.scheduler.timesteps]
    per_call = 2 * len(classes) * max_pairs
    for block in result["blocks"]:
        assert block["tokens"] == 32 * 32
        for function in FUNCTIONS:
            stats = block["fl"][function]
            assert stats["count"] == steps * per_call
            assert 0 < stats["q05"] <= stats["q25"] <= stats["median"] <= stats["q75"] <= stats["q95"] <= 1
            # FL values lie in (0, 1] and vary between pairs: a spread above 0 and at most 0.5, the largest in [0, 1].
            assert 0 < stats["mean"] <= 1 and 0 < stats["std"] <= 0.5
            for group in TIMESTEP_GROUPS:
                assert stats["by_timestep"][group]["count"] == groups.count(group) * per_call
    assert result["method"]["num_points"] == 17 and result["apply_kwargs"]["max_downsample"] == 1


def test_all_blocks_proposal_fits_apply_with_the_reported_max_downsample(tiny_pipe_factory, tmp_path):
    pipe = tiny_pipe_factory()
    config = AnalyzeConfig(out=str(tmp_path), model="tiny-random", classes=[0], steps=1, all_blocks=True, max_pairs=4)
    result = analyze(config, pipe, progress=False)
    every = [s.name for s in transformer_block_sites(pipe.unet)]
    assert [b["name"] for b in result["blocks"]] == every and len(every) == 11
    kwargs = result["apply_kwargs"]
    assert kwargs["max_downsample"] == 4  # 32x32 tokens at the top, 8x8 in the mid block
    tofu_sd.apply(pipe, schedule=result["proposed_schedule"], max_downsample=kwargs["max_downsample"])
    assert [b.name for b in tofu_sd.patched_blocks(pipe)] == every
    assert [b["tokens"] for b in result["blocks"]] == [1024, 1024, 256, 256, 64, 256, 256, 256, 1024, 1024, 1024]


def test_analysis_refuses_a_reduced_model_and_bad_options(tiny_pipe_factory, tmp_path):
    pipe = tofu_sd.apply(tiny_pipe_factory())
    with pytest.raises(EvaluationError, match="tofu_sd.remove"):
        analyze(AnalyzeConfig(out=str(tmp_path), model="tiny-random", classes=[0], steps=1), pipe, progress=False)
    for bad, match in (
        ({"num_points": 1}, "num_points must be an integer >= 2"),
        ({"threshold": 0.0}, r"threshold must be in \(0, 1\]"),
        ({"decision": "mlp"}, "decision must be one of"),
        ({"classes": [48]}, "indices 0-47"),
        ({"reduction": TokenFusionConfig(ratio=0)}, "ratio > 0"),
    ):
        with pytest.raises(EvaluationError, match=match):
            AnalyzeConfig(out=str(tmp_path), model="tiny", **bad)


def test_cli_analyze(tmp_path, capsys):
    out = tmp_path / "analysis"
    args = ["analyze", "--model", "tiny-random", "--classes", "0", "--steps", "2", "--max-pairs", "4", "--quiet"]
    assert main([*args, "--out", str(out)]) == 0
    result = json.loads((out / "fl.json").read_text())
    printed = capsys.readouterr().out
    assert f"proposed schedule: {result['proposed_schedule']}" in printed
    assert f"--schedule {result['proposed_schedule']} --max-downsample 1" in printed
    assert result["config"]["prompts"] == "imagenet" and result["config"]["steps"] == 2
    assert (out / "fl.png").stat().st_size > 0
    assert main([*args, "--out", str(tmp_path / "bad"), "--points", "1"]) == 2
    assert "num_points must be an integer >= 2" in capsys.readouterr().err
