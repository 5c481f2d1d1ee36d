"""``tofu-sd analyze`` on Chroma, FLUX.2, Z-Image and Sana (:mod:`evaluation.analyze.dit_families_more`): each
probe's attention and feed-forward functions at the destination against the blocks' own computation in an
unpatched forward (double- and single-stream blocks, with the text in front, Z-Image's rest after the image, the
masks), the pairs against ``tofu_sd.apply``'s, known linearity through the recorder's own FL on a model call, and
the command end to end on saved FLUX.2 and Sana pipelines."""

import json

import pytest
import torch
from analyze_probes import Sine, Zero, check_pairs_of_apply, probe_call, take
from test_dit_chroma import chroma_inputs, tiny_chroma
from test_dit_common import recording
from test_dit_flux2 import flux2_inputs, tiny_flux2
from test_dit_sana import sana_inputs, tiny_sana
from test_dit_zimage import tiny_zimage, zimage_inputs

from evaluation.analyze import AnalyzeConfig
from evaluation.analyze.dit import DiTRecorder, check_analyzable
from evaluation.analyze.probe import fl_statistics
from evaluation.cli import main
from evaluation.errors import EvaluationError
from evaluation.linearity import FUNCTIONS
from evaluation.tiny_pipelines import PIPELINES
from tofu_sd import TokenFusionConfig
from tofu_sd.families import family_of

pytest.importorskip("diffusers", minversion="0.42.1")  # the processors the probes mirror
pytestmark = pytest.mark.usefixtures("one_thread")  # the fixture is in conftest.py

TEXT = 5


def zimage_tokens(inputs):
    """Z-Image's image tokens: the latent's grid over patches of 2."""
    return inputs["x"][0].shape[-2] // 2 * (inputs["x"][0].shape[-1] // 2)


# What each block computes, as the unpatched forward records it: per site, ``(module, kind, image rows)`` for the
# attention and the feed-forward, ``kind`` "post" (the module's output) or "pre" (its input), ``image rows`` taking
# the image tokens' rows (and, for FLUX.2's fused projection, the columns) out of what was recorded.
def chroma_real(site, inputs):
    if not site.single_stream:
        return [("attn", "post", lambda out: out[0]), ("ff", "post", lambda out: out)]
    return [("attn", "post", lambda out: out[:, TEXT:]), ("act_mlp", "post", lambda out: out[:, TEXT:])]


def flux2_real(site, inputs):
    if not site.single_stream:
        return [("attn", "post", lambda out: out[0]), ("ff", "post", lambda out: out)]
    inner = site.block.attn.inner_dim  # to_out's input: [attention, MLP] side by side
    return [("attn.to_out", "pre", lambda given: given[0][0][:, TEXT:, :inner]),
            ("attn.to_out", "pre", lambda given: given[0][0][:, TEXT:, inner:])]  # fmt: skip


def zimage_real(site, inputs):
    n = zimage_tokens(inputs)
    return [("attention", "post", lambda out: out[:, :n]), ("feed_forward", "post", lambda out: out[:, :n])]


def sana_real(site, inputs):
    return [("attn1", "post", lambda out: out)]


def masked_image(inputs):
    inputs["attention_mask"][1, TEXT::2] = 0
    return inputs


CASES = {
    # ChromaPipeline's mask: the last text tokens of one element padded (boolean); as its 0 / 1 floats (added to
    # the logits), with every other image token of one element masked too, so that the image queries' rows differ.
    "chroma": (tiny_chroma, lambda m: chroma_inputs(m, text=TEXT, padding=(2, 0)), chroma_real),
    "chroma-float-mask": (tiny_chroma, lambda m: masked_image(chroma_inputs(m, text=TEXT, padding=(0, 3),
                                                                            dtype=torch.float32)), chroma_real),
    "flux2": (tiny_flux2, lambda m: flux2_inputs(m, text=TEXT), flux2_real),
    # Captions padded to 32 and 64 tokens: the batch padded, with a key mask.
    "zimage": (tiny_zimage, lambda m: zimage_inputs(), zimage_real),
    "sana": (tiny_sana, lambda m: sana_inputs(m), sana_real),
}  # fmt: skip


