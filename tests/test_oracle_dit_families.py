"""The bench's oracle on Qwen-Image, Wan and Sana (tiny random transformers): the tokens reaching each reduced
attention (every stride-th image / video token, text and cross-attention untouched), hooks in tofu's blocks only,
the rotary rows the processor receives (each kept token's own, per element, against the unpatched call), one
block against a direct computation, ratio 0 as the unpatched model and exact removal; the families still refused;
the bench accepting ``oracle`` on the Qwen-Image and Wan slices, and a whole bench run on tiny versions."""

import math
import types

import pytest

pytest.importorskip("diffusers", minversion="0.42.1")  # the processors' signatures were checked on it

import torch
from diffusers import QwenImageTransformer2DModel, WanTransformer3DModel
from diffusers.models.transformers.transformer_qwenimage import (
    QwenDoubleStreamAttnProcessor2_0,
)
from diffusers.models.transformers.transformer_wan import WanAttnProcessor
from test_bench_dit import oracle_blocks
from test_dit_chroma import chroma_inputs, tiny_chroma
from test_dit_common import qwenimage_inputs, recording, tiny_qwenimage
from test_dit_flux2 import flux2_inputs, tiny_flux2
from test_dit_sana import sana_inputs, tiny_sana
from test_dit_wan import tiny_wan, wan_inputs
from test_dit_zimage import tiny_zimage

import evaluation.bench.archs as bench_archs
import tofu_sd
from evaluation.bench import run_bench
from evaluation.bench.archs import transformer_variants_checked
from evaluation.bench.variants import bench_options, variant_applied
from evaluation.dit_archs import DIT_ARCHS, DiTArch, step_inputs
from evaluation.methods import method_applied
from evaluation.methods.oracle_dit import register_oracle
from evaluation.methods.strided import ORACLE_HOOK
from tofu_sd import TokenFusionConfig
from tofu_sd.hooking import unregister_all


def tofu_blocks(model, blocks):
    tofu_sd.apply(model, blocks=blocks)
    patched = {b.name for b in tofu_sd.patched_blocks(model)}
    tofu_sd.remove(model)
    return patched


def counts(seen):
    return {key: [args[0].shape[1] for args, _ in calls] for key, calls in seen.items()}


class QwenRecorder(QwenDoubleStreamAttnProcessor2_0):
    """The processor, recording what it receives (its signature kept: ``Attention`` filters keywords by it)."""

    def __init__(self, calls):
        super().__init__()
        self.calls = calls

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, encoder_hidden_states_mask=None,
                 attention_mask=None, image_rotary_emb=None):  # fmt: skip
        self.calls.append({"x": hidden_states, "text": encoder_hidden_states, "mask": encoder_hidden_states_mask,
                           "emb": image_rotary_emb})  # fmt: skip
        return super().__call__(attn, hidden_states, encoder_hidden_states, encoder_hidden_states_mask,
                                attention_mask, image_rotary_emb)  # fmt: skip


class WanRecorder(WanAttnProcessor):
    def __init__(self, calls):
        super().__init__()
        self.calls = calls

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, rotary_emb=None):
        self.calls.append({"x": hidden_states, "emb": rotary_emb})
        return super().__call__(attn, hidden_states, encoder_hidden_states, attention_mask, rotary_emb)


def processor_calls(attns, recorder):
    """Per attention, the list its recording processor fills."""
    calls = []
    for attn in attns:
        calls.append([])
        attn.processor = recorder(calls[-1])
    return calls


def padding_mask(batch, text, pad):
    mask = torch.ones(batch, text, dtype=torch.bool)
    mask[-1, text - pad :] = False
    return mask


# --- Qwen-Image -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("ratio", [0.5, 0.75])
@pytest.mark.parametrize("blocks", [None, "0,2"])
def test_qwen_image_oracle_subsets_the_image_tokens_of_tofus_blocks_only(ratio, blocks):
    model = tiny_qwenimage(num_layers=3)
    inputs = qwenimage_inputs(model, h=5, w=7, text=4)  # 35 image tokens, an odd count
    n, stride = 35, round(1 / (1 - ratio))
    modules = {}
    for i, block in enumerate(model.transformer_blocks):
        modules.update({(i, "image"): block.attn.to_q, (i, "text"): block.attn.add_q_proj,
                        (i, "image mlp"): block.img_mlp, (i, "text mlp"): block.txt_mlp})  # fmt: skip
    patched = tofu_blocks(model, blocks)
    with method_applied(model, f"oracle@{ratio}", TokenFusionConfig(blocks=blocks)), torch.no_grad():
        assert oracle_blocks(model) == patched and len(patched) == (3 if blocks is None else 2)
        with recording(modules) as seen:
            model(**inputs)
    for (i, part), got in counts(seen).items():
        hit = part == "image" and (blocks is None or i in (0, 2))
        assert got == [math.ceil(n / stride) if hit else 4 if part.startswith("text") else n], (i, part)


