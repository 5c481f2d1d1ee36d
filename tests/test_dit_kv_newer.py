"""``reduce="kv"`` on Qwen-Image, Wan and Sana models: every query kept, keys and values from the block's reduced
tokens, checked by what reaches the attention kernel and the projections (token counts, queries and text bit for
bit, the text's padding mask and the ``log(size)`` bias), the cross-attentions untouched; compiled repeated blocks,
refusals. Ratio 0, remove, compile and the rotary rows of the kept keys are checked in test_dit_kv_common.py, the
attentions themselves against references in test_dit_kv_newer_attention.py."""

import pytest

pytest.importorskip("diffusers", minversion="0.42.1")  # written and tested on it; older ones are refused


import importlib.metadata

import pytest
import torch
from diffusers.models.transformers.sana_transformer import SanaAttnProcessor2_0
from kv_models import MODELS, PADDING, T, attention_calls
from test_dit_common import assert_unpatched, recording, run
from test_dit_sana import tiny_sana
from test_dit_wan import tiny_wan, wan_inputs

import tofu_sd

#: Every call below: 48 image / video tokens (Qwen-Image 6 x 8, Wan 3 frames of 4 x 4, Sana 6 x 8 patches).
N = 48


def attentions(model, name):
    """The attentions ``reduce="kv"`` patches, first block first."""
    return [model.get_submodule(attention) for attention in MODELS[name].patched]


@pytest.mark.parametrize("matching", ["global", "local"])
@pytest.mark.parametrize("name", ["qwen", "qwen-padded", "wan"])
def test_every_query_kept_and_text_untouched(name, matching):
    family = MODELS[name]
    model = family.build()
    x = family.inputs(model)
    with attention_calls() as full:
        run(model, x)
    tofu_sd.apply(model, 0.5, reduce="kv", schedule="M", matching=matching)
    with attention_calls() as kv:
        run(model, x)
    wan = name == "wan"
    assert len(kv) == len(full) == (4 if wan else 2)  # 2 blocks; wan: attn1 and attn2 in each
    text = 0 if wan else T
    for i, (q, k, v, mask) in enumerate(kv[::2] if wan else kv):
        assert q.shape == full[2 * i if wan else i][0].shape and q.shape[2] == text + N  # every query
        assert k.shape[2] == v.shape[2] == text + N // 2 and mask.shape == (2, 1, 1, text + N // 2)
        sizes = mask[..., text:].exp()
        torch.testing.assert_close(sizes.sum(-1), torch.full_like(sizes.sum(-1), float(N)))  # groups cover N tokens
        assert sizes.max() > 1.5
        padded = torch.zeros(2, T) if name == "qwen" else torch.zeros(2, T).masked_fill(~PADDING, float("-inf"))
        assert torch.equal(mask[:, 0, 0, :text], padded[:, :text])
    if wan:  # the cross-attentions: every query, the text keys, as unpatched
        assert all(c[0].shape[2] == N and c[1].shape[2] == T for c in kv[1::2])
    q, k, v, _ = kv[0]  # the first patched call sees the unpatched call's input
    assert torch.equal(q, full[0][0])
    assert torch.equal(k[:, :, :text], full[0][1][:, :, :text]) and torch.equal(v[:, :, :text], full[0][2][:, :, :text])


@pytest.mark.parametrize("name", ["qwen", "wan", "wan-i2v", "sana"])
def test_projections_see_every_query_and_the_reduced_keys(name):
    family = MODELS[name]
    model = family.build()
    x = family.inputs(model)
    modules, expected = {}, {}
    for i, attn in enumerate(attentions(model, name)):
        for p, count in {"to_q": N, "to_k": N // 2, "to_v": N // 2}.items():
            modules[(i, p)], expected[(i, p)] = getattr(attn, p), count
        if name == "qwen":  # the text through the added projections, every token
            modules.update({(i, p): getattr(attn, p) for p in ("add_q_proj", "add_k_proj", "add_v_proj")})
            expected.update({(i, p): T for p in ("add_q_proj", "add_k_proj", "add_v_proj")})
    if name != "qwen":
        cross = model.blocks[0].attn2 if name.startswith("wan") else model.transformer_blocks[0].attn2  # the cross-attention, untouched: every token a query, the whole context as keys
        modules.update({"cross_q": cross.to_q, "cross_k": cross.to_k})
        expected.update({"cross_q": N, "cross_k": 512 if name == "wan-i2v" else T})
        if name == "wan-i2v":
            modules["cross_image_k"], expected["cross_image_k"] = cross.add_k_proj, 4  # the 4 CLIP image tokens
    with recording(modules) as unpatched:
        run(model, x)
    tofu_sd.apply(model, 0.5, reduce="kv")
    with recording(modules) as seen:
        run(model, x)
    counts = {key: [a[0].shape[1] for a, _ in calls] for key, calls in seen.items()}
    assert counts == {key: [count] for key, count in expected.items()}
    assert torch.equal(seen[(0, "to_q")][0][0][0], unpatched[(0, "to_q")][0][0][0])  # the first queries, bit for bit


@pytest.mark.parametrize("name", ["qwen-padded", "wan"])
def test_compile_repeated_blocks(name):
    family = MODELS[name]
    model = family.build()
    x = family.inputs(model)
    eager = run(tofu_sd.apply(model, 0.5, reduce="kv"), x)
    model.compile_repeated_blocks(backend="aot_eager", fullgraph=True)
    torch.testing.assert_close(run(model, x), eager, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("name", ["qwen", "wan", "sana"])
def test_an_older_diffusers_is_refused(name, monkeypatch):
    model = MODELS[name].build()
    real = importlib.metadata.version
    monkeypatch.setattr(importlib.metadata, "version", lambda pkg: "0.41.0" if pkg == "diffusers" else real(pkg))
    with pytest.raises(ValueError, match=r"tested on diffusers >= 0\.42\.1; this environment has diffusers 0\.41\.0"):
        tofu_sd.apply(model, 0.5, reduce="kv")
    assert tofu_sd.get_state(model) is None
    assert_unpatched(model)


def test_processors_it_does_not_mirror_are_refused_and_run_untouched():
    """Sana's softmax processor (which reduce="tokens" takes) and Wan's fused projections: refused at apply; set
    after apply, the attention runs as diffusers runs it."""
    model = tiny_sana(num_layers=2)
    model.transformer_blocks[1].attn1.set_processor(SanaAttnProcessor2_0())
    with pytest.raises(ValueError, match=r"reduce='kv' cannot patch transformer_blocks.1.attn1: .*SanaAttnProcessor2_0"):
        tofu_sd.apply(model, 0.5, reduce="kv")
    assert_unpatched(model)
    tofu_sd.apply(model, 0.5)  # the token path takes it
    wan = tiny_wan()
    wan.fuse_qkv_projections()
    with pytest.raises(ValueError, match=r"reduce='kv' cannot patch blocks.0.attn1: .*fused"):
        tofu_sd.apply(wan, 0.5, reduce="kv")
    assert_unpatched(wan)
    wan.unfuse_qkv_projections()
    x = wan_inputs(wan)
    tofu_sd.apply(wan, 0.5, reduce="kv")
    wan.fuse_qkv_projections()
    fused = run(wan, x)
    tofu_sd.remove(wan)
    assert torch.equal(fused, run(wan, x))
