"""``reduce="kv"`` on every family it patches, the same checks on each: ratio 0 hooks nothing and changes nothing,
a ratio below one token hooks exactly the family's attentions and changes nothing, ``remove`` gives back the
unpatched model bit for bit; the patched model compiles with no graph break and gives its eager output; the
families with rotary positions rotate each kept key with its own row. What else each family's attentions receive
is checked in test_dit_kv.py, test_dit_kv_newer.py and test_dit_kv_flux2_chroma_zimage.py."""

import pytest

pytest.importorskip("diffusers", minversion="0.42.1")  # written and tested on it; older ones are refused


import torch
from kv_models import MODELS, T, attention_calls, run
from test_dit_common import assert_unpatched, capturing_matchings, compiled_like_eager

import tofu_sd
from tofu_sd.reducing import REDUCE_HOOK


def hooked(model):
    """The names of the modules that carry Token Fusion's reduce hook."""
    registries = ((name, m.__dict__.get("_diffusers_hook")) for name, m in model.named_modules())
    return [name for name, hooks in registries if hooks is not None and hooks.get_hook(REDUCE_HOOK) is not None]


@pytest.mark.parametrize("name", ["sd3", "sd3.5", "flux", "qwen-padded", "wan", "sana", "flux2", "chroma", "zimage"])
def test_ratio_zero_no_reduction_and_remove_are_bit_identical(name):
    family = MODELS[name]
    model = family.build()
    x = family.inputs(model)
    full = run(model, x)
    tofu_sd.apply(model, 0, reduce="kv")  # the request is recorded; nothing is hooked
    assert all("_diffusers_hook" not in m.__dict__ and "forward" not in m.__dict__ for m in model.modules())
    assert torch.equal(run(model, x), full)
    tofu_sd.apply(model, 0.01, reduce="kv")  # r = int(N * 0.01) = 0 (N = 30 or 48): hooked, nothing reduced
    assert hooked(model) == list(family.patched)
    assert torch.equal(run(model, x), full)
    tofu_sd.apply(model, 0.5, reduce="kv")
    assert not torch.allclose(run(model, x), full, atol=1e-6)
    tofu_sd.remove(model)
    assert_unpatched(model)
    assert torch.equal(run(model, x), full)


#: Options per family: Flux's PAMP a letter per block, Qwen-Image with its text padding, Chroma with its padding
#: mask, Z-Image with its key mask.
COMPILED = {
    "sd3.5": {"schedule": "PM"},
    "flux": {"matching": "local", "schedule": "PAMP"},
    "qwen-padded": {"matching": "local", "schedule": "PM"},
    "wan": {"matching": "local", "schedule": "AM"},
    "sana": {"matching": "local", "schedule": "PM"},
    "flux2": {"matching": "local", "schedule": "PMPM"},
    "chroma": {"matching": "local", "schedule": "PMPM"},
    "zimage": {"matching": "local", "schedule": "AM"},
}


@pytest.mark.parametrize("name", list(COMPILED))
def test_compiles_without_graph_breaks(name):
    """The patched model changes the output and compiles like its eager self. (Z-Image runs once first, unpatched:
    diffusers 0.42.1 fills its rotary cache on the first call, a graph break of its own.)"""
    family = MODELS[name]
    model = family.build()
    x = family.inputs(model)
    full = run(model, x)
    _, eager = compiled_like_eager(model, x, ratio=0.5, reduce="kv", **COMPILED[name])
    assert not torch.allclose(torch.stack(eager) if isinstance(eager, list) else eager, full, atol=1e-6)


@pytest.mark.parametrize("name", ["flux", "qwen", "wan"])
def test_rotary_rows_of_the_kept_keys(name):
    """Pruning (``P``): each image key of the first block is its kept token's own key, rotated with its own
    position, so it equals the unpatched key at that position (and a key rotated with another row would not)."""
    family = MODELS[name]
    model = family.build()
    x = family.inputs(model)
    with attention_calls() as full:
        run(model, x)
    tofu_sd.apply(model, 0.5, reduce="kv", schedule="P")
    with attention_calls() as kv, capturing_matchings(model) as matchings:
        run(model, x)
    keep = matchings[family.patched[0].rsplit(".", 1)[0]][0].keep_idx  # the first block's, (B, N - r)
    text = T if family.layout == "text-first" else 0
    keys, full_keys = kv[0][1][:, :, text:], full[0][1][:, :, text:]
    expected = torch.stack([full_keys[b][:, keep[b]] for b in range(keep.shape[0])])
    torch.testing.assert_close(keys, expected, rtol=1e-6, atol=1e-6)
    shifted = torch.stack([full_keys[b][:, keep[b].roll(1)] for b in range(keep.shape[0])])
    assert (keys - shifted).abs().max() > 1e-2
