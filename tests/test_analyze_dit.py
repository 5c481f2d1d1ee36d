"""``tofu-sd analyze`` on diffusion transformers (SD3 / SD3.5, PixArt, Flux): the joint-attention probe against the
models' own attention, the pairs against ``tofu_sd.apply``'s, the analysis of whole pipelines in forward order
with ``blocks``, proposals on blocks whose linearity is known, refusals, the CLI on ``--model tiny-sd3``."""

import json
import zlib

import pytest
import torch
from analyze_probes import Sine, Zero, check_pairs_of_apply, take
from diffusers import (
    DDIMScheduler,
    FlowMatchEulerDiscreteScheduler,
    FluxPipeline,
    PixArtAlphaPipeline,
)
from PIL import Image
from test_dit_common import (
    flux_inputs,
    recording,
    sd3_inputs,
    tiny_flux,
    tiny_pixart,
    tiny_sd3,
)
from test_tiny_sd3_runs import tiny_sd3_folder, tiny_sd3_pipeline  # noqa: F401 - tiny_sd3_folder: a fixture

import tofu_sd
from evaluation import models
from evaluation.analyze import AnalyzeConfig, analyze
from evaluation.cli import main
from evaluation.errors import EvaluationError
from evaluation.linearity import (
    FUNCTIONS,
    TIMESTEP_GROUPS,
    joint_query_attention,
    timestep_group,
)
from evaluation.linearity_plot import short_name
from tofu_sd import TokenFusionConfig
from tofu_sd.families import family_of

pytestmark = pytest.mark.usefixtures("one_thread")  # the fixture is in conftest.py


# --- the joint-attention probe is the models' own attention ------------------------------------------------------


def _attention_call(model, inputs, attn):
    """(args, kwargs, output) of ``attn``'s first call in a model call."""
    with recording({"a": attn}) as given, recording({"a": attn}, "post") as returned, torch.no_grad():
        model(**inputs)
    (args, kwargs), output = given["a"][0], returned["a"][0]
    return {**dict(zip(("hidden_states", "encoder_hidden_states"), args)), **kwargs}, output


def test_joint_query_attention_gives_each_image_token_its_own_output():
    idx = torch.tensor([[3, 40, 7], [0, 47, 11]])
    sd35 = tiny_sd3(num_layers=2, dual_attention_layers=(0,))
    sd35.transformer_blocks[0].attn.norm_q = torch.nn.LayerNorm(8)  # a q/k norm in the path (SD3.5 has RMS)
    inputs = sd3_inputs(sd35)
    for part in ("attn", "attn2"):  # SD3's joint attention (image + text) and SD3.5's second (image only)
        attn = getattr(sd35.transformer_blocks[0], part)
        kwargs, output = _attention_call(sd35, inputs, attn)
        z, text = kwargs["hidden_states"], kwargs.get("encoder_hidden_states")
        assert (text is None) == (part == "attn2")
        image_out = output[0] if isinstance(output, tuple) else output
        with torch.no_grad():
            mine = joint_query_attention(attn, take(z, idx), z, text)
        torch.testing.assert_close(mine, take(image_out, idx), rtol=1e-5, atol=1e-6)
        if text is not None:  # the text tokens' keys and values take part
            with torch.no_grad():
                alone = joint_query_attention(attn, take(z, idx), z, None)
            assert not torch.allclose(alone, mine, atol=1e-4)

    flux = tiny_flux()
    inputs = flux_inputs(flux, h=6, w=4, text=5)
    T = 5
    # Double stream: image hidden states, text as encoder_hidden_states, rotary over [text, image].
    attn = flux.transformer_blocks[0].attn
    kwargs, output = _attention_call(flux, inputs, attn)
    z, text, (cos, sin) = kwargs["hidden_states"], kwargs["encoder_hidden_states"], kwargs["image_rotary_emb"]
    small = idx.clamp(max=z.shape[1] - 1)
    rows = lambda t, pos: take(t.unsqueeze(0).expand(2, -1, -1), pos + T)
    with torch.no_grad():
        mine = joint_query_attention(
            attn, take(z, small), z, text, query_rotary=(rows(cos, small), rows(sin, small)),
            context_rotary=(cos[T:], sin[T:]), added_rotary=(cos[:T], sin[:T]),
        )  # fmt: skip
    torch.testing.assert_close(mine, take(output[0], small), rtol=1e-5, atol=1e-6)
    with torch.no_grad():  # at another position, another output: the rotary embedding matters
        moved = joint_query_attention(
            attn, take(z, small), z, text, query_rotary=(rows(cos, small.flip(-1)), rows(sin, small.flip(-1))),
            context_rotary=(cos[T:], sin[T:]), added_rotary=(cos[:T], sin[:T]),
        )  # fmt: skip
    assert not torch.allclose(moved, mine, atol=1e-4)
    # Single stream: [text, image] as hidden_states, no output projection.
    attn = flux.single_transformer_blocks[1].attn
    kwargs, output = _attention_call(flux, inputs, attn)
    x, (cos, sin) = kwargs["hidden_states"], kwargs["image_rotary_emb"]
    with torch.no_grad():
        mine = joint_query_attention(attn, take(x, small + T), x, query_rotary=(rows(cos, small), rows(sin, small)),
                                     context_rotary=(cos, sin), project_out=False)  # fmt: skip
    torch.testing.assert_close(mine, take(output, small + T), rtol=1e-5, atol=1e-6)


