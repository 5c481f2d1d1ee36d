"""``tofu-sd analyze`` on the newer diffusion-transformer families whose blocks its probes know (Qwen-Image, Wan):
each probe's attention and feed-forward functions against the blocks' own outputs in an unpatched forward, the
whole analysis of a tiny pipeline of each family (``fl.json``, counts, proposals on blocks whose linearity is
known), and the precise refusal of the families it does not know."""

import json

import pytest
import torch
from analyze_probes import Sine, Zero, check_pairs_of_apply, probe_call, take
from PIL import Image
from test_dit_common import qwenimage_inputs, recording, tiny_qwenimage
from test_dit_wan import tiny_wan, wan_inputs

from evaluation.analyze import AnalyzeConfig, analyze
from evaluation.linearity import FUNCTIONS, TIMESTEP_GROUPS, timestep_group
from evaluation.linearity_plot import short_name
from evaluation.tiny_pipelines import qwenimage_pipeline, wan_pipeline
from tofu_sd.families import family_of

pytest.importorskip("diffusers", minversion="0.42.1")  # the processors the probes mirror
pytestmark = pytest.mark.usefixtures("one_thread")  # the fixture is in conftest.py


CASES = {
    # A padding mask on the text (its last two tokens), which the attention must keep.
    "qwenimage": (tiny_qwenimage, lambda m: qwenimage_inputs(m, h=6, w=4, text=5, mask=torch.tensor([[1, 1, 1, 0, 0]] * 2).bool()),
                  "attn", "img_mlp"),
    "wan": (tiny_wan, lambda m: wan_inputs(m, frames=3, h=3, w=4, text=7), "attn1", "ffn"),
}  # fmt: skip


@pytest.mark.parametrize("case", list(CASES))
def test_functions_at_the_destination_are_the_blocks_own_outputs(case):
    """f with every interpolation point equal to the pair's destination token gives that token's real output of
    the block's attention (rotated at its own position, with the text and its mask) and feed-forward."""
    build, make_inputs, attention, feed_forward = CASES[case]
    model = build()
    inputs = make_inputs(model)
    calls, _ = probe_call(model, inputs)
    sites = family_of(model).sites(model)
    modules = {}
    for site in sites:
        modules[f"{site.name}.attn"] = site.block.get_submodule(attention)
        modules[f"{site.name}.ff"] = site.block.get_submodule(feed_forward)
    with recording(modules, "post") as outputs, torch.no_grad():
        model(**inputs)
    for site in sites:
        recorded = calls[site.name]
        assert [function for function, *_ in recorded] == list(FUNCTIONS), site.name
        for (function, f, z, (src, dst)), part in zip(recorded, ("attn", "ff")):
            real = outputs[f"{site.name}.{part}"][0]
            real = real[0] if isinstance(real, tuple) else real  # Qwen-Image's attn: (image, text)
            assert z.shape[1] == real.shape[1] == inputs_tokens(inputs) and not torch.equal(src, dst)
            points = take(z, dst).unsqueeze(2).expand(-1, -1, 3, -1)  # three points, each the destination
            with torch.no_grad():
                at_dst = f(points)
            for p in range(3):
                torch.testing.assert_close(at_dst[:, :, p], take(real, dst), rtol=1e-4, atol=1e-5,
                                           msg=f"{case} {site.name} {function}")  # fmt: skip


@pytest.mark.parametrize("case", list(CASES))
def test_pairs_are_those_apply_merges(case):
    """The pairs are those tofu_sd.apply (default options: Wan's cells over st = 2 frames) merges in the same call,
    each block of the patched model given the input it has in the unpatched one."""
    build, make_inputs, *_ = CASES[case]
    model = build()
    check_pairs_of_apply(model, make_inputs(model))


