"""``reduce="kv"`` on SD3 / SD3.5 and Flux models: every query (image and text) kept, image keys and values from
the block's reduced tokens, text keys and values untouched, proportional attention's ``log(size)`` on the reduced
keys, checked by what reaches the attention kernel and the projections (counts, queries and text bit for bit,
Flux's rotary rows against the unpatched keys); ratio 0, remove, compile, checkpointing, fused projections, a hook
of another package's. The joint attention itself is checked against references in test_dit_kv_attention.py."""

import pytest

pytest.importorskip("diffusers", minversion="0.42.1")  # written and tested on it; older ones are refused


import contextlib
import functools
from unittest import mock

import pytest
import torch
import torch.nn.functional as F
from diffusers.hooks import HookRegistry, ModelHook
from test_dit_common import (
    assert_unpatched,
    capturing_matchings,
    compiled_like_eager,
    flux_inputs,
    recording,
    run,
    sd3_inputs,
    tiny_flux,
    tiny_sd3,
)
from test_plugin_checkpointing import check as check_checkpointing

import tofu_sd
from tofu_sd.reducing import REDUCE_HOOK


@contextlib.contextmanager
def attention_calls():
    """Every ``F.scaled_dot_product_attention`` call's ``(query, key, value, mask)``, ``(B, H, S, D)``, in order
    (SD3's processor calls it, and so does diffusers' native backend that Flux's dispatches to)."""
    seen = []
    original = F.scaled_dot_product_attention

    def record(query, key, value, attn_mask=None, **kwargs):
        seen.append((query, key, value, attn_mask))
        return original(query, key, value, attn_mask=attn_mask, **kwargs)

    with mock.patch.object(F, "scaled_dot_product_attention", record):
        yield seen


#: Every model call below: 5 text tokens, 48 image tokens (SD3: a 16 x 12 latent in 2 x 2 patches; Flux: 6 x 8).
T, N = 5, 48
SD3_INPUTS = functools.partial(sd3_inputs, height=16, width=12, text=T)
#: (build, inputs, layout): SD3 puts the text after the image, Flux before.
MODELS = {
    "sd3": (functools.partial(tiny_sd3, num_layers=2), SD3_INPUTS, "image-first"),
    "sd3.5": (functools.partial(tiny_sd3, num_layers=2, dual_attention_layers=(0,)), SD3_INPUTS, "image-first"),
    "flux": (tiny_flux, functools.partial(flux_inputs, h=6, w=8, text=T), "text-first"),
}


def split_text(t, T, layout, dim=2):
    """The text part and the image part of ``t`` along its sequence dimension ``dim``."""
    image_first = layout == "image-first"
    text = t.narrow(dim, t.shape[dim] - T if image_first else 0, T)
    image = t.narrow(dim, 0 if image_first else T, t.shape[dim] - T)
    return text, image


@pytest.mark.parametrize("matching", ["global", "local"])
@pytest.mark.parametrize("name", list(MODELS))
def test_every_query_kept_and_text_keys_values_untouched(name, matching):
    build, inputs, layout = MODELS[name]
    model = build()
    x = inputs(model)
    with attention_calls() as full:
        run(model, x)
    tofu_sd.apply(model, 0.5, reduce="kv", schedule="M", matching=matching)
    with attention_calls() as kv:
        run(model, x)
    r = N // 2
    assert len(kv) == len(full) == {"sd3": 2, "sd3.5": 3, "flux": 4}[name]  # sd3.5: attn, attn2, attn; flux: 2 + 2
    for i, (q, k, v, mask) in enumerate(kv):
        image_only = name == "sd3.5" and i == 1  # attn2
        assert q.shape == full[i][0].shape and q.shape[2] == N + (0 if image_only else T)  # every query
        assert k.shape[2] == v.shape[2] == N - r + (0 if image_only else T)
        assert mask.shape == (2, 1, 1, k.shape[2])
        sizes = mask.exp() if image_only else split_text(mask, T, layout, dim=-1)[1].exp()
        torch.testing.assert_close(sizes.sum(-1), torch.full_like(sizes.sum(-1), float(N)))  # groups cover N tokens
        assert sizes.max() > 1.5  # some group has several tokens
        if not image_only:
            assert torch.equal(split_text(mask, T, layout, dim=-1)[0], torch.zeros_like(mask[..., :T]))
    # The first patched call sees the unpatched call's input: its queries and text keys / values bit for bit.
    q, k, v, _ = kv[0]
    assert torch.equal(q, full[0][0])
    assert torch.equal(split_text(k, T, layout)[0], split_text(full[0][1], T, layout)[0])
    assert torch.equal(split_text(v, T, layout)[0], split_text(full[0][2], T, layout)[0])