# --- the probes: pairs as apply's, functions as the blocks' ------------------------------------------------------


@pytest.mark.parametrize("build", ["sd3", "sd35", "flux"])
def test_pairs_are_apply_s_and_functions_are_the_blocks_own(build):
    if build == "flux":
        model = tiny_flux()
        inputs = flux_inputs(model, h=6, w=4, text=5, timestep=0.7)  # Flux's [0, 1] timestep, x 1000 for the partition
    else:
        model = tiny_sd3(num_layers=3, dual_attention_layers=(0,) if build == "sd35" else ())
        inputs = sd3_inputs(model, timestep=700.0)
    calls = check_pairs_of_apply(model, inputs)  # the pairs: apply's
    # The functions: f at a pair's destination is the block's real output for that token.
    blocks = {name: model.get_submodule(name) for name in calls}
    modules = {}
    for name, block in blocks.items():
        if hasattr(block, "proj_mlp"):  # Flux single-stream
            modules[f"{name}.attn"], modules[f"{name}.mlp"] = block.attn, block.act_mlp
        else:
            modules[f"{name}.attn"], modules[f"{name}.ff"] = block.attn, block.ff
            if getattr(block, "attn2", None) is not None:
                modules[f"{name}.attn2"] = block.attn2
    with recording(modules, "post") as outputs, torch.no_grad():
        model(**inputs)
    for name, recorded in calls.items():
        functions = [function for function, *_ in recorded]
        dual = getattr(blocks[name], "attn2", None) is not None
        single = hasattr(blocks[name], "proj_mlp")
        if single:  # its MLP branch runs before its attention
            assert functions == ["feed_forward", "self_attention"], (name, functions)
            reals = [outputs[f"{name}.mlp"][0], outputs[f"{name}.attn"][0]]
        else:
            assert functions == ["self_attention"] * (2 if dual else 1) + ["feed_forward"], (name, functions)
            reals = [outputs[f"{name}.attn"][0]] + ([outputs[f"{name}.attn2"][0]] if dual else []) + [outputs[f"{name}.ff"][0]]
        for (function, f, z, (src, dst)), real in zip(recorded, reals):
            real = real[0] if isinstance(real, tuple) else real
            if single:
                real = real[:, 5:]  # the image part of [text, image]
            with torch.no_grad():
                at_dst = f(take(z, dst).unsqueeze(2)).squeeze(2)
            torch.testing.assert_close(at_dst, take(real, dst), rtol=1e-4, atol=1e-5, msg=f"{name} {function}")


# --- whole pipelines ------------------------------------------------------------------------------------------


def _embeds(prompts, tokens, dim):
    """Random text embeddings, a fixed draw per prompt."""
    return torch.stack([torch.randn(tokens, dim, generator=torch.Generator().manual_seed(zlib.crc32(p.encode())))
                        for p in prompts])  # fmt: skip


