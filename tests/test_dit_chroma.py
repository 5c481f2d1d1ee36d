"""Token Fusion on a tiny Chroma transformer: its double- and single-stream blocks patched, the grid from img_ids,
rotary positions that follow their tokens (against a per-batch-element reference, with a mutation check), text
untouched, the attention mask cut to the kept tokens (against a per-element reference, against the same call
without the padded text tokens, and ratio 0 against the unpatched model), CFG, compile, remove, ChromaPipeline end
to end; unsupported inputs refused."""

import pytest

pytest.importorskip("diffusers", minversion="0.42.1")  # written and tested on it; older ones are refused

import torch
from diffusers import ChromaTransformer2DModel
from diffusers.models.attention_processor import AttnProcessor2_0
from test_dit_common import (
    assert_unpatched,
    capturing_matchings,
    check_ratio_zero_then_compiled,
    destinations,
    grid_ids,
    recording,
    run,
)
from test_dit_flux2 import (
    check_rotary_follows_tokens,
    check_single_rotary_follows_tokens,
)

import tofu_sd
from tofu_sd.merge import reduce_tokens, restore_tokens
from tofu_sd.reducing import cut_joint_mask


def tiny_chroma(num_layers=2, num_single_layers=2, seed=0):
    """A Chroma transformer: 2 heads of 16 (rotary axes 4 + 6 + 6), 4 input channels, a one-layer approximator."""
    torch.manual_seed(seed)
    return ChromaTransformer2DModel(
        patch_size=1, in_channels=4, num_layers=num_layers, num_single_layers=num_single_layers,
        attention_head_dim=16, num_attention_heads=2, joint_attention_dim=32, axes_dims_rope=(4, 6, 6),
        approximator_num_channels=16, approximator_hidden_dim=32, approximator_layers=1
    ).eval()  # fmt: skip


def chroma_inputs(model, batch=2, h=6, w=4, text=5, timestep=0.5, seed=1, padding=None, dtype=torch.bool):
    """Keyword arguments of a Chroma call on an ``h x w`` token grid (timesteps in [0, 1], ids ``(0, row, col)``
    row-major, as ChromaPipeline builds them). ``padding``: per batch element, how many of the text tokens are
    padding, masked by an ``attention_mask`` over ``[text, image]`` (of ``dtype``) as ChromaPipeline's; ``None``:
    no mask."""
    g = torch.Generator().manual_seed(seed)
    inputs = {
        "hidden_states": torch.randn(batch, h * w, model.config.in_channels, generator=g),
        "encoder_hidden_states": torch.randn(batch, text, model.config.joint_attention_dim, generator=g),
        "timestep": torch.full((batch,), float(timestep)),
        "img_ids": grid_ids(h, w),
        "txt_ids": torch.zeros(text, 3),
    }
    if padding is not None:
        mask = torch.ones(batch, text + h * w, dtype=torch.bool)
        for b, pad in enumerate(padding):
            mask[b, text - pad : text] = False
        inputs["attention_mask"] = mask.to(dtype)
    return inputs


def test_default_blocks_are_double_then_single_stream_in_order():
    model = tiny_chroma(num_layers=3, num_single_layers=2)
    tofu_sd.apply(model)
    assert [(b.name, b.letter) for b in tofu_sd.patched_blocks(model)] == [
        (f"transformer_blocks.{i}", "M") for i in range(3)
    ] + [(f"single_transformer_blocks.{i}", "M") for i in range(2)]
    tofu_sd.apply(model, blocks="1,4")
    assert [b.name for b in tofu_sd.patched_blocks(model)] == ["transformer_blocks.1", "single_transformer_blocks.1"]


