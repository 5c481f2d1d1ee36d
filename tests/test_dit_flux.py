"""Token Fusion on a tiny Flux transformer: double- and single-stream blocks, the grid from img_ids, rotary
positions that follow their tokens (against a per-batch-element reference), text untouched, compile, remove."""

import pytest
import torch
from diffusers.models.transformers.transformer_flux import FluxIPAdapterAttnProcessor
from test_dit_common import (
    ShiftedPositions,
    assert_unpatched,
    capturing_matchings,
    check_ratio_zero_then_compiled,
    destinations,
    flux_inputs,
    grid_ids,
    recording,
    run,
    tiny_flux,
)

import tofu_sd
from tofu_sd.families.flux import grid_from_ids
from tofu_sd.merge import MODES, match, reduce_tokens, restore_tokens
from tofu_sd.plans import plan_blocks

NAMES = ["transformer_blocks.0", "transformer_blocks.1", "single_transformer_blocks.0", "single_transformer_blocks.1"]


def test_default_blocks_are_double_then_single_stream():
    model = tiny_flux(num_layers=2, num_single_layers=4)
    tofu_sd.apply(model)
    assert [(b.name, b.letter) for b in tofu_sd.patched_blocks(model)] == [
        ("transformer_blocks.0", "M"), ("transformer_blocks.1", "M"),
        ("single_transformer_blocks.0", "M"), ("single_transformer_blocks.1", "M"),
        ("single_transformer_blocks.2", "M"), ("single_transformer_blocks.3", "M"),
    ]  # fmt: skip
    tofu_sd.apply(model, blocks="1-2")
    assert [b.name for b in tofu_sd.patched_blocks(model)] == ["transformer_blocks.1", "single_transformer_blocks.0"]


@pytest.mark.parametrize("h,w", [(6, 4), (5, 7), (3, 8)])
def test_token_counts_and_text_untouched(h, w):
    model = tiny_flux()
    inputs = flux_inputs(model, h=h, w=w, text=5)
    tofu_sd.apply(model, ratio=0.5, blocks=(0, 2))
    n, T = h * w, 5
    kept = n - int(n * 0.5)
    double, single = model.transformer_blocks, model.single_transformer_blocks
    counts = {
        ("d0", "image"): double[0].attn.to_q, ("d0", "text"): double[0].attn.add_q_proj, ("d0", "ff"): double[0].ff,
        ("d1", "image"): double[1].attn.to_q, ("s0", "joint"): single[0].attn.to_q, ("s0", "mlp"): single[0].proj_mlp,
        ("s1", "joint"): single[1].attn.to_q,
    }  # fmt: skip
    attns = {"d0": double[0].attn, "s0": single[0].attn}
    with recording(counts) as seen, recording(attns) as given:
        run(model, inputs)
    got = {key: [args[0].shape[1] for args, _ in calls] for key, calls in seen.items()}
    assert got == {
        ("d0", "image"): [kept], ("d0", "text"): [T], ("d0", "ff"): [n], ("d1", "image"): [n],
        ("s0", "joint"): [T + kept], ("s0", "mlp"): [T + n], ("s1", "joint"): [T + n],
    }  # fmt: skip
    # Text tokens, bit for bit as the block passed them to its attention.
    (_, kwargs), = given["d0"]
    assert torch.equal(seen[("d0", "text")][0][0][0], kwargs["encoder_hidden_states"])
    (_, kwargs), = given["s0"]
    assert torch.equal(seen[("s0", "joint")][0][0][0][:, :T], kwargs["hidden_states"][:, :T])


def test_grid_comes_from_img_ids():
    assert grid_from_ids(grid_ids(5, 7)) == (5, 7)
    assert grid_from_ids(grid_ids(5, 7).unsqueeze(0)) == (5, 7)  # the deprecated batched img_ids
    assert grid_from_ids(grid_ids(7, 5)) == (7, 5)
    shuffled = grid_ids(5, 7)[torch.randperm(35, generator=torch.Generator().manual_seed(0))]
    assert grid_from_ids(shuffled) is None
    assert grid_from_ids(torch.cat([grid_ids(4, 4), grid_ids(4, 4)])) is None  # e.g. Kontext's reference image
    # The matching is done on that grid (7 x 5 and 5 x 7 have the same tokens, not the same cells).
    model = tiny_flux()
    inputs = flux_inputs(model, h=7, w=5)
    tofu_sd.apply(model, ratio=0.5, use_rand=False)
    with recording({"b": model.transformer_blocks[1]}) as given, capturing_matchings(model) as used:
        run(model, inputs)
    x = given["b"][0][1]["hidden_states"]
    for h, w in [(7, 5), (5, 7)]:
        m = match(x, plan_blocks(h, w, 2, 2, 2, int(35 * 0.5), blocks=4)[1])
        assert torch.equal(m.keep_rows, used["transformer_blocks.1"][0].keep_rows) == ((h, w) == (7, 5))


