"""Token Fusion on a tiny FLUX.2 transformer: its double- and single-stream blocks patched (the single-stream ones
matched on the image tokens at the end of their [text, image] input), the grid from 4-column img_ids, rotary
positions that follow their tokens (against a per-batch-element reference, with a mutation check), text untouched,
CFG, ratio 0, compile, remove, gradient checkpointing, refusals."""

import pytest

pytest.importorskip("diffusers", minversion="0.42.1")  # written and tested on it; older ones are refused


import pytest
import torch
from diffusers import Flux2Transformer2DModel
from diffusers.models.transformers.transformer_flux2 import (
    Flux2KVAttnProcessor,
    Flux2KVParallelSelfAttnProcessor,
)
from test_dit_common import (
    ShiftedPositions,
    assert_unpatched,
    capturing_matchings,
    check_ratio_zero_then_compiled,
    destinations,
    recording,
    run,
)

import tofu_sd
from tofu_sd.merge import MODES, match, reduce_tokens, restore_tokens
from tofu_sd.plans import plan_blocks


def tiny_flux2(num_layers=2, num_single_layers=2, seed=0):
    """A FLUX.2 transformer: 2 heads of 16 (rotary axes 4 x 4: t, row, col, layer), 4 input channels."""
    torch.manual_seed(seed)
    return Flux2Transformer2DModel(
        patch_size=1, in_channels=4, num_layers=num_layers, num_single_layers=num_single_layers,
        attention_head_dim=16, num_attention_heads=2, joint_attention_dim=32, timestep_guidance_channels=16,
        mlp_ratio=2.0, axes_dims_rope=(4, 4, 4, 4)
    ).eval()  # fmt: skip


def flux2_ids(h, w, t=0):
    """``img_ids`` of an ``h x w`` token grid as Flux2Pipeline builds them: ``(t, row, col, 0)``, row-major."""
    ids = torch.zeros(h * w, 4)
    ids[:, 0] = t
    ids[:, 1] = torch.arange(h * w) // w
    ids[:, 2] = torch.arange(h * w) % w
    return ids


def flux2_inputs(model, batch=2, h=6, w=4, text=5, timestep=0.5, seed=1):
    """Keyword arguments of a FLUX.2 call as Flux2Pipeline passes them (batched 4-column ids, timesteps in
    [0, 1], a guidance scale)."""
    g = torch.Generator().manual_seed(seed)
    txt_ids = torch.zeros(text, 4)
    txt_ids[:, 3] = torch.arange(text)
    return {
        "hidden_states": torch.randn(batch, h * w, model.config.in_channels, generator=g),
        "encoder_hidden_states": torch.randn(batch, text, model.config.joint_attention_dim, generator=g),
        "timestep": torch.full((batch,), float(timestep)),
        "img_ids": flux2_ids(h, w).expand(batch, -1, -1),
        "txt_ids": txt_ids.expand(batch, -1, -1),
        "guidance": torch.full((batch,), 4.0),
    }


def test_default_blocks_are_double_then_single_stream_in_order():
    model = tiny_flux2(num_layers=3, num_single_layers=2)
    tofu_sd.apply(model)
    assert [(b.name, b.letter) for b in tofu_sd.patched_blocks(model)] == [
        (f"transformer_blocks.{i}", "M") for i in range(3)
    ] + [(f"single_transformer_blocks.{i}", "M") for i in range(2)]
    tofu_sd.apply(model, blocks="0,3")
    assert [b.name for b in tofu_sd.patched_blocks(model)] == ["transformer_blocks.0", "single_transformer_blocks.0"]
    with pytest.raises(ValueError, match="names block\\(s\\) 5, but the model has 5 patchable blocks"):
        tofu_sd.apply(model, blocks="5")


@pytest.mark.parametrize("batch,h,w", [(2, 6, 4), (1, 5, 7), (2, 3, 8), (1, 7, 7)])
def test_token_counts_and_text_untouched(batch, h, w):
    model = tiny_flux2()
    inputs = flux2_inputs(model, batch=batch, h=h, w=w, text=5)
    tofu_sd.apply(model, ratio=0.5, blocks=(0,))
    n, T = h * w, 5
    kept = n - int(n * 0.5)
    b0, b1 = model.transformer_blocks
    counts = {
        "image": b0.attn.to_q, "key": b0.attn.to_v, "text": b0.attn.add_q_proj, "ff": b0.ff.linear_in,
        "unpatched": b1.attn.to_q, "single": model.single_transformer_blocks[0].attn.to_qkv_mlp_proj
    }  # fmt: skip
    with recording(counts) as seen, recording({"attn": b0.attn}) as given:
        run(model, inputs)
    got = {key: [args[0].shape[:2] for args, _ in calls] for key, calls in seen.items()}
    assert got == {
        "image": [(batch, kept)], "key": [(batch, kept)], "text": [(batch, T)], "ff": [(batch, n)],
        "unpatched": [(batch, n)], "single": [(batch, T + n)]
    }  # fmt: skip
    # Text tokens, bit for bit as the block passed them to its attention.
    ((_, kwargs),) = given["attn"]
    assert torch.equal(seen["text"][0][0][0], kwargs["encoder_hidden_states"])


