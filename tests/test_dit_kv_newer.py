"""``reduce="kv"`` on Qwen-Image, Wan and Sana models: every query kept, keys and values from the block's reduced
tokens, checked by what reaches the attention kernel and the projections (token counts, queries and text bit for
bit, the text's padding mask and the ``log(size)`` bias, rotary rows of the kept keys against the unpatched
keys), the cross-attentions untouched; ratio 0, remove, compile, refusals. The attentions themselves are checked
against references in test_dit_kv_newer_attention.py."""

import pytest

pytest.importorskip("diffusers", minversion="0.42.1")  # written and tested on it; older ones are refused


import importlib.metadata

import pytest
import torch
from diffusers.models.transformers.sana_transformer import SanaAttnProcessor2_0
from test_dit_common import (
    assert_unpatched,
    capturing_matchings,
    compiled_like_eager,
    qwenimage_inputs,
    recording,
    run,
    tiny_qwenimage,
)
from test_dit_kv import attention_calls
from test_dit_sana import sana_inputs, tiny_sana
from test_dit_wan import tiny_wan, wan_inputs

import tofu_sd
from tofu_sd.reducing import REDUCE_HOOK

#: Every call below: 48 image / video tokens (Qwen-Image 6 x 8, Wan 3 frames of 4 x 4, Sana 6 x 8 patches).
N, T = 48, 5
PADDING = torch.tensor([[True, True, True, False, False], [True] * T])
MODELS = {
    "qwen": (tiny_qwenimage, lambda model: qwenimage_inputs(model, h=6, w=8, text=T)),
    "qwen-padded": (tiny_qwenimage, lambda model: qwenimage_inputs(model, h=6, w=8, text=T, mask=PADDING)),
    "wan": (tiny_wan, lambda model: wan_inputs(model, frames=3, h=4, w=4, text=T)),
    "wan-i2v": (lambda: tiny_wan(i2v=True), lambda model: wan_inputs(model, frames=3, h=4, w=4)),
    "sana": (lambda: tiny_sana(num_layers=2), lambda model: sana_inputs(model, height=12, width=16, text=T)),
}


def attentions(model, name):
    """The attentions ``reduce="kv"`` patches, first block first."""
    if name.startswith("qwen"):
        return [b.attn for b in model.transformer_blocks]
    return [b.attn1 for b in (model.blocks if name.startswith("wan") else model.transformer_blocks)]


@pytest.mark.parametrize("matching", ["global", "local"])
@pytest.mark.parametrize("name", ["qwen", "qwen-padded", "wan"])
def test_every_query_kept_and_text_untouched(name, matching):
    build, inputs = MODELS[name]
    model = build()
    x = inputs(model)
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
    build, inputs = MODELS[name]
    model = build()
    x = inputs(model)
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


@pytest.mark.parametrize("name", ["qwen", "wan"])
def test_rotary_rows_of_the_kept_keys(name):
    """Pruning (``P``): each image key is its kept token's own key, rotated with its own position, so it equals
    the unpatched key at that position (and a key rotated with another row would not)."""
    build, inputs = MODELS[name]
    model = build()
    x = inputs(model)
    with attention_calls() as full:
        run(model, x)
    tofu_sd.apply(model, 0.5, reduce="kv", schedule="P")
    with attention_calls() as kv, capturing_matchings(model) as matchings:
        run(model, x)
    keep = matchings["transformer_blocks.0" if name == "qwen" else "blocks.0"][0].keep_idx  # (B, N - r)
    text = T if name == "qwen" else 0
    keys, full_keys = kv[0][1][:, :, text:], full[0][1][:, :, text:]
    expected = torch.stack([full_keys[b][:, keep[b]] for b in range(keep.shape[0])])
    torch.testing.assert_close(keys, expected, rtol=1e-6, atol=1e-6)
    shifted = torch.stack([full_keys[b][:, keep[b].roll(1)] for b in range(keep.shape[0])])
    assert (keys - shifted).abs().max() > 1e-2


@pytest.mark.parametrize("name", ["qwen-padded", "wan", "sana"])
def test_ratio_zero_no_reduction_and_remove_are_bit_identical(name):
    build, inputs = MODELS[name]
    model = build()
    x = inputs(model)
    full = run(model, x)
    tofu_sd.apply(model, 0, reduce="kv")  # the request is recorded; nothing is hooked
    assert all("_diffusers_hook" not in m.__dict__ and "forward" not in m.__dict__ for m in model.modules())
    assert torch.equal(run(model, x), full)
    tofu_sd.apply(model, 0.01, reduce="kv")  # r = int(48 * 0.01) = 0: hooked, nothing reduced
    assert attentions(model, name)[0]._diffusers_hook.get_hook(REDUCE_HOOK) is not None
    assert torch.equal(run(model, x), full)
    tofu_sd.apply(model, 0.5, reduce="kv")
    assert not torch.allclose(run(model, x), full, atol=1e-6)
    tofu_sd.remove(model)
    assert_unpatched(model)
    assert torch.equal(run(model, x), full)


@pytest.mark.parametrize("name,schedule", [("qwen-padded", "PM"), ("wan", "AM"), ("sana", "PM")])
def test_compiles_without_graph_breaks(name, schedule):
    build, inputs = MODELS[name]
    model = build()
    x = inputs(model)
    full = run(model, x)
    _, eager = compiled_like_eager(model, x, ratio=0.5, reduce="kv", matching="local", schedule=schedule)
    assert not torch.allclose(eager, full, atol=1e-6)


@pytest.mark.parametrize("name", ["qwen-padded", "wan"])
def test_compile_repeated_blocks(name):
    build, inputs = MODELS[name]
    model = build()
    x = inputs(model)
    eager = run(tofu_sd.apply(model, 0.5, reduce="kv"), x)
    model.compile_repeated_blocks(backend="aot_eager", fullgraph=True)
    torch.testing.assert_close(run(model, x), eager, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("name", ["qwen", "wan", "sana"])
def test_an_older_diffusers_is_refused(name, monkeypatch):
    build, _ = MODELS[name]
    model = build()
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