def test_img_ids_that_are_no_grid_are_refused():
    model = tiny_flux()
    inputs = flux_inputs(model, h=4, w=4)
    tofu_sd.apply(model)
    with pytest.raises(ValueError, match="takes the token grid from `img_ids`"):
        run(model, dict(inputs, img_ids=inputs["img_ids"].flip(0)))
    with pytest.raises(ValueError, match="Kontext"):
        run(model, dict(inputs, hidden_states=inputs["hidden_states"].repeat(1, 2, 1), img_ids=inputs["img_ids"].repeat(2, 1)))
    run(model, inputs)  # the failed calls left no state behind


def reference_double(attn, x, text, emb, m, mode):
    """A double-stream attention on reduced image tokens, one batch element at a time, each with the rotary table
    of its own kept tokens' positions (text positions first), through the processor itself; image restored."""
    cos, sin = emb
    T = text.shape[1]
    reduced = reduce_tokens(x, m, mode)
    images, texts = [], []
    for b in range(x.shape[0]):
        pos = m.keep_idx[b]
        table = (torch.cat([cos[:T], cos[T:][pos]]), torch.cat([sin[:T], sin[T:][pos]]))
        image, txt = attn.processor(attn, reduced[b : b + 1], text[b : b + 1], None, table)
        images.append(image)
        texts.append(txt)
    return restore_tokens(torch.cat(images), m), torch.cat(texts)


def reference_single(attn, x, T, emb, m, mode):
    cos, sin = emb
    reduced = reduce_tokens(x[:, T:], m, mode)
    outs = []
    for b in range(x.shape[0]):
        pos = m.keep_idx[b]
        table = (torch.cat([cos[:T], cos[T:][pos]]), torch.cat([sin[:T], sin[T:][pos]]))
        outs.append(attn.processor(attn, torch.cat([x[b : b + 1, :T], reduced[b : b + 1]], 1), None, None, table))
    out = torch.cat(outs)
    return torch.cat([out[:, :T], restore_tokens(out[:, T:], m)], 1)


@pytest.mark.parametrize("letter", ["P", "M"])
@pytest.mark.parametrize("name", ["transformer_blocks.1", "single_transformer_blocks.0"])
def test_rotary_positions_follow_their_tokens(name, letter):
    model = tiny_flux()
    inputs = flux_inputs(model, batch=3, h=5, w=6, text=4)
    tofu_sd.apply(model, ratio=0.5, schedule=letter)
    attn = model.get_submodule(name).attn
    with recording({"a": attn}) as given, recording({"a": attn}, "post") as returned, capturing_matchings(model) as used:
        run(model, inputs)
    (_, kwargs), out, m = given["a"][0], returned["a"][0], used[name][0]
    emb, x = kwargs["image_rotary_emb"], kwargs["hidden_states"]
    assert not torch.equal(m.keep_idx[0], m.keep_idx[1])  # per batch element positions: the case that matters
    with torch.no_grad():
        if name.startswith("single"):
            expected = reference_single(attn, x, 4, emb, m, MODES[letter])
            # With the first N - r positions instead of the kept tokens' own, the result is another one.
            wrong = reference_single(attn, x, 4, emb, ShiftedPositions(m), MODES[letter])
            torch.testing.assert_close(out, expected, rtol=0, atol=2e-6)
            assert not torch.allclose(out, wrong, atol=1e-4)
        else:
            expected = reference_double(attn, x, kwargs["encoder_hidden_states"], emb, m, MODES[letter])
            wrong = reference_double(attn, x, kwargs["encoder_hidden_states"], emb, ShiftedPositions(m), MODES[letter])
            for got, want in zip(out, expected):
                torch.testing.assert_close(got, want, rtol=0, atol=2e-6)
            assert not torch.allclose(out[0], wrong[0], atol=1e-4)