@pytest.mark.parametrize("batch,h,w", [(2, 6, 4), (1, 5, 7), (2, 3, 8)])
def test_single_stream_token_counts_text_untouched_and_matching_on_the_image_tokens(batch, h, w):
    """The single-stream block's input is [text, image]: only its last h * w tokens are matched and reduced."""
    model = tiny_flux2()
    inputs = flux2_inputs(model, batch=batch, h=h, w=w, text=5)
    tofu_sd.apply(model, ratio=0.5, blocks=(2,), use_rand=False)
    n, T = h * w, 5
    kept = n - int(n * 0.5)
    s0, s1 = model.single_transformer_blocks
    counts = {"s0": s0.attn.to_qkv_mlp_proj, "s0_out": s0.attn.to_out, "s1": s1.attn.to_qkv_mlp_proj}
    with (
        recording(counts) as seen,
        recording({"a": s0.attn, "b": s0}) as given,
        capturing_matchings(model) as used,
    ):
        run(model, inputs)
    got = {key: [args[0].shape[:2] for args, _ in calls] for key, calls in seen.items()}
    assert got == {"s0": [(batch, T + kept)], "s0_out": [(batch, T + kept)], "s1": [(batch, T + n)]}
    x = given["a"][0][1]["hidden_states"]
    assert torch.equal(seen["s0"][0][0][0][:, :T], x[:, :T])  # text, bit for bit
    (m,) = used["single_transformer_blocks.0"]
    block_input = given["b"][0][1]["hidden_states"]
    assert block_input.shape[1] == T + n and m.num_tokens == n
    expected = match(block_input[:, T:], plan_blocks(h, w, 2, 2, batch, int(n * 0.5))[0])
    assert torch.equal(m.keep_rows, expected.keep_rows) and torch.equal(m.dst_idx, expected.dst_idx)
    wrong = match(block_input[:, :n], plan_blocks(h, w, 2, 2, batch, int(n * 0.5))[0])  # text included
    assert not (torch.equal(m.keep_rows, wrong.keep_rows) and torch.equal(m.dst_idx, wrong.dst_idx))


def test_grid_comes_from_columns_1_and_2_of_the_ids():
    model = tiny_flux2()
    inputs = flux2_inputs(model, h=7, w=5)
    inputs["img_ids"] = inputs["img_ids"].clone()
    inputs["img_ids"][..., 0] = 3  # t and layer columns are no part of the grid
    inputs["img_ids"][..., 3] = 1
    tofu_sd.apply(model, ratio=0.5, use_rand=False)
    with recording({"b": model.transformer_blocks[1]}) as given, capturing_matchings(model) as used:
        run(model, inputs)
    x = given["b"][0][1]["hidden_states"]
    for h, w in [(7, 5), (5, 7)]:  # 7 x 5 and 5 x 7 have the same tokens, not the same cells
        m = match(x, plan_blocks(h, w, 2, 2, 2, int(35 * 0.5), blocks=2)[1])
        assert torch.equal(m.keep_rows, used["transformer_blocks.1"][0].keep_rows) == ((h, w) == (7, 5))


def test_reference_images_and_kv_cache_mode_are_refused_at_the_call():
    model = tiny_flux2()
    inputs = flux2_inputs(model, h=4, w=4)
    tofu_sd.apply(model, ratio=0.5)
    expected = run(model, inputs)
    # Flux2Pipeline's editing: a reference image's tokens (ids at t=10) appended to the image tokens.
    ids = torch.cat([flux2_ids(4, 4), flux2_ids(4, 4, t=10)]).expand(2, -1, -1)
    edit = dict(inputs, hidden_states=inputs["hidden_states"].repeat(1, 2, 1), img_ids=ids)
    with pytest.raises(ValueError, match="takes the token grid from `img_ids`.*shape \\(2, 32, 4\\) for 32 tokens"):
        run(model, edit)
    with pytest.raises(ValueError, match="kv_cache_mode='cached'"):
        run(model, dict(inputs, kv_cache_mode="cached"))
    assert torch.equal(run(model, inputs), expected)  # the failed calls left no state behind
    tofu_sd.remove(model)
    assert run(model, edit).shape == (2, 32, 4)  # which the unpatched model runs