def inputs_tokens(inputs) -> int:
    """The number of image (video) tokens of a call's inputs."""
    x = inputs["hidden_states"]
    return x.shape[1] if x.ndim == 3 else x.shape[2] * (x.shape[3] // 2) * (x.shape[4] // 2)


# --- whole pipelines ------------------------------------------------------------------------------------------


def _set_linearity(model, attention, feed_forward, attention_linear, ff_linear):
    """A zero query (uniform attention over fixed keys: a constant, FL 1) or ``sin(1e4 q)`` in each block's attention;
    a linear layer or ``sin(1e4 x)`` as its feed-forward."""
    for i, site in enumerate(family_of(model).sites(model)):
        block = site.block
        width = model.config.num_attention_heads * model.config.attention_head_dim
        setattr(block, feed_forward, torch.nn.Linear(width, width) if ff_linear[i] else Sine())
        block.get_submodule(attention).norm_q = Zero() if attention_linear[i] else Sine()


PIPELINES = {
    # 32 px: an 8 x 8 latent packed 2 x 2, 16 tokens; true CFG: two calls per step.
    "Qwen-Image": (qwenimage_pipeline, {"height": 32, "width": 32}, 16, "attn", "img_mlp"),
    # 48 x 32 px, 5 frames: 2 latent frames of 6 x 4, patches 1 x 2 x 2: 2 x 3 x 2 = 12 tokens; CFG: two calls per step.
    "Wan": (wan_pipeline, {"height": 48, "width": 32, "frames": 5}, 12, "attn1", "ffn"),
}  # fmt: skip


@pytest.mark.parametrize("family", list(PIPELINES))
def test_analysis_of_a_tiny_pipeline(family, tmp_path):
    build, size, tokens, attention, feed_forward = PIPELINES[family]
    pipe = build()
    pipe.set_progress_bar_config(disable=True)
    steps, max_pairs = 2, 4
    config = AnalyzeConfig(out=str(tmp_path / "fl"), model="tiny-random", classes=[0], steps=steps, max_pairs=max_pairs,
                           **size)  # fmt: skip
    result = analyze(config, pipe, progress=False)
    on_disk = json.loads((tmp_path / "fl" / "fl.json").read_text())
    assert on_disk["architecture"] == result["architecture"] == family
    assert on_disk["proposed_schedule"] == result["proposed_schedule"]
    assert "rotated at the pair's destination's position" in on_disk["method"]["functions"]["self_attention"]
    with Image.open(tmp_path / "fl" / "fl.png") as image:
        assert image.format == "PNG"
    model = pipe.transformer
    names = [site.name for site in family_of(model).sites(model)]
    assert [b["name"] for b in result["blocks"]] == names and len(names) == 2
    assert result["default_schedule"] == "MM" and set(result["proposed_schedule"]) <= {"P", "M"}
    groups = [timestep_group(float(t), 1000) for t in pipe.scheduler.timesteps]  # the run's (its last call's)
    assert len(groups) == steps
    per_step = 2 * max_pairs  # the conditional and unconditional calls
    for block in result["blocks"]:
        assert block["tokens"] == tokens
        for function in FUNCTIONS:
            stats = block["fl"][function]
            assert stats["count"] == steps * per_step, (block["name"], function)
            assert 0 < stats["q05"] <= stats["median"] <= stats["q95"] <= 1
            for group in TIMESTEP_GROUPS:
                assert stats["by_timestep"][group]["count"] == groups.count(group) * per_step
    # Blocks whose linearity is known: the proposal follows it.
    attention_linear, ff_linear = [True, False], [False, True]
    _set_linearity(model, attention, feed_forward, attention_linear, ff_linear)
    known = analyze(config, pipe, progress=False)
    for i, block in enumerate(known["blocks"]):
        a, f = (block["fl"][name]["mean"] for name in FUNCTIONS)
        assert a == pytest.approx(1, abs=1e-5) if attention_linear[i] else a < 0.5, (block["name"], a)
        assert f == pytest.approx(1, abs=1e-5) if ff_linear[i] else f < 0.5, (block["name"], f)
    assert known["proposed_schedule"] == "MP"


def test_wan_block_names_are_short_in_the_plot():
    assert short_name("blocks.12") == "b12"