@pytest.mark.parametrize("batch,h,w", [(2, 6, 4), (1, 5, 7), (2, 3, 8), (1, 7, 7)])
def test_token_counts_and_text_untouched(batch, h, w):
    model = tiny_chroma()
    inputs = chroma_inputs(model, batch=batch, h=h, w=w, text=5, padding=[2] * batch)
    tofu_sd.apply(model, ratio=0.5, blocks=(0, 2))
    n, T = h * w, 5
    kept = n - int(n * 0.5)
    (b0, b1), (s0, s1) = model.transformer_blocks, model.single_transformer_blocks
    counts = {
        "image": b0.attn.to_q, "key": b0.attn.to_v, "text": b0.attn.add_q_proj, "ff": b0.ff,
        "unpatched": b1.attn.to_q, "single": s0.attn.to_q, "single_mlp": s0.proj_mlp, "single_unpatched": s1.attn.to_q,
    }  # fmt: skip
    with recording(counts) as seen, recording({"attn": b0.attn, "s0": s0.attn}) as given:
        run(model, inputs)
    got = {key: [args[0].shape[:2] for args, _ in calls] for key, calls in seen.items()}
    assert got == {
        "image": [(batch, kept)], "key": [(batch, kept)], "text": [(batch, T)], "ff": [(batch, n)],
        "unpatched": [(batch, n)], "single": [(batch, T + kept)], "single_mlp": [(batch, T + n)],
        "single_unpatched": [(batch, T + n)],
    }  # fmt: skip
    ((_, kwargs),) = given["attn"]
    assert torch.equal(seen["text"][0][0][0], kwargs["encoder_hidden_states"])  # text, bit for bit
    ((_, kwargs),) = given["s0"]
    assert torch.equal(seen["single"][0][0][0][:, :T], kwargs["hidden_states"][:, :T])


@pytest.mark.parametrize("letter", ["P", "M"])
def test_rotary_positions_follow_their_tokens(letter):
    model = tiny_chroma()
    check_rotary_follows_tokens(model, chroma_inputs(model, batch=3, h=5, w=6, text=4), letter)


@pytest.mark.parametrize("letter", ["P", "M"])
def test_single_stream_rotary_positions_follow_their_tokens(letter):
    model = tiny_chroma()
    call = lambda attn, tokens, table: attn.processor(attn, tokens, None, None, table)
    check_single_rotary_follows_tokens(model, chroma_inputs(model, batch=3, h=5, w=6, text=4), letter, call)


def test_cut_joint_mask_takes_the_kept_tokens_rows_and_columns():
    """Against a loop over batch elements and reduced slots; for the layouts attention broadcasts."""
    T, N, B = 3, 8, 2
    model = tiny_chroma()
    tofu_sd.apply(model, ratio=0.5)
    with capturing_matchings(model) as used:
        run(model, chroma_inputs(model, batch=B, h=2, w=4, text=T))
    m = used["transformer_blocks.0"][0]
    rows = [[*range(T), *(T + m.keep_idx[b]).tolist()] for b in range(B)]
    assert rows[0] != rows[1]  # per batch element positions: the case that matters
    g = torch.Generator().manual_seed(0)
    for shape in [(B, 1, T + N, T + N), (1, 1, T + N, T + N), (B, 2, T + N, T + N), (B, 1, 1, T + N)]:
        mask = torch.randn(shape, generator=g)
        got = cut_joint_mask(mask, T, m)
        for b in range(B):
            full = mask[b if shape[0] == B else 0]
            want = full[:, rows[b]][:, :, rows[b]] if shape[2] > 1 else full[:, :, rows[b]]
            assert torch.equal(got[b], want), shape
    assert cut_joint_mask(torch.ones(B, T + N), T, m) is None  # a mask laid out otherwise
    assert cut_joint_mask(torch.ones(B, 1, T + N + 1, T + N + 1), T, m) is None


def reference_masked_double(attn, x, text, emb, vectors, m, mode):
    """A double-stream attention on reduced image tokens, one batch element at a time, with the rotary rows of its
    kept tokens' positions and the mask vector ``vectors[b]`` over ``[text, reduced image]`` (made a mask per query
    and key as the block makes it), through the processor itself; image restored, text as computed."""
    cos, sin = emb
    T = text.shape[1]
    reduced = reduce_tokens(x, m, mode)
    images, texts = [], []
    for b in range(x.shape[0]):
        rows = torch.cat([torch.arange(T), T + m.keep_idx[b]])
        v = vectors[b : b + 1]
        pairs = v[:, None, None, :] * v[:, None, :, None]
        image, txt = attn.processor(attn, reduced[b : b + 1], text[b : b + 1], pairs, (cos[rows], sin[rows]))
        images.append(image)
        texts.append(txt)
    return restore_tokens(torch.cat(images), m), torch.cat(texts)


