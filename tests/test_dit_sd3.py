"""Token Fusion on tiny SD3 / SD3.5 transformers: blocks, token counts, text untouched, a block against a hand
computation, schedules, CFG, rematch_every, grids, compile, remove."""

import pytest
import torch
from diffusers.models.attention_processor import (
    AttnProcessor2_0,
    PAGJointAttnProcessor2_0,
)
from test_dit_common import (
    assert_unpatched,
    capturing_matchings,
    compiled_like_eager,
    destinations,
    recording,
    run,
    sd3_inputs,
    tiny_sd3,
)

import tofu_sd
from tofu_sd.merge import MODES, match, reduce_tokens, restore_tokens
from tofu_sd.plans import plan_blocks


def test_default_and_chosen_blocks():
    model = tiny_sd3(num_layers=6, dual_attention_layers=(0, 1))
    tofu_sd.apply(model)
    blocks = tofu_sd.patched_blocks(model)
    assert [b.name for b in blocks] == [f"transformer_blocks.{i}" for i in range(6)]
    assert "".join(b.letter for b in blocks) == "MMMMMM"
    # SD3.5's image-only attn2 is patched in the dual-attention blocks, with the block's matching.
    for i in range(6):
        block = model.transformer_blocks[i]
        assert block.attn._diffusers_hook.get_hook("tofu_sd.reduce") is not None
        assert (block.attn2 is not None) == (i < 2)
        if block.attn2 is not None:
            assert block.attn2._diffusers_hook.get_hook("tofu_sd.reduce") is not None
    tofu_sd.apply(model, blocks="1-2,5", schedule="PAM")
    assert [(b.name, b.letter) for b in tofu_sd.patched_blocks(model)] == [
        ("transformer_blocks.1", "P"), ("transformer_blocks.2", "A"), ("transformer_blocks.5", "M"),
    ]  # fmt: skip
    assert "_diffusers_hook" not in model.transformer_blocks[0].__dict__  # the earlier patch is gone
    assert tofu_sd.get_state(model).config.blocks == "1-2,5"


def token_counts(model, inputs):
    """Per block: tokens reaching attn's image / text projections, attn2's, and the feed-forwards."""
    modules = {}
    for i, block in enumerate(model.transformer_blocks):
        modules[(i, "image")] = block.attn.to_q
        modules[(i, "text")] = block.attn.add_q_proj
        modules[(i, "ff")] = block.ff
        if block.attn2 is not None:
            modules[(i, "attn2")] = block.attn2.to_q
        if block.ff_context is not None:
            modules[(i, "ff_context")] = block.ff_context
    with recording(modules) as seen:
        run(model, inputs)
    return {key: [args[0].shape[1] for args, _ in calls] for key, calls in seen.items()}