class _PixArt(PixArtAlphaPipeline):
    """PixArt-alpha with random prompt embeddings (no T5 here) and no resolution binning (a tiny sample size)."""

    def encode_prompt(self, prompt, do_classifier_free_guidance=True, *args, **kwargs):
        prompt = [prompt] if isinstance(prompt, str) else list(prompt)
        dim = self.transformer.config.caption_channels
        mask = torch.ones(len(prompt), 6, dtype=torch.long)
        return _embeds(prompt, 6, dim), mask, _embeds([""] * len(prompt), 6, dim), mask.clone()

    def __call__(self, *args, **kwargs):
        return super().__call__(*args, use_resolution_binning=False, **kwargs)


class _Flux(FluxPipeline):
    """Flux with random prompt embeddings (no CLIP / T5 here)."""

    def encode_prompt(self, prompt, *args, **kwargs):
        prompt = [prompt] if isinstance(prompt, str) else list(prompt)
        config = self.transformer.config
        pooled = _embeds(prompt, 1, config.pooled_projection_dim)[:, 0]
        return _embeds(prompt, 5, config.joint_attention_dim), pooled, torch.zeros(5, 3)


def pixart_pipeline():
    pipe = _PixArt(tokenizer=None, text_encoder=None, vae=None, transformer=tiny_pixart(), scheduler=DDIMScheduler())
    pipe.set_progress_bar_config(disable=True)
    return pipe


def flux_pipeline():
    pipe = _Flux(scheduler=FlowMatchEulerDiscreteScheduler(), vae=None, text_encoder=None, tokenizer=None,
                 text_encoder_2=None, tokenizer_2=None, transformer=tiny_flux())  # fmt: skip
    pipe.set_progress_bar_config(disable=True)
    return pipe


class _Processor:
    """PixArt attn1 replacement, a function of the query only: linear (value then output projection), or sin(w x)."""

    def __init__(self, linear: bool) -> None:
        self.linear = linear

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, **kwargs):
        return attn.to_out[0](attn.to_v(hidden_states)) if self.linear else torch.sin(1e4 * hidden_states)


def _set_linearity(pipe, attention_linear, ff_linear):
    """Give each block a linear or wildly non-linear attention and feed-forward: a zero query (uniform attention:
    a constant, FL 1) or ``sin(1e4 q)``; a linear layer or ``sin(1e4 x)`` (Flux single-stream: its act_mlp)."""
    model = pipe.transformer
    for i, site in enumerate(family_of(model).sites(model)):
        block = site.block
        if site.single_stream:
            block.act_mlp = torch.nn.Identity() if ff_linear[i] else Sine()
        else:
            width = block.ff.net[-1].out_features
            block.ff = torch.nn.Linear(width, width) if ff_linear[i] else Sine()
        for part in site.attentions:
            attn = getattr(block, part)
            if attn.norm_q is None:  # PixArt: as the U-Net's test
                attn.set_processor(_Processor(attention_linear[i]))
            else:
                attn.norm_q = Zero() if attention_linear[i] else Sine()


@pytest.mark.parametrize("kind", ["sd3", "pixart", "flux"])
def test_proposal_on_blocks_whose_linearity_is_known(kind, tmp_path):
    pipe, height = {"sd3": (tiny_sd3_pipeline, None), "pixart": (pixart_pipeline, 96), "flux": (flux_pipeline, 96)}[kind]
    pipe = pipe()
    n = len(family_of(pipe.transformer).sites(pipe.transformer))  # sd3: 3, pixart: 3, flux: 2 + 2
    attention_linear = [i % 2 == 1 for i in range(n)]
    ff_linear = [i % 2 == 0 for i in range(n)]
    _set_linearity(pipe, attention_linear, ff_linear)
    config = AnalyzeConfig(out=str(tmp_path), model="tiny-sd3", classes=[0], steps=2, max_pairs=8, height=height, width=height)
    result = analyze(config, pipe, progress=False)
    assert result["architecture"] == {"sd3": "SD3", "pixart": "PixArt", "flux": "Flux"}[kind]
    for i, block in enumerate(result["blocks"]):
        a, f = (block["fl"][name]["mean"] for name in FUNCTIONS)
        assert a == pytest.approx(1, abs=1e-5) if attention_linear[i] else a < 0.5, (block["name"], a)
        assert f == pytest.approx(1, abs=1e-5) if ff_linear[i] else f < 0.5, (block["name"], f)
    letters = lambda linear: "".join("M" if x else "P" for x in linear)
    assert result["proposed_schedule"] == letters(attention_linear)
    assert result["default_schedule"] == "M" * n  # the DiT families' default
    by_ff = analyze(AnalyzeConfig(**{**config.__dict__, "decision": "feed_forward"}), pipe, progress=False)
    assert by_ff["proposed_schedule"] == letters(ff_linear)