@pytest.mark.parametrize("dtype", [torch.bool, torch.float32])
def test_the_attention_mask_follows_the_kept_tokens(dtype):
    """A boolean mask and ChromaPipeline's 0 / 1 float one, with image tokens masked too: the mask of each kept
    token's own position, not that of the first T + N - r positions (the slice that is right only while the image
    part of the mask is uniform)."""
    model = tiny_chroma()
    T, n = 4, 30
    inputs = chroma_inputs(model, batch=3, h=5, w=6, text=T, padding=[1, 0, 2], dtype=dtype)
    mask = inputs["attention_mask"].clone()
    mask[:, T + torch.arange(0, n, 4)] = 0  # every fourth image token
    inputs["attention_mask"] = mask
    tofu_sd.apply(model, ratio=0.5, schedule="M")
    attn = model.transformer_blocks[1].attn
    with recording({"a": attn}) as given, recording({"a": attn}, "post") as returned, capturing_matchings(model) as used:
        run(model, inputs)
    (_, kwargs), out, m = given["a"][0], returned["a"][0], used["transformer_blocks.1"][0]
    call = (attn, kwargs["hidden_states"], kwargs["encoder_hidden_states"], kwargs["image_rotary_emb"])
    own = torch.stack([mask[b, torch.cat([torch.arange(T), T + m.keep_idx[b]])] for b in range(3)])
    sliced = mask[:, : T + n - m.r]
    assert not torch.equal(own, sliced)
    with torch.no_grad():
        expected = reference_masked_double(*call, own, m, "mlerp")
        wrong = reference_masked_double(*call, sliced, m, "mlerp")
    for got, want in zip(out, expected):
        torch.testing.assert_close(got, want, rtol=0, atol=2e-6)
    assert not torch.allclose(out[0], wrong[0], atol=1e-4)


def test_padded_text_tokens_are_masked_as_if_they_were_not_there():
    """With its padding masked (a boolean mask), element 1's output equals that of the same call on element 1
    alone without its padded text tokens, in every patched block (the single-stream ones' masks are cut too)."""
    model = tiny_chroma()
    T, pad = 6, 2
    inputs = chroma_inputs(model, batch=2, h=5, w=6, text=T, padding=[0, pad])
    tofu_sd.apply(model, ratio=0.5)
    with recording({"s1": model.single_transformer_blocks[1].attn.to_q}) as seen:
        padded = run(model, inputs)
    assert seen["s1"][0][0][0].shape[1] == T + 30 - 15  # reduced, with its mask
    alone = dict(inputs, attention_mask=None, txt_ids=inputs["txt_ids"][: T - pad])
    for key in ("hidden_states", "timestep"):
        alone[key] = inputs[key][1:]
    alone["encoder_hidden_states"] = inputs["encoder_hidden_states"][1:, : T - pad]
    torch.testing.assert_close(padded[1:], run(model, alone), rtol=0, atol=1e-5)
    # Unmasked, the padded tokens change the output: the comparison can fail.
    assert not torch.allclose(run(model, dict(inputs, attention_mask=None))[1:], padded[1:], atol=1e-3)


@pytest.mark.parametrize("dtype", [torch.bool, torch.float32])
def test_ratio_zero_with_a_mask_is_the_unpatched_model(dtype):
    model = tiny_chroma()
    inputs = chroma_inputs(model, h=5, w=4, padding=[2, 1], dtype=dtype)
    full = run(model, inputs)
    tofu_sd.apply(model, ratio=0)
    assert torch.equal(run(model, inputs), full)


def test_cfg_batch_and_calls_share_one_partition():
    model = tiny_chroma()
    tofu_sd.apply(model, ratio=0.5)
    with capturing_matchings(model) as used:
        run(model, chroma_inputs(model, batch=2, timestep=0.8))
    assert len(used) == 4
    for name, (m,) in used.items():
        assert torch.equal(destinations(m)[0], destinations(m)[1]), name
    dsts = []
    for seed, t in ((1, 0.8), (2, 0.8), (1, 0.79)):  # scaled x 1000 as the model scales it: 0.79 keys another
        with capturing_matchings(model) as used:
            run(model, chroma_inputs(model, batch=1, timestep=t, seed=seed))
        dsts.append(destinations(used["single_transformer_blocks.1"][0]))
    assert torch.equal(dsts[0], dsts[1]) and not torch.equal(dsts[0], dsts[2])