@pytest.mark.parametrize("ratio", [0.5, 0.75])
def test_qwen_image_processor_gets_the_kept_tokens_own_rotary_rows_and_the_text_whole(ratio):
    """Against the unpatched call's processor inputs, per element: kept image token j is token j * stride, with
    that token's image row; the text, its table and its padding mask are the unpatched call's; block 1 (not
    patched) gets every token."""
    model = tiny_qwenimage(num_layers=3)
    inputs = qwenimage_inputs(model, batch=2, h=5, w=3, text=6, mask=padding_mask(2, 6, 2))
    stride, n = round(1 / (1 - ratio)), 15
    attns = [block.attn for block in model.transformer_blocks]
    with torch.no_grad():
        full = processor_calls(attns, QwenRecorder)
        model(**inputs)
        with method_applied(model, f"oracle@{ratio}", TokenFusionConfig(blocks="0,2")):
            oracle = processor_calls(attns, QwenRecorder)
            model(**inputs)
    for i, ((got,), (ref,)) in enumerate(zip(oracle, full)):
        (image, text_table), (all_image, all_text_table) = got["emb"], ref["emb"]
        kept = math.ceil(n / stride) if i != 1 else n
        assert got["x"].shape[1] == image.shape[0] == kept, i
        for j in range(kept):
            assert torch.equal(image[j], all_image[j * (stride if i != 1 else 1)]), (i, j)
        assert torch.equal(text_table, all_text_table) and got["mask"] is ref["mask"], i
        assert got["text"].shape == ref["text"].shape, i
    assert torch.equal(oracle[0][0]["x"], full[0][0]["x"][:, ::stride])  # the first block's kept tokens
    assert torch.equal(oracle[0][0]["text"], full[0][0]["text"])


def test_qwen_image_oracle_on_one_block_is_a_direct_computation():
    """The block's attention output is the processor's on the kept tokens (their table rows, the text, its
    padding mask) with each kept image output copied over 4 tokens, cut at the odd count; the text output as is."""
    model = tiny_qwenimage(num_layers=1)
    inputs = qwenimage_inputs(model, batch=2, h=3, w=5, text=5, mask=padding_mask(2, 5, 3))
    attn = model.transformer_blocks[0].attn
    with recording({"a": attn}) as given, recording({"a": attn}, kind="post") as returned, torch.no_grad():
        with method_applied(model, "oracle@0.75", TokenFusionConfig()):
            model(**inputs)
        ((_, kwargs),) = given["a"]
        x, text, mask = kwargs["hidden_states"], kwargs["encoder_hidden_states"], kwargs["encoder_hidden_states_mask"]
        image_table, text_table = kwargs["image_rotary_emb"]
        direct = attn.processor(attn, x[:, ::4], text, mask, None, (image_table[::4], text_table))
    ((out_image, out_text),) = returned["a"]
    assert out_image.shape == x.shape and out_text.shape == text.shape
    assert torch.equal(out_image, direct[0].repeat_interleave(4, dim=1)[:, :15])
    assert torch.equal(out_text, direct[1])


# --- Wan ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("ratio", [0.5, 0.75])
@pytest.mark.parametrize("blocks", [None, "1"])
def test_wan_oracle_subsets_attn1_of_tofus_blocks_only(ratio, blocks):
    """attn1 sees every stride-th video token (5 frames of 3 x 3: 45, odd); attn2's queries are every token and its
    keys the text, the feed-forward every token."""
    model = tiny_wan(num_layers=2)
    inputs = wan_inputs(model, frames=5, h=3, w=3, text=7)
    n, stride = 45, round(1 / (1 - ratio))
    modules = {}
    for i, block in enumerate(model.blocks):
        modules.update({(i, "attn1"): block.attn1.to_q, (i, "attn2"): block.attn2.to_q,
                        (i, "attn2 keys"): block.attn2.to_k, (i, "ffn"): block.ffn})  # fmt: skip
    patched = tofu_blocks(model, blocks)
    with method_applied(model, f"oracle@{ratio}", TokenFusionConfig(blocks=blocks)), torch.no_grad():
        assert oracle_blocks(model) == patched and len(patched) == (2 if blocks is None else 1)
        with recording(modules) as seen:
            model(**inputs)
    for (i, part), got in counts(seen).items():
        hit = part == "attn1" and (blocks is None or i == 1)
        assert got == [math.ceil(n / stride) if hit else 7 if part == "attn2 keys" else n], (i, part)


