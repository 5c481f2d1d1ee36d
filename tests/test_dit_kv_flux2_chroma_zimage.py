"""``reduce="kv"`` on FLUX.2, Chroma and Z-Image models: every query kept and the keys reduced, checked by what
reaches the attention kernel and the projections (token counts, queries and text keys bit for bit against the
unpatched call, the mask's text columns as they were and its image columns summing, per query, to the unpatched
ones' total weight), Chroma's padding masked as if the padded tokens were not there. Ratio 0, remove and compile
are checked in test_dit_kv_common.py, the attentions themselves against references in
test_dit_kv_flux2_chroma_zimage_attention.py."""

import pytest

pytest.importorskip("diffusers", minversion="0.42.1")  # written and tested on it; older ones are refused


import torch
from kv_models import MODELS, T, attention_calls, run
from test_dit_chroma import chroma_inputs, tiny_chroma
from test_dit_common import assert_unpatched, recording
from test_dit_flux2 import flux2_inputs, tiny_flux2

import tofu_sd

#: Every call: 30 image tokens (5 x 6), 5 text tokens; Z-Image's layers get 66 more (see kv_models.MODELS).
N = 30
NAMES = ["flux2", "chroma", "chroma-float", "zimage"]


def additive(mask):
    return torch.zeros(mask.shape).masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else mask


@pytest.mark.parametrize("name", NAMES)
def test_every_query_kept_text_keys_bitwise_and_the_mask_grouped(name):
    """Per attention call, unpatched and patched alike: the same queries (the first patched call's bit for bit);
    in the patched attentions ``N - r`` image keys, the text's keys (Z-Image: the rest's) and mask columns as
    unpatched, and per query the image keys' weights ``exp(bias)`` summing to the unpatched image keys' (``N``
    unmasked: the sizes cover the image)."""
    family = MODELS[name]
    model = family.build()
    x = family.inputs(model)
    with attention_calls() as full:
        run(model, x)
    tofu_sd.apply(model, 0.5, reduce="kv", schedule="PM" * 2 if name != "zimage" else "MP")
    with attention_calls() as kv:
        run(model, x)
    assert len(kv) == len(full)
    patched = [i for i, (f, k) in enumerate(zip(full, kv)) if k[1].shape[2] != f[1].shape[2]]
    assert len(patched) == (2 if name == "zimage" else 4)  # every block (Z-Image: its 2 main layers, no refiner)
    zimage = name == "zimage"
    for i in patched:
        (q, k, v, mask), (fq, fk, fv, fmask) = kv[i], full[i]
        S = fk.shape[2]
        assert q.shape == fq.shape and k.shape[2] == v.shape[2] == S - N // 2  # every query, N - r image keys
        fmask = torch.zeros(1, 1, 1, S) if fmask is None else additive(fmask)
        image, rest = (slice(0, N), slice(N, S)) if zimage else (slice(T, S), slice(0, T))
        kept_rest = slice(N - N // 2, None) if zimage else rest
        assert torch.equal(*torch.broadcast_tensors(mask[..., kept_rest], fmask[..., rest]))
        kept_image = slice(0, N - N // 2) if zimage else image
        weight, full_weight = mask[..., kept_image].exp().sum(-1), fmask[..., image].exp().sum(-1)
        torch.testing.assert_close(*torch.broadcast_tensors(weight, full_weight))
    q, k, v, _ = kv[patched[0]]
    fq, fk, fv, _ = full[patched[0]]
    assert torch.equal(q, fq)  # the first patched call sees the unpatched call's input
    if zimage:  # the rest's keys are projected with the reduced image tokens: the same rows, not the same call
        torch.testing.assert_close(k[:, :, N // 2 :], fk[:, :, N:], rtol=1e-6, atol=1e-6)
    else:
        assert torch.equal(k[:, :, :T], fk[:, :, :T]) and torch.equal(v[:, :, :T], fv[:, :, :T])


def projections(model, name):
    """``{name: (module, expected token counts per call)}`` for the first block of each kind."""
    if name == "zimage":
        attn, S = model.layers[0].attention, N + 66
        return {"q": (attn.to_q, [S]), "k": (attn.to_k, [N // 2 + S - N]), "v": (attn.to_v, [N // 2 + S - N])}
    double, single = model.transformer_blocks[0].attn, model.single_transformer_blocks[0].attn
    counts = {
        "q": (double.to_q, [N]), "k": (double.to_k, [N // 2]), "v": (double.to_v, [N // 2]),
        "text_q": (double.add_q_proj, [T]), "text_k": (double.add_k_proj, [T]),
    }  # fmt: skip
    if name == "flux2":  # every token through the fused projection, then the reduced image tokens
        counts["single"] = (single.to_qkv_mlp_proj, [T + N, N // 2])
    else:
        counts.update({"single_q": (single.to_q, [T + N]), "single_k": (single.to_k, [T + N // 2])})
    return counts


@pytest.mark.parametrize("name", ["flux2", "chroma", "zimage"])
def test_projections_see_every_query_and_the_reduced_keys(name):
    family = MODELS[name]
    model = family.build()
    x = family.inputs(model)
    expected = projections(model, name)
    tofu_sd.apply(model, 0.5, reduce="kv")
    with recording({key: module for key, (module, _) in expected.items()}) as seen:
        run(model, x)
    counts = {key: [a[0].shape[1] for a, _ in calls] for key, calls in seen.items()}
    assert counts == {key: count for key, (_, count) in expected.items()}


def test_chroma_padded_text_tokens_are_masked_as_if_they_were_not_there():
    """With its padding masked, element 1's output equals that of the same call on element 1 alone without its
    padded text tokens, every block under reduce="kv" (the mask's text columns and rows kept, its image columns
    grouped); unmasked, the padding changes it."""
    model = tiny_chroma()
    pad = 2
    inputs = chroma_inputs(model, batch=2, h=5, w=6, text=T, padding=[0, pad])
    tofu_sd.apply(model, ratio=0.5, reduce="kv")
    with recording({"k": model.single_transformer_blocks[1].attn.to_k}) as seen:
        padded = run(model, inputs)
    assert seen["k"][0][0][0].shape[1] == T + N // 2  # reduced, with its mask
    alone = dict(inputs, attention_mask=None, txt_ids=inputs["txt_ids"][: T - pad])
    for key in ("hidden_states", "timestep"):
        alone[key] = inputs[key][1:]
    alone["encoder_hidden_states"] = inputs["encoder_hidden_states"][1:, : T - pad]
    torch.testing.assert_close(padded[1:], run(model, alone), rtol=0, atol=1e-5)
    assert not torch.allclose(run(model, dict(inputs, attention_mask=None))[1:], padded[1:], atol=1e-3)


def test_processors_it_does_not_mirror_are_refused_and_run_untouched():
    """FLUX.2's fused double-stream projections: refused at apply; fused after apply, the attention runs as
    diffusers runs it."""
    model = tiny_flux2()
    model.transformer_blocks[0].attn.fuse_projections()
    with pytest.raises(ValueError, match=r"reduce='kv' cannot patch transformer_blocks.0.attn: .*fused"):
        tofu_sd.apply(model, 0.5, reduce="kv")
    assert_unpatched(model)
    model.transformer_blocks[0].attn.unfuse_projections()
    x = flux2_inputs(model, h=5, w=6, text=T)
    tofu_sd.apply(model, 0.5, reduce="kv", blocks="0")
    model.transformer_blocks[0].attn.fuse_projections()
    fused = run(model, x)
    tofu_sd.remove(model)
    assert torch.equal(fused, run(model, x))