def test_ratio_zero_remove_and_compile_with_a_mask():
    model = tiny_chroma()
    inputs = chroma_inputs(model, h=5, w=4, padding=[2, 0])
    compiled, full = check_ratio_zero_then_compiled(model, inputs)
    tofu_sd.remove(compiled)
    assert_unpatched(model)
    assert torch.equal(run(model, inputs), full)


def test_ids_that_are_no_grid_are_refused_at_the_call():
    model = tiny_chroma()
    inputs = chroma_inputs(model, h=4, w=4, text=5, padding=[2, 0])
    tofu_sd.apply(model, ratio=0.5)
    expected = run(model, inputs)
    shuffled = grid_ids(2, 8)[torch.randperm(16, generator=torch.Generator().manual_seed(0))]
    with pytest.raises(ValueError, match="takes the token grid from `img_ids`.*shape \\(16, 3\\) for 16 tokens"):
        run(model, dict(inputs, img_ids=shuffled))
    assert torch.equal(run(model, inputs), expected)  # the failed call left no state behind


def test_unsupported_options_are_refused():
    model = tiny_chroma()
    model.single_transformer_blocks[0].attn.set_processor(AttnProcessor2_0())
    with pytest.raises(ValueError, match="single_transformer_blocks.0.attn: its attention processor AttnProcessor2_0"):
        tofu_sd.apply(model)
    assert_unpatched(model)


def test_chroma_pipeline_end_to_end():
    """ChromaPipeline (given prompt embeddings with padding, no text encoder, tokenizer or VAE) passes its
    attention mask in every call: reduced in every block, and bit-identical after remove."""
    from diffusers import ChromaPipeline, FlowMatchEulerDiscreteScheduler

    model = tiny_chroma()
    pipe = ChromaPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(), vae=None, text_encoder=None, tokenizer=None, transformer=model
    )
    call = {
        "prompt_embeds": torch.randn(1, 5, 32, generator=torch.Generator().manual_seed(0)),
        "prompt_attention_mask": torch.tensor([[1.0, 1.0, 1.0, 1.0, 0.0]]), "guidance_scale": 1.0,
        "height": 48, "width": 32, "num_inference_steps": 2, "output_type": "latent",
    }  # fmt: skip

    def generate():
        with torch.no_grad():
            return pipe(**call, generator=torch.Generator().manual_seed(1)).images

    full = generate()
    tofu_sd.apply(pipe, ratio=0.5)
    counts = {"d0": model.transformer_blocks[0].attn.to_q, "s1": model.single_transformer_blocks[1].attn.to_q}
    with recording(counts) as seen, recording({"a": model.transformer_blocks[0].attn}) as given:
        reduced = generate()
    assert reduced.shape == full.shape and not torch.allclose(reduced, full, atol=1e-6)
    # 48 x 32 pixels: a 6 x 4 latent, packed 2 x 2: a 3 x 2 grid of 6 tokens; 3 kept, after 5 text tokens.
    assert [args[0].shape[1] for args, _ in seen["d0"]] == [3, 3]
    assert [args[0].shape[1] for args, _ in seen["s1"]] == [5 + 3, 5 + 3]
    # Each call carried the pipeline's mask over all 5 + 6 tokens (a masked call the hook could not cut would
    # have run unreduced).
    assert [kwargs["attention_mask"].shape for _, kwargs in given["a"]] == [(1, 1, 11, 11)] * 2
    tofu_sd.remove(pipe)
    assert torch.equal(generate(), full)


def test_compile_repeated_blocks_with_a_mask():
    model = tiny_chroma()
    inputs = chroma_inputs(model, h=5, w=5, padding=[2, 0])
    full = run(model, inputs)
    tofu_sd.apply(model, ratio=0.5)
    eager = run(model, inputs)
    model.compile_repeated_blocks(backend="aot_eager", fullgraph=True)
    torch.testing.assert_close(run(model, inputs), eager, rtol=1e-4, atol=1e-5)
    tofu_sd.remove(model)
    torch.testing.assert_close(run(model, inputs), full, rtol=1e-5, atol=1e-6)