@pytest.mark.parametrize("ratio", [0.5, 0.75])
def test_wan_processor_gets_the_kept_tokens_own_rotary_rows(ratio):
    model = tiny_wan(num_layers=2)
    inputs = wan_inputs(model, batch=2, frames=3, h=3, w=4, text=5)  # 36 tokens
    stride, n = round(1 / (1 - ratio)), 36
    attns = [block.attn1 for block in model.blocks]
    with torch.no_grad():
        full = processor_calls(attns, WanRecorder)
        model(**inputs)
        with method_applied(model, f"oracle@{ratio}", TokenFusionConfig(blocks="1")):
            oracle = processor_calls(attns, WanRecorder)
            model(**inputs)
    for i, ((got,), (ref,)) in enumerate(zip(oracle, full)):
        step, kept = (stride, math.ceil(n / stride)) if i == 1 else (1, n)
        assert got["x"].shape[1] == kept, i
        for table, all_rows in zip(got["emb"], ref["emb"]):
            assert table.shape == (1, kept, 1, all_rows.shape[-1]), i
            for j in range(kept):
                assert torch.equal(table[0, j, 0], all_rows[0, j * step, 0]), (i, j)


@pytest.mark.parametrize("frames", [3, 5])
def test_wan_oracle_on_one_block_is_a_direct_computation(frames):
    """attn1's output is the processor's on the kept tokens with their (cos, sin) rows, each kept token's output
    copied over 2 tokens; an odd frame count of an odd grid gives an odd token count, cut after the copy."""
    model = tiny_wan(num_layers=1)
    inputs = wan_inputs(model, batch=2, frames=frames, h=3, w=3, text=5)
    attn, n = model.blocks[0].attn1, frames * 9
    with recording({"a": attn}) as given, recording({"a": attn}, kind="post") as returned, torch.no_grad():
        with method_applied(model, "oracle@0.5", TokenFusionConfig()):
            model(**inputs)
        ((args, _),) = given["a"]
        x, (cos, sin) = args[0], args[3]
        direct = attn.processor(attn, x[:, ::2], None, None, (cos[:, ::2], sin[:, ::2]))
    (out,) = returned["a"]
    assert out.shape == x.shape and n % 2 == 1
    assert torch.equal(out, direct.repeat_interleave(2, dim=1)[:, :n])


# --- Sana: linear self-attention, no rotary table ---------------------------------------------------------------


def test_sana_oracle_subsets_attn1_only_and_is_a_direct_computation():
    model = tiny_sana(num_layers=2)
    inputs = sana_inputs(model, height=10, width=14, text=5)  # 5 x 7 patches
    block = model.transformer_blocks[0]
    modules = {"attn1": block.attn1.to_q, "attn2": block.attn2.to_q, "attn2 keys": block.attn2.to_k}
    attn = block.attn1
    with recording({"a": attn}) as given, recording({"a": attn}, kind="post") as returned, torch.no_grad():
        with method_applied(model, "oracle", TokenFusionConfig()), recording(modules) as seen:
            model(**inputs)
        ((args, _),) = given["a"]
        direct = attn.processor(attn, args[0][:, ::2])
    assert counts(seen) == {"attn1": [18], "attn2": [35], "attn2 keys": [5]}
    assert torch.equal(returned["a"][0], direct.repeat_interleave(2, dim=1)[:, :35])


# --- ratio 0, removal --------------------------------------------------------------------------------------------

FAMILIES = {
    "Qwen-Image": (tiny_qwenimage, lambda m: qwenimage_inputs(m, mask=padding_mask(2, 5, 1))),
    "Wan": (tiny_wan, lambda m: wan_inputs(m, frames=3)),
    "Wan I2V": (lambda: tiny_wan(i2v=True), lambda m: wan_inputs(m, frames=3)),  # attn1 still a self-attention
    "Sana": (tiny_sana, sana_inputs),
}


@pytest.mark.parametrize("family", FAMILIES)
def test_ratio_zero_is_the_unpatched_model_and_removal_is_exact(family):
    """At ratio 0 (stride 1) the oracle's hooks, on every block, give the unpatched output bit for bit; at 0.5 the
    output differs; removed, the model is exactly as before (same bits, no hook, registry or instance forward)."""
    build, make_inputs = FAMILIES[family]
    model = build()
    inputs = make_inputs(model)

    def structure():
        modules = model.named_modules()
        return {n: (set(m.__dict__), dict(m._forward_pre_hooks), dict(m._forward_hooks)) for n, m in modules}

    before = structure()
    with torch.no_grad():
        reference = model(**inputs).sample
        register_oracle(model, TokenFusionConfig(), 0.0)
        assert oracle_blocks(model) == tofu_blocks(model, None) != set()
        zero = model(**inputs).sample
        unregister_all(model, (ORACLE_HOOK,))
        with variant_applied(types.SimpleNamespace(transformer=model), "oracle", 0.5):
            half = model(**inputs).sample
        after = model(**inputs).sample
    assert torch.equal(zero, reference) and torch.equal(after, reference) and not torch.equal(half, reference)
    assert structure() == before


