"""``reduce="kv"`` on SD3 / SD3.5 and Flux models: every query (image and text) kept, image keys and values from
the block's reduced tokens, text keys and values untouched, proportional attention's ``log(size)`` on the reduced
keys, checked by what reaches the attention kernel and the projections (counts, queries and text bit for bit);
checkpointing, fused projections, a hook of another package's. Ratio 0, remove, compile and Flux's rotary rows are
checked in test_dit_kv_common.py, the joint attention itself against references in test_dit_kv_attention.py."""

import pytest

pytest.importorskip("diffusers", minversion="0.42.1")  # written and tested on it; older ones are refused


import pytest
import torch
from diffusers.hooks import HookRegistry, ModelHook
from kv_models import MODELS, T, attention_calls
from test_dit_common import (
    assert_unpatched,
    flux_inputs,
    recording,
    run,
    tiny_flux,
)
from test_plugin_checkpointing import check as check_checkpointing

import tofu_sd

#: Every model call below: 5 text tokens, 48 image tokens (SD3: a 16 x 12 latent in 2 x 2 patches; Flux: 6 x 8).
#: SD3 puts the text after the image, Flux before.
N = 48
NAMES = ["sd3", "sd3.5", "flux"]


def split_text(t, T, layout, dim=2):
    """The text part and the image part of ``t`` along its sequence dimension ``dim``."""
    image_first = layout == "image-first"
    text = t.narrow(dim, t.shape[dim] - T if image_first else 0, T)
    image = t.narrow(dim, 0 if image_first else T, t.shape[dim] - T)
    return text, image


@pytest.mark.parametrize("matching", ["global", "local"])
@pytest.mark.parametrize("name", NAMES)
def test_every_query_kept_and_text_keys_values_untouched(name, matching):
    family = MODELS[name]
    model, layout = family.build(), family.layout
    x = family.inputs(model)
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
    family = MODELS["flux"]
    model = family.build()
    x = family.inputs(model)
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


@pytest.mark.parametrize("name", NAMES)
def test_projections_see_every_query_and_the_reduced_keys(name):
    family = MODELS[name]
    model = family.build()
    blocks = model.transformer_blocks
    projections = ("to_q", "to_k", "add_q_proj", "add_k_proj")
    modules = {(i, p): getattr(b.attn, p) for i, b in enumerate(blocks) for p in projections}
    if name == "sd3.5":
        modules.update({("attn2", p): getattr(blocks[0].attn2, p) for p in ("to_q", "to_k", "to_v")})
    tofu_sd.apply(model, 0.5, reduce="kv")
    with recording(modules) as seen:
        run(model, family.inputs(model))
    counts = {key: [a[0].shape[1] for a, _ in calls] for key, calls in seen.items()}
    for (i, p), got in counts.items():
        assert got == [{"to_q": N, "to_k": N - N // 2, "to_v": N - N // 2}.get(p, T)], (i, p)


@pytest.mark.parametrize("reentrant", [False, True], ids=["non-reentrant", "reentrant"])
@pytest.mark.parametrize("name,schedule", [("sd3.5", "PA"), ("flux", "PAMP")])
def test_checkpointing_gives_the_gradients_of_no_checkpointing(name, schedule, reentrant):
    family = MODELS[name]
    model = family.build()
    check_checkpointing(model, family.inputs(model), reentrant, reduce="kv", schedule=schedule)


@pytest.mark.parametrize("name", ["sd3", "flux"])  # diffusers 0.42.1's FusedJointAttnProcessor2_0 fails on attn2
def test_fused_projections_are_refused_then_run_untouched(name):
    family = MODELS[name]
    model = family.build()
    x = family.inputs(model)
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