def real_outputs(model, inputs, sites, real):
    """Per site, the image rows of its attention's and feed-forward's real outputs in an unpatched forward."""
    wanted = {site.name: real(site, inputs) for site in sites}
    modules = {kind: {} for kind in ("pre", "post")}
    for name, parts in wanted.items():
        for module, kind, _ in parts:
            modules[kind][f"{name}.{module}"] = model.get_submodule(f"{name}.{module}")
    with recording(modules["pre"], "pre") as given, recording(modules["post"], "post") as returned, torch.no_grad():
        model(**inputs)
    seen = {**given, **returned}
    return {name: [rows(seen[f"{name}.{module}"][0]) for module, _, rows in parts] for name, parts in wanted.items()}


@pytest.mark.parametrize("case", list(CASES))
def test_functions_at_the_destination_are_the_blocks_own_outputs(case):
    """f with every interpolation point equal to the pair's destination token gives that token's real output of
    the block's attention (rotated at its own position, against the text or rest and under the mask) and of its
    feed-forward (Sana: none measured), in double- and single-stream blocks."""
    build, make_inputs, real = CASES[case]
    model = build()
    inputs = make_inputs(model)
    calls, _ = probe_call(model, inputs)
    sites = family_of(model).sites(model)
    outputs = real_outputs(model, inputs, sites, real)
    assert {site.single_stream for site in sites} == ({False, True} if "chroma" in case or case == "flux2" else
                                                      {case == "zimage"})  # fmt: skip
    for site in sites:
        recorded = calls[site.name]
        functions = FUNCTIONS if case != "sana" else FUNCTIONS[:1]
        assert sorted(function for function, *_ in recorded) == sorted(functions), site.name  # Chroma: MLP first
        recorded = sorted(recorded, key=lambda call: FUNCTIONS.index(call[0]))
        for (function, f, z, (src, dst)), expected in zip(recorded, outputs[site.name]):
            assert z.shape[1] == expected.shape[1] == site_tokens(case, inputs) and not torch.equal(src, dst)
            points = take(z, dst).unsqueeze(2).expand(-1, -1, 3, -1)  # three points, each the destination
            with torch.no_grad():
                at_dst = f(points)
            for p in range(3):
                torch.testing.assert_close(at_dst[:, :, p], take(expected, dst), rtol=1e-4, atol=1e-5,
                                           msg=f"{case} {site.name} {function}")  # fmt: skip


def site_tokens(case, inputs):
    if case == "zimage":
        return zimage_tokens(inputs)
    x = inputs["hidden_states"]
    return x.shape[1] if x.ndim == 3 else x.shape[2] // 2 * (x.shape[3] // 2)  # Sana: patches of 2


@pytest.mark.parametrize("case", ["chroma", "flux2", "zimage", "sana"])
def test_pairs_are_those_apply_merges(case):
    """The pairs are those tofu_sd.apply (default options) merges in the same call, on the image part of a
    single-stream block's sequence, each block of the patched model given the input it has in the unpatched one."""
    build, make_inputs, _ = CASES[case]
    model = build()
    check_pairs_of_apply(model, make_inputs(model))


# --- known linearity, through the recorder's own FL -------------------------------------------------------------