def test_flux_single_stream_block_keeps_every_query_and_its_text():
    build, inputs, _ = MODELS["flux"]
    model = build()
    x = inputs(model)
    attn = model.single_transformer_blocks[0].attn
    with attention_calls() as full:
        run(model, x)
    tofu_sd.apply(model, 0.5, reduce="kv", blocks=(2,))  # the first single-stream block alone
    with attention_calls() as kv, recording({"q": attn.to_q, "k": attn.to_k, "v": attn.to_v}) as seen:
        run(model, x)
    counts = {key: [a[0].shape[1] for a, _ in calls] for key, calls in seen.items()}
    assert counts == {"q": [T + N], "k": [T + N // 2], "v": [T + N // 2]}
    (q, k, v, _), (fq, fk, fv, _) = kv[2], full[2]
    assert torch.equal(q, fq) and k.shape[2] == T + N // 2
    torch.testing.assert_close(k[:, :, :T], fk[:, :, :T], rtol=0, atol=0)  # text keys and values, bit for bit
    torch.testing.assert_close(v[:, :, :T], fv[:, :, :T], rtol=0, atol=0)


@pytest.mark.parametrize("name", list(MODELS))
def test_projections_see_every_query_and_the_reduced_keys(name):
    build, inputs, _ = MODELS[name]
    model = build()
    blocks = model.transformer_blocks
    projections = ("to_q", "to_k", "add_q_proj", "add_k_proj")
    modules = {(i, p): getattr(b.attn, p) for i, b in enumerate(blocks) for p in projections}
    if name == "sd3.5":
        modules.update({("attn2", p): getattr(blocks[0].attn2, p) for p in ("to_q", "to_k", "to_v")})
    tofu_sd.apply(model, 0.5, reduce="kv")
    with recording(modules) as seen:
        run(model, inputs(model))
    counts = {key: [a[0].shape[1] for a, _ in calls] for key, calls in seen.items()}
    for (i, p), got in counts.items():
        assert got == [{"to_q": N, "to_k": N - N // 2, "to_v": N - N // 2}.get(p, T)], (i, p)


def test_flux_rotary_rows_of_the_kept_keys():
    """Pruning (``P``): each image key is its kept token's own key, rotated with its own position, so it equals
    the unpatched key at that position (and a key rotated with another row would not)."""
    build, inputs, _ = MODELS["flux"]
    model = build()
    x = inputs(model)
    with attention_calls() as full:
        run(model, x)
    tofu_sd.apply(model, 0.5, reduce="kv", schedule="P")
    with attention_calls() as kv, capturing_matchings(model) as matchings:
        run(model, x)
    keep = matchings["transformer_blocks.0"][0].keep_idx  # (B, N - r)
    image_keys, full_keys = kv[0][1][:, :, T:], full[0][1][:, :, T:]
    expected = torch.stack([full_keys[b][:, keep[b]] for b in range(keep.shape[0])])
    torch.testing.assert_close(image_keys, expected, rtol=1e-6, atol=1e-6)
    shifted = torch.stack([full_keys[b][:, keep[b].roll(1)] for b in range(keep.shape[0])])
    assert (image_keys - shifted).abs().max() > 1e-2


@pytest.mark.parametrize("name", list(MODELS))
def test_ratio_zero_no_reduction_and_remove_are_bit_identical(name):
    build, inputs, _ = MODELS[name]
    model = build()
    x = inputs(model)
    full = run(model, x)
    tofu_sd.apply(model, 0, reduce="kv")  # the request is recorded; nothing is hooked
    assert all("_diffusers_hook" not in m.__dict__ and "forward" not in m.__dict__ for m in model.modules())
    assert torch.equal(run(model, x), full)
    tofu_sd.apply(model, 0.01, reduce="kv")  # r = int(48 * 0.01) = 0: hooked, nothing reduced, modules untouched
    assert model.transformer_blocks[0].attn._diffusers_hook.get_hook(REDUCE_HOOK) is not None
    assert torch.equal(run(model, x), full)
    tofu_sd.apply(model, 0.5, reduce="kv")
    assert not torch.allclose(run(model, x), full, atol=1e-6)
    tofu_sd.remove(model)
    assert_unpatched(model)
    assert torch.equal(run(model, x), full)


@pytest.mark.parametrize("name,options", [("sd3.5", {"schedule": "PM"}), ("flux", {"matching": "local", "schedule": "PAMP"})])
def test_compiles_without_graph_breaks(name, options):
    build, inputs, _ = MODELS[name]
    model = build()
    x = inputs(model)
    full = run(model, x)
    _, eager = compiled_like_eager(model, x, ratio=0.5, reduce="kv", **options)
    assert not torch.allclose(eager, full, atol=1e-6)


@pytest.mark.parametrize("reentrant", [False, True], ids=["non-reentrant", "reentrant"])
@pytest.mark.parametrize("name,schedule", [("sd3.5", "PA"), ("flux", "PAMP")])
def test_checkpointing_gives_the_gradients_of_no_checkpointing(name, schedule, reentrant):
    build, inputs, _ = MODELS[name]
    model = build()
    check_checkpointing(model, inputs(model), reentrant, reduce="kv", schedule=schedule)


@pytest.mark.parametrize("name", ["sd3", "flux"])  # diffusers 0.42.1's FusedJointAttnProcessor2_0 fails on attn2
def test_fused_projections_are_refused_then_run_untouched(name):
    build, inputs, _ = MODELS[name]
    model = build()
    x = inputs(model)
    model.fuse_qkv_projections()
    with pytest.raises(ValueError, match=r"(?i)reduce='kv' cannot patch transformer_blocks.0.attn: .*fused"):
        tofu_sd.apply(model, 0.5, reduce="kv")
    assert_unpatched(model)
    tofu_sd.apply(model, 0.5)  # the token path takes them
    model.unfuse_qkv_projections()
    tofu_sd.apply(model, 0.5, reduce="kv")
    model.fuse_qkv_projections()  # after apply: the patched attentions run as diffusers runs them
    fused = run(model, x)
    tofu_sd.remove(model)
    assert torch.equal(fused, run(model, x))


class Counting(ModelHook):
    """Another package's hook on an attention (a cache's, say): counts the calls it sees."""

    def __init__(self):
        super().__init__()
        self.calls = 0

    def pre_forward(self, module, *args, **kwargs):
        self.calls += 1
        return args, kwargs


def test_joint_hook_goes_below_a_hook_registered_before_it():
    """The joint hook replaces the module's forward below another package's hook on the same attention: both run,
    and removing Token Fusion leaves the other hook working on the module's own forward."""
    model = tiny_flux()
    x = flux_inputs(model, h=6, w=8)
    full = run(model, x)
    expected = run(tofu_sd.apply(model, 0.5, reduce="kv"), x)
    tofu_sd.remove(model)
    counting = Counting()
    HookRegistry.check_if_exists_or_initialize(model.transformer_blocks[0].attn).register_hook(counting, "other")
    tofu_sd.apply(model, 0.5, reduce="kv")
    assert torch.equal(run(model, x), expected) and counting.calls == 1
    tofu_sd.remove(model)
    assert torch.equal(run(model, x), full) and counting.calls == 2