def test_sd3_analysis_counts_blocks_and_apply_kwargs(tmp_path):
    pipe = tiny_sd3_pipeline()
    steps, classes, max_pairs = 2, [0, 1], 8
    config = AnalyzeConfig(out=str(tmp_path / "fl"), model="tiny-sd3", classes=classes, steps=steps, max_pairs=max_pairs)
    result = analyze(config, pipe, progress=False)
    on_disk = json.loads((tmp_path / "fl" / "fl.json").read_text())
    assert on_disk["proposed_schedule"] == result["proposed_schedule"] and on_disk["architecture"] == "SD3"
    with Image.open(tmp_path / "fl" / "fl.png") as image:
        assert image.format == "PNG"
    assert result["config"]["guidance_scale"] == 5.0 and result["config"]["steps"] == 2  # tiny-sd3's guidance
    # Every block, in forward order, as apply patches them; its proposal applies.
    assert [b["name"] for b in result["blocks"]] == [f"transformer_blocks.{i}" for i in range(3)]
    assert [b["index"] for b in result["blocks"]] == [0, 1, 2]
    assert [b["attentions"] for b in result["blocks"]] == [["attn", "attn2"], ["attn"], ["attn"]]
    tofu_sd.apply(pipe, **result["apply_kwargs"])
    assert [b.name for b in tofu_sd.patched_blocks(pipe)] == [b["name"] for b in result["blocks"]]
    assert "".join(b.letter for b in tofu_sd.patched_blocks(pipe)) == result["proposed_schedule"]
    tofu_sd.remove(pipe)
    # Every transformer call is measured: 2 CFG halves x prompts x pairs per attention (block 0 has two).
    pipe.scheduler.set_timesteps(steps)
    groups = [timestep_group(float(t), 1000) for t in pipe.scheduler.timesteps]
    per_call = 2 * len(classes) * max_pairs
    for block in result["blocks"]:
        assert block["tokens"] == 256
        attentions = len(block["attentions"])
        for function, per in (("self_attention", attentions * per_call), ("feed_forward", per_call)):
            stats = block["fl"][function]
            assert stats["count"] == steps * per
            assert 0 < stats["q05"] <= stats["median"] <= stats["q95"] <= 1
            for group in TIMESTEP_GROUPS:
                assert stats["by_timestep"][group]["count"] == groups.count(group) * per
    # blocks: only those, with the default of that many blocks; the proposal applies with the same blocks.
    chosen = analyze(AnalyzeConfig(**{**config.__dict__, "reduction": TokenFusionConfig(blocks="1-2")}), pipe, progress=False)
    assert [b["name"] for b in chosen["blocks"]] == ["transformer_blocks.1", "transformer_blocks.2"]
    assert chosen["default_schedule"] == "MM" and chosen["apply_kwargs"]["blocks"] == "1-2"
    tofu_sd.apply(pipe, **chosen["apply_kwargs"])
    assert [b.name for b in tofu_sd.patched_blocks(pipe)] == ["transformer_blocks.1", "transformer_blocks.2"]
    tofu_sd.remove(pipe)
    every = analyze(AnalyzeConfig(**{**config.__dict__, "all_blocks": True, "reduction": TokenFusionConfig(blocks="1")}),
                    pipe, progress=False)  # fmt: skip
    assert len(every["blocks"]) == 3 and every["apply_kwargs"]["blocks"] is None