# --- refused families --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name,build,make_inputs",
    [("FLUX.2", tiny_flux2, flux2_inputs), ("Chroma", tiny_chroma, chroma_inputs), ("Z-Image", tiny_zimage, None)],
)
def test_families_without_an_oracle_are_refused_before_anything_changes(name, build, make_inputs):
    model = build()
    supported = "SD3, PixArt, Sana, Flux, Qwen-Image, Wan models lay them out"
    with pytest.raises(ValueError, match=f"as {supported}; a {name} transformer lays them out otherwise .*its oracle "
                                         "is not written yet: leave `oracle` out of --variants"):  # fmt: skip
        register_oracle(model, TokenFusionConfig(), 0.5)
    assert oracle_blocks(model) == set() and all("_diffusers_hook" not in m.__dict__ for m in model.modules())
    if make_inputs is not None:  # and the model still runs as it did
        inputs = make_inputs(model)
        with torch.no_grad():
            model(**inputs)


# --- the bench --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("arch", ["qwen-image-slice", "wan-slice", "wan-slice-17f"])
def test_bench_accepts_the_oracle_on_the_qwen_image_and_wan_slices(arch):
    """Checked on the model made on the meta device (nothing computed), and part of the default variants."""
    variants = ["full", "tofu", "oracle"]
    assert transformer_variants_checked(arch, variants, 0.5, bench_options(), None) == variants
    assert "oracle" in transformer_variants_checked(arch, None, 0.5, bench_options(), None)


#: Tiny random versions of the two, as tests/test_dit_common.py's tiny_qwenimage and tests/test_dit_wan.py's tiny_wan.
@pytest.mark.parametrize("name,latent,tokens", [("qwen-image-slice", 128, 64 * 64), ("wan-slice-17f", 64, 5 * 32 * 32)])
def test_the_oracle_on_the_real_slices_on_the_meta_device(name, latent, tokens):
    """A meta-device step of the real-size slice (nothing computed): every block's reduced attention gets half of
    the image / video tokens, and the output has the latent's shape."""
    arch = DIT_ARCHS[name]
    model = arch.build(device="meta")
    frames = {} if arch.frames is None else {"frames": arch.frames}
    inputs = step_inputs(model, arch.batch, latent, text_tokens=arch.text_tokens, device="meta", **frames)
    blocks = getattr(model, "transformer_blocks", None) or model.blocks
    part = "attn" if name.startswith("qwen") else "attn1"
    modules = {i: block.get_submodule(part).to_q for i, block in enumerate(blocks)}
    with method_applied(model, "oracle", TokenFusionConfig()), recording(modules) as seen, torch.no_grad():
        out = model(**inputs, return_dict=False)[0]
    assert out.shape == inputs["hidden_states"].shape
    assert [args[0].shape[1] for i in modules for args, _ in seen[i]] == [tokens // 2] * len(blocks)


TINY = {
    "tiny-qwen-image-test": DiTArch(QwenImageTransformer2DModel, {
        "patch_size": 2, "in_channels": 16, "out_channels": 4, "num_layers": 2, "attention_head_dim": 16,
        "num_attention_heads": 2, "joint_attention_dim": 16, "axes_dims_rope": (4, 6, 6)}, 1, 5),
    "tiny-wan-test": DiTArch(WanTransformer3DModel, {
        "num_layers": 2, "attention_head_dim": 8, "num_attention_heads": 2, "in_channels": 4, "out_channels": 4,
        "text_dim": 16, "freq_dim": 16, "ffn_dim": 32, "rope_max_seq_len": 32, "patch_size": (1, 2, 2)}, 1, 7, 3),
}  # fmt: skip


@pytest.mark.parametrize("arch", TINY)
def test_a_bench_run_times_the_oracle_on_tiny_qwen_image_and_wan(monkeypatch, arch):
    """The whole bench on a tiny random version (registered for the test alone): full, tofu and the oracle run
    and the targets compare tofu with the oracle (times are not asserted)."""
    monkeypatch.setitem(DIT_ARCHS, arch, TINY[arch])
    monkeypatch.setattr(bench_archs, "ARCHS", (*bench_archs.ARCHS, arch))
    result = run_bench(arch=arch, latents=(8,), variants=("full", "tofu", "oracle"), reps=1, warmup=0,
                       device="cpu", dtype="fp32", ops=False, overhead_tokens=(), log=lambda m: None)  # fmt: skip
    step = result["steps"]["64"]
    assert list(step["variants"]) == ["full", "tofu", "oracle"]
    assert "vs_oracle" in step["targets"]["tofu"] and step["variants"]["oracle"]["reps"] == 1
