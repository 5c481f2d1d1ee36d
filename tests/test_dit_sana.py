"""Token Fusion on a tiny Sana transformer: the linear self-attention attn1 reduced and restored (against its
processor run on the reduced tokens), the cross-attention and the GLU-conv feed-forward see every token in place;
odd and non-square grids with patch sizes 1 and 2, one partition per CFG batch, refusals, compile, remove."""

import pytest

pytest.importorskip("diffusers", minversion="0.42.1")  # written and tested on it; older ones are refused


import pytest
import torch
from diffusers import SanaTransformer2DModel
from diffusers.models.attention_processor import (
    AttnProcessor,
    PAGIdentitySanaLinearAttnProcessor2_0,
)
from test_dit_common import (
    assert_unpatched,
    capturing_matchings,
    check_ratio_zero_then_compiled,
    destinations,
    recording,
    run,
)

import tofu_sd
from tofu_sd.merge import MODES, reduce_tokens, restore_tokens


def tiny_sana(num_layers=3, patch_size=2, seed=0):
    torch.manual_seed(seed)
    return SanaTransformer2DModel(
        in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=8, num_layers=num_layers,
        num_cross_attention_heads=2, cross_attention_head_dim=8, cross_attention_dim=16, caption_channels=12,
        mlp_ratio=2.0, sample_size=8, patch_size=patch_size,
    ).eval()  # fmt: skip


def sana_inputs(model, batch=2, height=12, width=8, text=5, timestep=500.0, seed=1):
    """A latent of ``height x width`` pixels (``/ patch_size`` tokens a side) and ``text`` caption tokens."""
    g = torch.Generator().manual_seed(seed)
    return {
        "hidden_states": torch.randn(batch, model.config.in_channels, height, width, generator=g),
        "encoder_hidden_states": torch.randn(batch, text, model.config.caption_channels, generator=g),
        "timestep": torch.full((batch,), float(timestep)),
    }


@pytest.mark.parametrize("patch_size,height,width,batch", [(2, 10, 14, 2), (2, 14, 6, 1), (1, 5, 7, 2), (1, 6, 4, 3)])
def test_only_self_attention_sees_fewer_tokens(patch_size, height, width, batch):
    model = tiny_sana(patch_size=patch_size)
    inputs = sana_inputs(model, batch=batch, height=height, width=width, text=6)
    tofu_sd.apply(model, ratio=0.5, blocks="0,2")
    assert [(b.name, b.letter) for b in tofu_sd.patched_blocks(model)] == [
        ("transformer_blocks.0", "M"), ("transformer_blocks.2", "M"),
    ]  # fmt: skip
    h, w = height // patch_size, width // patch_size
    n = h * w
    modules = {}
    for i, block in enumerate(model.transformer_blocks):
        modules.update({(i, "attn1"): block.attn1.to_q, (i, "attn2"): block.attn2.to_q, (i, "text"): block.attn2.to_k})
        modules[(i, "ff")] = block.ff.conv_inverted
    with recording(modules) as seen:
        run(model, inputs)
    for (i, part), calls in seen.items():
        ((args, _),) = calls
        if part == "ff":  # the GLU-conv feed-forward sees the full (B, C, h, w) grid
            assert args[0].shape[0] == batch and args[0].shape[-2:] == (h, w), i
            continue
        expected = {"attn1": n - n // 2 if i != 1 else n, "attn2": n, "text": 6}[part]
        assert args[0].shape[:2] == (batch, expected), (i, part)


@pytest.mark.parametrize("letter", ["P", "M"])
def test_attn1_equals_reduce_attend_restore(letter):
    model = tiny_sana(num_layers=2)
    inputs = sana_inputs(model, height=10, width=14)
    tofu_sd.apply(model, ratio=0.5, schedule=letter)
    attn = model.transformer_blocks[1].attn1
    with recording({"a": attn}) as given, recording({"a": attn}, "post") as returned, capturing_matchings(model) as used:
        run(model, inputs)
    (args, _), out = given["a"][0], returned["a"][0]
    m = used["transformer_blocks.1"][0]
    assert m.num_tokens == 35 and m.r == 17
    with torch.no_grad():
        reduced = reduce_tokens(args[0], m, MODES[letter])
        expected = restore_tokens(attn.processor(attn, reduced), m)
        unreduced = attn.processor(attn, args[0])
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-6)
    assert not torch.allclose(out, unreduced, atol=1e-4)  # the linear attention did run on fewer tokens


def test_cfg_batch_and_calls_share_one_partition():
    model = tiny_sana()
    tofu_sd.apply(model, ratio=0.5)
    with capturing_matchings(model) as used:
        run(model, sana_inputs(model, batch=2))
    for name, (m,) in used.items():
        assert torch.equal(destinations(m)[0], destinations(m)[1]), name
    dsts = []
    for seed, t in ((1, 500.0), (2, 500.0), (1, 480.0)):
        with capturing_matchings(model) as used:
            run(model, sana_inputs(model, batch=1, timestep=t, seed=seed))
        dsts.append(destinations(used["transformer_blocks.0"][0]))
    assert torch.equal(dsts[0], dsts[1]) and not torch.equal(dsts[0], dsts[2])


def test_pag_identity_processor_is_reduced_on_its_rows():
    model = tiny_sana(num_layers=2)
    model.transformer_blocks[1].attn1.set_processor(PAGIdentitySanaLinearAttnProcessor2_0())
    inputs = sana_inputs(model, batch=2)  # PAG's [original, perturbed] rows
    tofu_sd.apply(model, ratio=0.5, schedule="M")
    attn = model.transformer_blocks[1].attn1
    with recording({"a": attn}) as given, recording({"a": attn}, "post") as returned, capturing_matchings(model) as used:
        run(model, inputs)
    m = used["transformer_blocks.1"][0]
    with torch.no_grad():
        expected = restore_tokens(attn.processor(attn, reduce_tokens(given["a"][0][0][0], m, "mlerp")), m)
    torch.testing.assert_close(returned["a"][0], expected, rtol=0, atol=1e-6)


def test_unsupported_options_and_processors_are_refused():
    model = tiny_sana()
    inputs = sana_inputs(model)
    model.transformer_blocks[2].attn1.set_processor(AttnProcessor())
    full = run(model, inputs)
    with pytest.raises(ValueError, match="transformer_blocks.2.attn1: its attention processor AttnProcessor is not"):
        tofu_sd.apply(model)
    assert_unpatched(model)
    assert torch.equal(run(model, inputs), full)


def test_ratio_zero_remove_and_compile():
    model = tiny_sana(num_layers=2)
    inputs = sana_inputs(model, height=10, width=14)
    compiled, full = check_ratio_zero_then_compiled(model, inputs)
    tofu_sd.remove(compiled)
    assert_unpatched(model)
    assert torch.equal(run(model, inputs), full)