def test_flux_timestep_groups_are_scaled(tmp_path):
    pipe = flux_pipeline()
    steps = 3
    result = analyze(AnalyzeConfig(out=str(tmp_path), model="tiny-random", classes=[0], steps=steps, max_pairs=4,
                                   height=96, width=96), pipe, progress=False)  # fmt: skip
    assert [b["name"] for b in result["blocks"]] == [
        "transformer_blocks.0", "transformer_blocks.1", "single_transformer_blocks.0", "single_transformer_blocks.1"
    ]  # fmt: skip
    assert [b["stream"] for b in result["blocks"]] == ["image", "image", "single", "single"]
    # The pipeline's timesteps (its last call's), in [0, 1000]: it passes t / 1000 to the model, which multiplies by 1000.
    groups = [timestep_group(float(t), 1000) for t in pipe.scheduler.timesteps]
    assert len(pipe.scheduler.timesteps) == steps and groups == ["early", "early", "middle"]
    for block in result["blocks"]:
        assert block["tokens"] == 36  # 96 px: a 12 x 12 latent, packed 2 x 2
        for group in TIMESTEP_GROUPS:  # no CFG: one half
            assert block["fl"]["self_attention"]["by_timestep"][group]["count"] == groups.count(group) * 4


def test_dit_analysis_refusals(tmp_path, tiny_pipe_factory):
    pipe = tiny_sd3_pipeline()
    base = dict(out=str(tmp_path), model="tiny-sd3", classes=[0], steps=1)
    for reduction, match in (
        (TokenFusionConfig(max_downsample=2), "only means something for U-Nets"),
        (TokenFusionConfig(blocks="7"), "names block.s. 7, but the model has 3 patchable blocks"),
    ):
        with pytest.raises(EvaluationError, match=match):
            analyze(AnalyzeConfig(**base, reduction=reduction), pipe, progress=False)
    tofu_sd.apply(pipe)
    with pytest.raises(EvaluationError, match="tofu_sd.remove"):
        analyze(AnalyzeConfig(**base), pipe, progress=False)
    tofu_sd.remove(pipe)
    with pytest.raises(EvaluationError, match="--blocks 0 chooses blocks of a diffusion transformer"):
        analyze(AnalyzeConfig(**{**base, "model": "tiny-random"}, reduction=TokenFusionConfig(blocks="0")),
                tiny_pipe_factory(), progress=False)  # fmt: skip
    assert not any(tmp_path.iterdir())


def test_cli_analyze_tiny_sd3(tiny_sd3_folder, tmp_path, capsys, monkeypatch):  # noqa: F811 - the imported fixture
    monkeypatch.setenv(models.TINY_SD3_DIR_ENV, str(tiny_sd3_folder))
    out = tmp_path / "analysis"
    args = ["analyze", "--model", "tiny-sd3", "--classes", "0", "--steps", "2", "--max-pairs", "4", "--quiet", "--device", "cpu"]
    assert main([*args, "--out", str(out)]) == 0
    result = json.loads((out / "fl.json").read_text())
    printed = capsys.readouterr().out
    assert result["config"]["prompts"] == "shapes" and result["config"]["guidance_scale"] == 5.0
    assert "attn FL" in printed and "transformer_blocks.2" in printed
    assert f"proposed schedule: {result['proposed_schedule']} (default MMM, SD3, blocks all)" in printed
    assert f"--model tiny-sd3 --schedule {result['proposed_schedule']} ..." in printed and "--max-downsample" not in printed
    assert main([*args, "--out", str(tmp_path / "b"), "--blocks", "0,2"]) == 0
    printed = capsys.readouterr().out
    assert "(default MM, SD3, blocks 0,2)" in printed and "--blocks 0,2 ..." in printed


def test_short_names_of_transformer_blocks():
    assert short_name("transformer_blocks.3") == "b3" and short_name("single_transformer_blocks.10") == "s10"
    assert short_name("down_blocks.0.attentions.1.transformer_blocks.0") == "down0.1.0"
    assert short_name("mid_block.attentions.0.transformer_blocks.0") == "mid.0.0"