def reference_double(attn, x, text, emb, m, mode):
    """A double-stream attention on reduced image tokens, one batch element at a time, each with the rows of the
    ``[text, image]`` rotary table at its own kept tokens' positions, through the processor itself; image restored,
    text as computed."""
    cos, sin = emb
    T = text.shape[1]
    reduced = reduce_tokens(x, m, mode)
    images, texts = [], []
    for b in range(x.shape[0]):
        pos = T + m.keep_idx[b]
        rows = torch.cat([torch.arange(T), pos])
        image, txt = attn.processor(attn, reduced[b : b + 1], text[b : b + 1], None, (cos[rows], sin[rows]))
        images.append(image)
        texts.append(txt)
    return restore_tokens(torch.cat(images), m), torch.cat(texts)



def check_rotary_follows_tokens(model, inputs, letter, name="transformer_blocks.1"):
    """The patched attention of block ``name`` against :func:`reference_double`, and not against the same with
    wrong rotary rows (:class:`Shifted`)."""
    tofu_sd.apply(model, ratio=0.5, schedule=letter)
    attn = model.get_submodule(name).attn
    with (
        recording({"a": attn}) as given,
        recording({"a": attn}, "post") as returned,
        capturing_matchings(model) as used,
    ):
        run(model, inputs)
    (_, kwargs), out, m = given["a"][0], returned["a"][0], used[name][0]
    emb = kwargs["image_rotary_emb"]
    assert emb[0].shape[0] == inputs["encoder_hidden_states"].shape[1] + m.num_tokens  # over [text, image]
    assert not torch.equal(m.keep_idx[0], m.keep_idx[1])  # per batch element positions: the case that matters
    call = (attn, kwargs["hidden_states"], kwargs["encoder_hidden_states"], emb)
    with torch.no_grad():
        expected = reference_double(*call, m, MODES[letter])
        wrong = reference_double(*call, ShiftedPositions(m), MODES[letter])
    for got, want in zip(out, expected):
        torch.testing.assert_close(got, want, rtol=0, atol=2e-6)
    assert not torch.allclose(out[0], wrong[0], atol=1e-4) and not torch.allclose(out[1], wrong[1], atol=1e-4)


@pytest.mark.parametrize("letter", ["P", "M"])
def test_rotary_positions_follow_their_tokens(letter):
    model = tiny_flux2()
    check_rotary_follows_tokens(model, flux2_inputs(model, batch=3, h=5, w=6, text=4), letter)


def reference_single(call, x, T, emb, m, mode):
    """A single-stream attention on ``[text, reduced image]``, one batch element at a time, each with the text's
    rotary rows and its own kept tokens' rows, through ``call(tokens, table)`` (the processor itself); the image
    part of the output restored."""
    cos, sin = emb
    reduced = reduce_tokens(x[:, T:], m, mode)
    outs = []
    for b in range(x.shape[0]):
        rows = torch.cat([torch.arange(T), T + m.keep_idx[b]])
        outs.append(call(torch.cat([x[b : b + 1, :T], reduced[b : b + 1]], 1), (cos[rows], sin[rows])))
    out = torch.cat(outs)
    return torch.cat([out[:, :T], restore_tokens(out[:, T:], m)], 1)


def check_single_rotary_follows_tokens(model, inputs, letter, call, name="single_transformer_blocks.0"):
    """The patched single-stream attention of block ``name`` against :func:`reference_single` (``call(attn,
    tokens, table)`` runs its processor), and not against the same with wrong rotary rows."""
    tofu_sd.apply(model, ratio=0.5, schedule=letter)
    attn = model.get_submodule(name).attn
    with (
        recording({"a": attn}) as given,
        recording({"a": attn}, "post") as returned,
        capturing_matchings(model) as used,
    ):
        run(model, inputs)
    (_, kwargs), out, m = given["a"][0], returned["a"][0], used[name][0]
    emb, x, T = kwargs["image_rotary_emb"], kwargs["hidden_states"], inputs["encoder_hidden_states"].shape[1]
    assert emb[0].shape[0] == x.shape[1] == T + m.num_tokens  # over [text, image]
    assert not torch.equal(m.keep_idx[0], m.keep_idx[1])  # per batch element positions: the case that matters
    run_call = lambda tokens, table: call(attn, tokens, table)
    with torch.no_grad():
        expected = reference_single(run_call, x, T, emb, m, MODES[letter])
        wrong = reference_single(run_call, x, T, emb, ShiftedPositions(m), MODES[letter])
    torch.testing.assert_close(out, expected, rtol=0, atol=2e-6)
    assert not torch.allclose(out, wrong, atol=1e-4)


@pytest.mark.parametrize("letter", ["P", "M"])
def test_single_stream_rotary_positions_follow_their_tokens(letter):
    model = tiny_flux2()
    inputs = flux2_inputs(model, batch=3, h=5, w=6, text=4)
    call = lambda attn, tokens, table: attn.processor(attn, tokens, None, table)
    check_single_rotary_follows_tokens(model, inputs, letter, call)