@pytest.mark.parametrize(
    "patch_size,height,width", [(2, 16, 12), (2, 10, 14), (1, 7, 5), (2, 11, 9)]  # (11, 9): PatchEmbed floors
)
def test_only_image_tokens_of_patched_attention_are_reduced(patch_size, height, width):
    model = tiny_sd3(num_layers=3, patch_size=patch_size, dual_attention_layers=(0,))
    inputs = sd3_inputs(model, height=height, width=width, text=5)
    tofu_sd.apply(model, ratio=0.5, blocks=(0, 2))
    n = (height // patch_size) * (width // patch_size)
    counts = token_counts(model, inputs)
    for (i, part), seen in counts.items():
        expected = n - int(n * 0.5) if part in ("image", "attn2") and i in (0, 2) else (5 if "text" in part or part == "ff_context" else n)
        assert seen == [expected], (i, part)


def test_text_stream_reaches_attention_untouched():
    model = tiny_sd3(num_layers=3, dual_attention_layers=(0,))
    inputs = sd3_inputs(model)
    reference_text = {}
    with recording({i: b.attn.add_q_proj for i, b in enumerate(model.transformer_blocks)}) as seen:
        run(model, inputs)
    reference_text = {i: calls[0][0][0] for i, calls in seen.items()}
    tofu_sd.apply(model, ratio=0.5)
    attn = {i: b.attn for i, b in enumerate(model.transformer_blocks)}
    proj = {i: b.attn.add_q_proj for i, b in enumerate(model.transformer_blocks)}
    with recording(attn) as given, recording(proj) as reached:
        run(model, inputs)
    for i in attn:
        (_, kwargs), ((text,), _) = given[i][0], reached[i][0]
        assert torch.equal(text, kwargs["encoder_hidden_states"])  # bit for bit what the block passed
    assert torch.equal(reached[0][0][0][0], reference_text[0])  # the first block: as in the unpatched model
    assert not torch.equal(reached[2][0][0][0], reference_text[2])  # later: text attended to fewer image tokens


def block_by_hand(block, m, mode, hidden_states, encoder_hidden_states, temb):
    """A JointTransformerBlock's forward written out, with the image tokens reduced before attn (and attn2) and
    restored after, calling the attention processors directly (no hook involved)."""
    if block.use_dual_attention:
        nx, gate_msa, shift_mlp, scale_mlp, gate_mlp, nx2, gate_msa2 = block.norm1(hidden_states, emb=temb)
    else:
        nx, gate_msa, shift_mlp, scale_mlp, gate_mlp = block.norm1(hidden_states, emb=temb)
    if block.context_pre_only:
        nc = block.norm1_context(encoder_hidden_states, temb)
    else:
        nc, c_gate_msa, c_shift_mlp, c_scale_mlp, c_gate_mlp = block.norm1_context(encoder_hidden_states, emb=temb)
    image, text = block.attn.processor(block.attn, reduce_tokens(nx, m, mode), nc)
    x = hidden_states + gate_msa.unsqueeze(1) * restore_tokens(image, m)
    if block.use_dual_attention:
        x = x + gate_msa2.unsqueeze(1) * restore_tokens(block.attn2.processor(block.attn2, reduce_tokens(nx2, m, mode)), m)
    nx = block.norm2(x) * (1 + scale_mlp[:, None]) + shift_mlp[:, None]
    x = x + gate_mlp.unsqueeze(1) * block.ff(nx)
    if block.context_pre_only:
        return None, x
    c = encoder_hidden_states + c_gate_msa.unsqueeze(1) * text
    nc = block.norm2_context(c) * (1 + c_scale_mlp[:, None]) + c_shift_mlp[:, None]
    return c + c_gate_mlp.unsqueeze(1) * block.ff_context(nc), x


@pytest.mark.parametrize("matching", ["global", "local"])
@pytest.mark.parametrize("letter", ["P", "A", "M"])
@pytest.mark.parametrize("index", [0, 2])  # 0: SD3.5 dual attention; 2: the last, context_pre_only block
def test_block_equals_hand_computation(index, letter, matching):
    model = tiny_sd3(num_layers=3, dual_attention_layers=(0,))
    inputs = sd3_inputs(model, height=16, width=10)  # an 8 x 5 grid: a leftover column of tokens
    tofu_sd.apply(model, ratio=0.4, schedule=letter, use_rand=False, matching=matching, sx=2, sy=2)
    block = model.transformer_blocks[index]
    with recording({"in": block}) as given, recording({"out": block}, "post") as returned, capturing_matchings(model) as used:
        run(model, inputs)
    _, kwargs = given["in"][0]
    x = kwargs["hidden_states"]
    # The matching, independently: the same plan on the block's input image tokens.
    plan = plan_blocks(8, 5, 2, 2, 2, int(40 * 0.4), blocks=3, local_window=3 if matching == "local" else None)[index]
    m = match(x, plan)
    assert torch.equal(m.keep_rows, used[f"transformer_blocks.{index}"][0].keep_rows)
    with torch.no_grad():
        text, image = block_by_hand(block, m, MODES[letter], x, kwargs["encoder_hidden_states"], kwargs["temb"])
    got_text, got_image = returned["out"][0]
    torch.testing.assert_close(got_image, image, rtol=0, atol=1e-6)
    if text is None:
        assert got_text is None
    else:
        torch.testing.assert_close(got_text, text, rtol=0, atol=1e-6)


def test_letters_give_different_outputs():
    model = tiny_sd3(num_layers=2)
    inputs = sd3_inputs(model)
    outputs = {}
    for letter in "PAM":
        tofu_sd.apply(model, ratio=0.5, schedule=letter)
        outputs[letter] = run(model, inputs)
    tofu_sd.remove(model)
    full = run(model, inputs)
    for a, b in [("P", "A"), ("A", "M"), ("P", "M")]:
        assert not torch.allclose(outputs[a], outputs[b], atol=1e-6), (a, b)
    for out in outputs.values():
        assert not torch.allclose(out, full, atol=1e-6)


def test_cfg_halves_share_one_partition():
    model = tiny_sd3(num_layers=2)
    inputs = sd3_inputs(model, batch=2, timestep=700.0)
    tofu_sd.apply(model, ratio=0.5, use_rand=True, seed=3)
    with capturing_matchings(model) as batched:
        run(model, inputs)
    for name, (m,) in batched.items():
        dst = destinations(m)
        assert torch.equal(dst[0], dst[1]), name  # the same destination per cell in both halves
        assert not torch.equal(m.keep_idx[0], m.keep_idx[1])  # ... while each half is matched on its own tokens
    # A conditional and an unconditional call made apart, at the same timestep, get that partition too.
    for half in range(2):
        single = {k: v[half : half + 1] for k, v in inputs.items()}
        with capturing_matchings(model) as alone:
            run(model, single)
        for name, (m,) in alone.items():
            assert torch.equal(destinations(m)[0], destinations(batched[name][0])[half])
            assert torch.equal(m.keep_idx[0], batched[name][0].keep_idx[half])
    # Another timestep or another block: another partition.
    later = dict(inputs, timestep=torch.full((2,), 600.0))
    with capturing_matchings(model) as other:
        run(model, later)
    first, second = (destinations(batched[n][0])[0] for n in batched)
    assert not torch.equal(destinations(other["transformer_blocks.0"][0])[0], first)
    assert not torch.equal(first, second)


def test_identical_cfg_halves_give_identical_outputs():
    model = tiny_sd3(num_layers=2)
    inputs = sd3_inputs(model, batch=1)
    doubled = {k: torch.cat([v, v]) for k, v in inputs.items()}
    tofu_sd.apply(model, ratio=0.5)
    out = run(model, doubled)
    torch.testing.assert_close(out[0], out[1], rtol=0, atol=1e-6)
    torch.testing.assert_close(out[:1], run(model, inputs), rtol=0, atol=1e-5)


def test_rematch_every_reuses_matchings_between_steps():
    model = tiny_sd3(num_layers=2)
    steps = [1000.0, 1000.0, 900.0, 900.0, 800.0]  # conditional and unconditional calls, three steps
    calls = [sd3_inputs(model, batch=1, timestep=t, seed=i) for i, t in enumerate(steps)]
    tofu_sd.apply(model, ratio=0.5, rematch_every=2)
    seen = []
    for inputs in calls:
        with capturing_matchings(model) as used:
            run(model, inputs)
        seen.append(used["transformer_blocks.1"][0])
    assert seen[2] is seen[0] and seen[3] is seen[1]  # step 1 reuses step 0's, per position in the step
    assert seen[1] is not seen[0] and seen[4] is not seen[0]  # the second call and step 2 match anew
    tofu_sd.apply(model, ratio=0.5, rematch_every=1)
    with capturing_matchings(model) as used:
        run(model, calls[2])
    assert not torch.equal(used["transformer_blocks.1"][0].keep_rows, seen[0].keep_rows)


def test_ratio_zero_is_a_no_op_and_remove_is_exact():
    model = tiny_sd3(num_layers=3, dual_attention_layers=(0,))
    inputs = sd3_inputs(model, height=10, width=14)
    full = run(model, inputs)
    tofu_sd.apply(model, ratio=0)
    assert len(tofu_sd.patched_blocks(model)) == 3
    assert not model._forward_pre_hooks and all("_diffusers_hook" not in m.__dict__ for m in model.modules())
    assert torch.equal(run(model, inputs), full)
    tofu_sd.apply(model, ratio=0.5)
    assert not torch.allclose(run(model, inputs), full, atol=1e-6)
    tofu_sd.remove(model)
    assert_unpatched(model)
    assert torch.equal(run(model, inputs), full)
    assert tofu_sd.remove(model) is model  # a no-op now


def test_unsupported_options_are_refused():
    model = tiny_sd3(num_layers=2)
    model.transformer_blocks[1].attn.set_processor(PAGJointAttnProcessor2_0())
    with pytest.raises(ValueError, match="transformer_blocks.1.attn: its attention processor PAGJointAttnProcessor2_0"):
        tofu_sd.apply(model)
    tofu_sd.apply(model, blocks=(0,))  # the other block is fine
    model.transformer_blocks[0].attn.set_processor(AttnProcessor2_0())
    with pytest.raises(ValueError, match="AttnProcessor2_0 is not one of"):
        tofu_sd.apply(model)
    assert tofu_sd.patched_blocks(model)[0].name == "transformer_blocks.0"  # a refused apply leaves the old patch


def test_torch_compile_without_graph_breaks():
    model = tiny_sd3(num_layers=2, dual_attention_layers=(0,))
    inputs = sd3_inputs(model, height=10, width=14)
    full = run(model, inputs)
    compiled, _ = compiled_like_eager(model, inputs, ratio=0.5, schedule="PM")
    tofu_sd.remove(compiled)
    torch.testing.assert_close(run(compiled, inputs), full, rtol=1e-4, atol=1e-5)