class FirstHalf(torch.nn.Module):
    """``inner`` on the first half of the channels: as wide as FLUX.2's SwiGLU output, which halves them."""

    def __init__(self, inner):
        super().__init__()
        self.inner = inner

    def forward(self, x):
        return self.inner(x[..., : x.shape[-1] // 2])


def set_linearity(model, case, attention_linear: bool, ff_linear: bool):
    """A zero query norm (uniform attention over fixed keys: a constant, FL 1) or ``sin(1e4 q)``; a linear layer
    or ``sin(1e4 x)`` as the feed-forward (FLUX.2's single-stream MLP: its activation), in every block."""
    for site in family_of(model).sites(model):
        block = site.block
        attention = block.get_submodule({"zimage": "attention", "sana": "attn1"}.get(case, "attn"))
        attention.norm_q = Zero() if attention_linear else Sine()
        if case == "flux2" and site.single_stream:
            attention.mlp_act_fn = FirstHalf(torch.nn.Identity() if ff_linear else Sine())
        elif case == "chroma" and site.single_stream:
            block.act_mlp = torch.nn.Identity() if ff_linear else Sine()
        elif case != "sana":
            name = "feed_forward" if case == "zimage" else "ff"
            width = block.get_submodule(name).w2.out_features if case == "zimage" else model.inner_dim
            block.__setattr__(name, torch.nn.Linear(width, width) if ff_linear else Sine())


@pytest.mark.parametrize("case", ["chroma", "flux2", "zimage", "sana"])
@pytest.mark.parametrize("linear", [(True, False), (False, True)])
def test_known_linearity_is_measured(case, linear):
    """A model call under the recorder (its FL, not a stand-in): FL 1 where the function is affine along the path,
    well below 1 where it is ``sin(1e4 .)``, in every block; Sana's feed-forward is not measured."""
    build, make_inputs, _ = CASES[case]
    model = build()
    inputs = make_inputs(model)
    set_linearity(model, case, *linear)
    arch = family_of(model)
    config = AnalyzeConfig(out="unused", model="tiny-random", classes=[0], steps=1, max_pairs=4)
    recorder = DiTRecorder(model, arch, arch.sites(model), config, TokenFusionConfig(), 1000)
    try:
        with torch.no_grad():
            model(**inputs)
    finally:
        recorder.close()
    for probe in recorder.probes:
        fl = fl_statistics(probe)
        for function, is_linear in zip(FUNCTIONS, linear):
            stats = fl[function]
            if case == "sana" and function == "feed_forward":
                assert stats["count"] == 0
                continue
            assert stats["count"] == 2 * 4, (probe.site.name, function)  # 2 batch elements, 4 pairs
            if is_linear:
                assert stats["mean"] == pytest.approx(1, abs=1e-5), (probe.site.name, function)
            else:
                assert stats["mean"] < 0.5, (probe.site.name, function, stats["mean"])


# --- the command ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("family,name,blocks", [("Flux2", "FLUX.2", 4), ("Sana", "Sana", None)])
def test_analyze_runs_on_a_saved_pipeline_folder(family, name, blocks, tmp_path):
    """``tofu-sd analyze`` end to end on a saved tiny pipeline (FLUX.2: 2 double- and 2 single-stream blocks)."""
    folder, out = tmp_path / family, tmp_path / "fl"
    PIPELINES[family]().save_pretrained(folder)
    args = ["analyze", "--model", str(folder), "--out", str(out), "--classes", "0", "--steps", "1", "--height", "32",
            "--width", "32", "--device", "cpu", "--quiet", "--max-pairs", "3"]  # fmt: skip
    assert main(args) == 0
    result = json.loads((out / "fl.json").read_text())
    assert result["architecture"] == name
    assert result["blocks"] and all(block["proposed_letter"] in "PM" for block in result["blocks"])
    if blocks is not None:
        assert len(result["blocks"]) == blocks
        assert [b["stream"] for b in result["blocks"]] == ["image", "image", "single", "single"]
    for block in result["blocks"]:
        assert block["fl"]["self_attention"]["count"] > 0
        assert (block["fl"]["feed_forward"]["count"] > 0) == (name != "Sana")
    functions = result["method"]["functions"]
    assert ("not measured" in functions["feed_forward"]) == (name == "Sana")


def test_the_four_families_are_analyzable_and_an_unknown_one_is_still_refused():
    """check_analyzable lets the four families through; a family no probe knows keeps its clear refusal."""

    class Model(torch.nn.Module):
        pass

    class Arch:
        def sites(self, model):
            return [None, None]

        def default_schedule(self, sites):
            return "MM"

    for name in ("Chroma", "FLUX.2", "Z-Image", "Sana", "Toy"):
        Arch.name = name
        if name != "Toy":
            check_analyzable(Arch(), Model())
            continue
        with pytest.raises(EvaluationError, match=r"probes do not know the blocks of a Model \(Toy\), so nothing .*"
                                                  r"\(MM\) is provisional"):  # fmt: skip
            check_analyzable(Arch(), Model())