@pytest.mark.parametrize("reentrant", [False, True])
def test_single_stream_blocks_under_gradient_checkpointing(reentrant):
    """A checkpointed single-stream block's recomputation reduces with its forward's matching (kept under the
    block's whole [text, image] input): the gradients equal those without checkpointing."""
    from test_plugin_checkpointing import check

    model = tiny_flux2()
    check(model, flux2_inputs(model, h=4, w=6), reentrant, ratio=0.5, blocks="2,3")


def test_cfg_batch_and_calls_share_one_partition():
    model = tiny_flux2()
    tofu_sd.apply(model, ratio=0.5)
    with capturing_matchings(model) as used:
        run(model, flux2_inputs(model, batch=2, timestep=0.8))
    for name, (m,) in used.items():
        assert torch.equal(destinations(m)[0], destinations(m)[1]), name
    # Batch-1 calls at one timestep share the partition; timesteps in [0, 1] are scaled as the model scales them
    # (x 1000): 0.8 and 0.79 key other ones.
    dsts = []
    for seed, t in ((1, 0.8), (2, 0.8), (1, 0.79)):
        with capturing_matchings(model) as used:
            run(model, flux2_inputs(model, batch=1, timestep=t, seed=seed))
        dsts.append(destinations(used["transformer_blocks.0"][0]))
    assert torch.equal(dsts[0], dsts[1]) and not torch.equal(dsts[0], dsts[2])


def test_ratio_zero_remove_and_compile():
    model = tiny_flux2()
    inputs = flux2_inputs(model, h=6, w=4)
    compiled, full = check_ratio_zero_then_compiled(model, inputs)
    tofu_sd.remove(compiled)
    assert_unpatched(model)
    assert torch.equal(run(model, inputs), full)


def test_compile_repeated_blocks():
    """Both kinds of block, compiled one block at a time with their hooks (the single-stream block's matching on
    its last h * w tokens included), as eager."""
    model = tiny_flux2()
    inputs = flux2_inputs(model, h=5, w=5)
    full = run(model, inputs)
    tofu_sd.apply(model, ratio=0.5)
    eager = run(model, inputs)
    model.compile_repeated_blocks(backend="aot_eager", fullgraph=True)
    torch.testing.assert_close(run(model, inputs), eager, rtol=1e-4, atol=1e-5)
    tofu_sd.remove(model)
    torch.testing.assert_close(run(model, inputs), full, rtol=1e-5, atol=1e-6)


def test_unsupported_options_are_refused():
    model = tiny_flux2()
    model.transformer_blocks[1].attn.set_processor(Flux2KVAttnProcessor())
    with pytest.raises(ValueError, match="transformer_blocks.1.attn: its attention processor Flux2KVAttnProcessor"):
        tofu_sd.apply(model)
    assert_unpatched(model)
    model = tiny_flux2()
    model.single_transformer_blocks[0].attn.set_processor(Flux2KVParallelSelfAttnProcessor())
    with pytest.raises(ValueError, match="single_transformer_blocks.0.attn: its attention processor Flux2KVParallel"):
        tofu_sd.apply(model)
    assert_unpatched(model)


def test_flux2_pipeline_end_to_end():
    """Flux2Pipeline with given prompt embeddings (no text encoder, tokenizer or VAE: latent output)."""
    from diffusers import FlowMatchEulerDiscreteScheduler, Flux2Pipeline

    model = tiny_flux2()
    pipe = Flux2Pipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(), vae=None, text_encoder=None, tokenizer=None, transformer=model
    )
    call = {
        "prompt_embeds": torch.randn(1, 5, 32, generator=torch.Generator().manual_seed(0)),
        "height": 64, "width": 48, "num_inference_steps": 2, "output_type": "latent",
    }  # fmt: skip

    def generate():
        with torch.no_grad():
            return pipe(**call, generator=torch.Generator().manual_seed(1)).images

    full = generate()
    tofu_sd.apply(pipe, ratio=0.5, use_rand=False)
    with recording({"b": model.transformer_blocks[0]}) as given, capturing_matchings(model) as used:
        reduced = generate()
    assert reduced.shape == full.shape and not torch.allclose(reduced, full, atol=1e-6)
    # 64 x 48 pixels: an 8 x 6 latent, packed 2 x 2: a 4 x 3 grid of 12 tokens (rows first).
    x = given["b"][0][1]["hidden_states"]
    assert len(used["transformer_blocks.0"]) == 2 and x.shape[1] == 12
    m = match(x, plan_blocks(4, 3, 2, 2, 1, int(12 * 0.5), blocks=2)[0])
    assert torch.equal(m.keep_rows, used["transformer_blocks.0"][0].keep_rows)
    tofu_sd.remove(pipe)
    assert torch.equal(generate(), full)