def test_cfg_batch_shares_one_partition_and_rematch_every():
    model = tiny_flux()
    inputs = flux_inputs(model, batch=2, timestep=0.8)
    tofu_sd.apply(model, ratio=0.5, rematch_every=2)
    with capturing_matchings(model) as first:
        run(model, inputs)
    for name, (m,) in first.items():
        assert torch.equal(destinations(m)[0], destinations(m)[1]), name
    with capturing_matchings(model) as second:  # the next step (a lower timestep): matchings reused
        run(model, dict(inputs, timestep=torch.full((2,), 0.7)))
    with capturing_matchings(model) as third:  # step 2: matched anew
        run(model, dict(inputs, timestep=torch.full((2,), 0.6)))
    for name in NAMES:
        assert second[name][0] is first[name][0] and third[name][0] is not first[name][0]
    # Flux timesteps in [0, 1] are scaled as the model scales them (x 1000): 0.8 and 0.79 key other partitions.
    tofu_sd.apply(model, ratio=0.5)
    dsts = []
    for t in (0.8, 0.79):
        with capturing_matchings(model) as used:
            run(model, dict(inputs, timestep=torch.full((2,), t)))
        dsts.append(destinations(used[NAMES[0]][0]))
    assert not torch.equal(*dsts)


def test_ratio_zero_remove_and_compile():
    model = tiny_flux()
    inputs = flux_inputs(model, h=6, w=4)
    compiled, full = check_ratio_zero_then_compiled(model, inputs)
    # The same 24 tokens on a 4 x 6 grid: read anew, and the graph guards on it.
    other = dict(inputs, img_ids=grid_ids(4, 6))
    torch.testing.assert_close(run(compiled, other), run(model, other), rtol=1e-4, atol=1e-5)
    tofu_sd.remove(compiled)
    assert_unpatched(model)
    assert torch.equal(run(model, inputs), full)


def test_rematch_every_in_a_compiled_model():
    """The step count stays host-side (the model's hooks run outside graphs): a compiled model reuses too."""
    model = tiny_flux()
    tofu_sd.apply(model, ratio=0.5, rematch_every=2)
    calls = [flux_inputs(model, seed=i, timestep=t) for i, t in enumerate([0.9, 0.8, 0.7])]
    eager = [run(model, inputs) for inputs in calls]
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    for inputs, expected in zip(calls, eager):
        torch.testing.assert_close(run(compiled, inputs), expected, rtol=1e-4, atol=1e-5)
    tofu_sd.apply(model, ratio=0.5, rematch_every=1)
    assert not torch.allclose(run(model, calls[1]), eager[1], atol=1e-6)  # step 1 did reuse step 0's


def test_unsupported_options_are_refused():
    model = tiny_flux()
    model.single_transformer_blocks[1].attn.set_processor(FluxIPAdapterAttnProcessor(32, 32))
    with pytest.raises(ValueError, match="single_transformer_blocks.1.attn: its attention processor FluxIPAdapter"):
        tofu_sd.apply(model)
    assert_unpatched(model)


def test_flux_pipeline_end_to_end():
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline

    model = tiny_flux()
    pipe = FluxPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(), vae=None, text_encoder=None, tokenizer=None,
        text_encoder_2=None, tokenizer_2=None, transformer=model,
    )  # fmt: skip
    g = torch.Generator().manual_seed(0)
    call = {
        "prompt_embeds": torch.randn(1, 5, 32, generator=g), "pooled_prompt_embeds": torch.randn(1, 32, generator=g),
        "height": 80, "width": 48, "num_inference_steps": 2, "output_type": "latent",
    }  # fmt: skip

    def generate():
        with torch.no_grad():
            return pipe(**call, generator=torch.Generator().manual_seed(1)).images

    full = generate()
    tofu_sd.apply(pipe, ratio=0.5, use_rand=False)
    with recording({"b": model.transformer_blocks[0]}) as given, capturing_matchings(model) as used:
        reduced = generate()
    assert reduced.shape == full.shape and not torch.allclose(reduced, full, atol=1e-6)
    # 80 x 48 pixels: a 10 x 6 latent, packed 2 x 2: a 5 x 3 grid of 15 tokens (rows first).
    x = given["b"][0][1]["hidden_states"]
    m = match(x, plan_blocks(5, 3, 2, 2, 1, int(15 * 0.5), blocks=4)[0])
    assert torch.equal(m.keep_rows, used["transformer_blocks.0"][0].keep_rows)
    tofu_sd.remove(pipe)
    assert torch.equal(generate(), full)
