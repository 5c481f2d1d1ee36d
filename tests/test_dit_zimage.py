"""Token Fusion on a tiny Z-Image transformer: its main layers patched (the refiners not), the image tokens first in
each element's sequence reduced and everything after them (image padding, caption, batch padding) passed bit for
bit, the per-element rotary rows and the key mask cut with the kept tokens (against a per-element reference through
the processor itself, with mutation checks, and against the same element run alone without batch padding), odd and
non-square grids, batch 1 and CFG batches, ratio 0, remove, compile, ZImagePipeline end to end; unsupported inputs
refused."""

import contextlib

import pytest

pytest.importorskip("diffusers", minversion="0.42.1")  # written and tested on it; older ones are refused

import torch
from diffusers import ZImageTransformer2DModel
from diffusers.models.attention_processor import AttnProcessor2_0
from diffusers.models.transformers.transformer_z_image import ZSingleStreamAttnProcessor
from torch.utils.checkpoint import checkpoint
from test_dit_common import ShiftedPositions, assert_unpatched, calls_in_threads, capturing_matchings, recording

import tofu_sd
from tofu_sd.merge import MODES, reduce_tokens, restore_tokens


def tiny_zimage(n_layers=2, seed=0):
    """A Z-Image transformer: width 32, 2 heads of 16 (rotary axes 4 + 6 + 6), 4 latent channels, patch 2, one
    refiner layer each for the image and the caption; captions of up to 64 padded tokens (axis 0's positions)."""
    torch.manual_seed(seed)
    return ZImageTransformer2DModel(
        all_patch_size=(2,), all_f_patch_size=(1,), in_channels=4, dim=32, n_layers=n_layers, n_refiner_layers=1,
        n_heads=2, n_kv_heads=2, cap_feat_dim=16, axes_dims=[4, 6, 6], axes_lens=[256, 32, 32],
    ).eval()  # fmt: skip


def zimage_inputs(batch=2, h=5, w=7, text=(5, 40), t=0.5, seed=1):
    """Keyword arguments of a Z-Image call on an ``h x w`` token grid: latents ``(4, 1, 2h, 2w)`` and captions of
    ``text[i % len(text)]`` tokens, lists as ZImagePipeline passes them. Captions padded to different multiples of
    32 (5 and 40 tokens: 32 and 64) make the model pad the batch and pass a key mask."""
    g = torch.Generator().manual_seed(seed)
    return {
        "x": [torch.randn(4, 1, 2 * h, 2 * w, generator=g) for _ in range(batch)],
        "t": torch.full((batch,), float(t)),
        "cap_feats": [torch.randn(text[i % len(text)], 16, generator=g) for i in range(batch)],
    }


def run(model, inputs):
    with torch.no_grad():
        return model(**inputs).sample


def same(a, b):
    return len(a) == len(b) and all(torch.equal(x, y) for x, y in zip(a, b))


@contextlib.contextmanager
def processor_calls():
    """Record what ZSingleStreamAttnProcessor gets and returns, ``(attn, hidden_states, attention_mask,
    freqs_cis, output)`` per call: what the attention runs on, after Token Fusion's hooks."""
    seen, original = [], ZSingleStreamAttnProcessor.__call__

    def call(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, freqs_cis=None):
        out = original(self, attn, hidden_states, encoder_hidden_states, attention_mask, freqs_cis)
        seen.append((attn, hidden_states, attention_mask, freqs_cis, out))
        return out

    ZSingleStreamAttnProcessor.__call__ = call
    try:
        yield seen
    finally:
        ZSingleStreamAttnProcessor.__call__ = original


def test_the_main_layers_are_patched_and_the_refiners_are_not():
    model = tiny_zimage(n_layers=3)
    tofu_sd.apply(model)
    assert [(b.name, b.letter) for b in tofu_sd.patched_blocks(model)] == [(f"layers.{i}", "M") for i in range(3)]
    for name, module in model.named_modules():
        if "refiner" in name:
            assert "_diffusers_hook" not in module.__dict__, name
    tofu_sd.apply(model, blocks="1")
    assert [b.name for b in tofu_sd.patched_blocks(model)] == ["layers.1"]


@pytest.mark.parametrize(
    "batch,h,w,text,masked",
    [(1, 5, 7, (9,), False), (2, 4, 6, (5, 40), True), (3, 7, 3, (40, 5, 12), True), (2, 8, 8, (5, 5), False)],
    ids=["batch1-odd", "cfg-mask", "odd-tall-mask", "square-no-image-padding"],
)
def test_token_counts_and_everything_after_the_image_untouched(batch, h, w, text, masked):
    """Captions that pad to different multiples of 32 (5 and 40 tokens) make the model pass a key mask."""
    model = tiny_zimage()
    inputs = zimage_inputs(batch=batch, h=h, w=w, text=text)
    tofu_sd.apply(model, ratio=0.5, blocks="0")
    n = h * w
    kept = n - int(n * 0.5)
    attn, unpatched = model.layers[0].attention, model.layers[1].attention
    with (
        recording({"a": attn}) as given,
        recording({"a": attn}, "post") as returned,
        processor_calls() as calls,
        capturing_matchings(model) as used,
    ):
        run(model, inputs)
    by_attn = {id(a): (x, mask, freqs, out) for a, x, mask, freqs, out in calls}
    (args, kwargs), restored, m = given["a"][0], returned["a"][0], used["layers.0"][0]
    full, full_mask, full_freqs = args[0], kwargs["attention_mask"], kwargs["freqs_cis"]
    S = full.shape[1]
    assert (full_mask is not None) == masked
    x, mask, freqs, out = by_attn[id(attn)]
    assert x.shape[:2] == (batch, kept + S - n) and freqs.shape[:2] == x.shape[:2]
    assert torch.equal(x[:, kept:], full[:, n:])  # image padding, caption, batch padding: bit for bit
    assert torch.equal(freqs[:, kept:], full_freqs[:, n:])
    assert mask is None if full_mask is None else torch.equal(mask[:, kept:], full_mask[:, n:])
    assert torch.equal(restored[:, n:], out[:, kept:])  # their outputs passed back as computed
    assert torch.equal(restored[:, :n], restore_tokens(out[:, :kept], m))
    assert by_attn[id(unpatched)][0].shape[1] == S  # unpatched layer: every token
    for refiner in (model.noise_refiner[0].attention, model.context_refiner[0].attention):
        assert by_attn[id(refiner)][0].shape[1] % 32 == 0  # the refiners: every (padded) token


def positions(m, b, length):
    """Where element ``b``'s reduced sequence ``[kept image tokens, rest]`` sits in its full sequence."""
    return torch.cat([m.keep_idx[b], torch.arange(m.num_tokens, length)])


def reference(attn, x, masks, freqs, m, mode):
    """The attention on ``[reduced image, rest]``, one batch element at a time through the processor itself, each
    with the rotary rows of its kept tokens' own positions and its key mask ``masks[b]``; image part restored."""
    n, kept = m.num_tokens, m.num_tokens - m.r
    image = reduce_tokens(x[:, :n], m, mode)
    outs = []
    for b in range(x.shape[0]):
        tokens = torch.cat([image[b], x[b, n:]])[None]
        table = freqs[b : b + 1, positions(m, b, x.shape[1])]
        outs.append(attn.processor(attn, tokens, None, None if masks is None else masks[b][None], table))
    out = torch.cat(outs)
    return torch.cat([restore_tokens(out[:, :kept], m), out[:, kept:]], dim=1)


@pytest.mark.parametrize("letter", ["P", "M"])
def test_rotary_rows_and_key_mask_follow_their_tokens(letter):
    """Against the per-element reference; and not against the same with the rows of the first N - r positions (a
    wrong gather), nor with the first S - r mask columns (a mask sliced instead of cut)."""
    model = tiny_zimage()
    tofu_sd.apply(model, ratio=0.5, schedule=letter)
    attn = model.layers[1].attention
    inputs = zimage_inputs(batch=3, h=5, w=6, text=(5, 40, 5))
    with (
        recording({"a": attn}) as given,
        recording({"a": attn}, "post") as returned,
        capturing_matchings(model) as used,
    ):
        run(model, inputs)
    (args, kwargs), out, m = given["a"][0], returned["a"][0], used["layers.1"][0]
    x, mask, freqs = args[0], kwargs["attention_mask"], kwargs["freqs_cis"]
    assert freqs.is_complex() and freqs.shape[:2] == x.shape[:2] and mask.shape == x.shape[:2]
    assert not torch.equal(m.keep_idx[0], m.keep_idx[1])  # per batch element positions: the case that matters
    S, mode = x.shape[1], MODES[letter]
    own = [mask[b, positions(m, b, S)] for b in range(3)]
    sliced = [mask[b, : S - m.r] for b in range(3)]
    assert not torch.equal(own[0], sliced[0])  # element 0's 5-token caption is batch-padded
    with torch.no_grad():
        expected = reference(attn, x, own, freqs, m, mode)
        wrong_rows = reference(attn, x, own, freqs, ShiftedPositions(m), mode)
        wrong_mask = reference(attn, x, sliced, freqs, m, mode)
    torch.testing.assert_close(out, expected, rtol=0, atol=2e-6)
    assert not torch.allclose(out, wrong_rows, atol=1e-4)
    assert not torch.allclose(out[0], wrong_mask[0], atol=1e-4)


def test_batch_padding_is_masked_as_if_it_was_not_there():
    """In a CFG batch whose captions pad to different lengths, element 0 (the shorter) gives the output of the
    same call on element 0 alone, with no batch padding and no mask, in every patched layer; and the mask
    matters: without it, the batch padding changes element 0's output."""
    model = tiny_zimage()
    inputs = zimage_inputs(batch=2, h=5, w=6, text=(5, 40))
    tofu_sd.apply(model, ratio=0.5)
    with processor_calls() as calls:
        batched = run(model, inputs)
    assert [x.shape[1] for attn, x, *_ in calls if attn is model.layers[1].attention] == [15 + 2 + 64]
    alone = {key: value[:1] for key, value in inputs.items()}
    torch.testing.assert_close(batched[0], run(model, alone)[0], rtol=0, atol=1e-5)
    original = ZSingleStreamAttnProcessor.__call__

    def unmasked(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, freqs_cis=None):
        return original(self, attn, hidden_states, encoder_hidden_states, None, freqs_cis)

    ZSingleStreamAttnProcessor.__call__ = unmasked
    try:
        assert not torch.allclose(run(model, inputs)[0], batched[0], atol=1e-4)
    finally:
        ZSingleStreamAttnProcessor.__call__ = original


def test_cfg_batch_and_calls_share_one_partition():
    model = tiny_zimage()
    tofu_sd.apply(model, ratio=0.5)
    with capturing_matchings(model) as used:
        run(model, zimage_inputs(batch=2, t=0.8))
    for name, (m,) in used.items():
        dst = m.keep_idx[:, -m.num_dst :]
        assert torch.equal(dst[0], dst[1]), name
    dsts = []
    for seed, t in ((1, 0.8), (2, 0.8), (1, 0.79)):  # the model embeds t x 1000: 0.79 keys another partition
        with capturing_matchings(model) as used:
            run(model, zimage_inputs(batch=1, t=t, seed=seed))
        m = used["layers.1"][0]
        dsts.append(m.keep_idx[:, -m.num_dst :])
    assert torch.equal(dsts[0], dsts[1]) and not torch.equal(dsts[0], dsts[2])


def test_ratio_zero_remove_and_compile():
    """Ratio 0 is bit-identical; ratio 0.5 changes the output and compiles with no graph break; remove leaves
    nothing and is bit-identical. (Diffusers 0.42.1's Z-Image breaks the graph on its first call, which fills its
    rotary cache under a device context manager, with or without Token Fusion: the model runs once before.)"""
    model = tiny_zimage()
    inputs = zimage_inputs(h=5, w=6)
    full = run(model, inputs)
    tofu_sd.apply(model, ratio=0)
    assert same(run(model, inputs), full)
    tofu_sd.apply(model, ratio=0.5)
    eager = run(model, inputs)
    assert not torch.allclose(eager[0], full[0], atol=1e-6)
    with torch.no_grad():
        explanation = torch._dynamo.explain(model)(**inputs)
    assert explanation.graph_break_count == 0, explanation.break_reasons
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    for got, want in zip(run(compiled, inputs), eager):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    tofu_sd.remove(compiled)
    assert_unpatched(model)
    assert same(run(model, inputs), full)


def test_deep_copy_and_threads():
    """A deep copy is patched alike and independently; two threads calling one patched model on different grids
    and timesteps get what each gets alone."""
    import copy

    model = tiny_zimage()
    inputs = zimage_inputs(h=5, w=6)
    full = run(model, inputs)
    tofu_sd.apply(model, ratio=0.5, schedule="PM")
    reduced = run(model, inputs)
    twin = copy.deepcopy(model)
    assert tofu_sd.get_state(twin) == tofu_sd.get_state(model) and same(run(twin, inputs), reduced)
    tofu_sd.remove(model)  # the copy stays patched, on its own weights and hooks
    assert same(run(model, inputs), full) and same(run(twin, inputs), reduced)
    calls = [zimage_inputs(h=5, w=6, t=0.7), zimage_inputs(batch=1, h=7, w=4, text=(9,), t=0.3)]
    alone, results = calls_in_threads(twin, calls)
    for i in range(2):
        assert len(results[i]) == 3 and all(same(out, alone[i]) for out in results[i])


def gradients(model, inputs, checkpointing=None):
    """The parameters' nonzero gradients of one backward of the outputs' mean squares; ``checkpointing``: run the
    layers under torch's checkpoint, ``"reentrant"`` or not (``None``: no checkpointing)."""
    model.train().zero_grad(set_to_none=True)
    if checkpointing is None:
        model.disable_gradient_checkpointing()
    else:
        reentrant = checkpointing == "reentrant"
        model.enable_gradient_checkpointing(lambda block, *args: checkpoint(block, *args, use_reentrant=reentrant))
    sum(out.pow(2).mean() for out in model(**inputs).sample).backward()
    return {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None and p.grad.any()}


@pytest.mark.parametrize("checkpointing", ["non-reentrant", "reentrant"])
def test_gradient_checkpointing_recomputes_with_the_forwards_matching(checkpointing):
    """A checkpointed layer's recomputation reduces with its forward's matching (kept under the layer's whole
    [image, rest] input): the gradients equal those without checkpointing, which differ from the unpatched ones."""
    model = tiny_zimage()
    inputs = zimage_inputs(h=4, w=6)
    unpatched = gradients(model, inputs)
    tofu_sd.apply(model, ratio=0.5)
    expected = gradients(model, inputs)
    assert max((expected[n] - unpatched[n]).abs().max().item() for n in expected) > 1e-3
    got = gradients(model, inputs, checkpointing)
    assert got.keys() == expected.keys()
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], rtol=1e-4, atol=1e-6, msg=name)


def test_compile_repeated_blocks():
    model = tiny_zimage()
    inputs = zimage_inputs(h=5, w=5)
    full = run(model, inputs)
    tofu_sd.apply(model, ratio=0.5)
    eager = run(model, inputs)
    model.compile_repeated_blocks(backend="aot_eager", fullgraph=True)
    for got, want in zip(run(model, inputs), eager):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    tofu_sd.remove(model)
    for got, want in zip(run(model, inputs), full):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_unsupported_calls_are_refused_at_the_call():
    """Z-Image-Omni's nested lists, latents of different sizes or of more than one frame in one call: a clear
    ValueError before the model runs, and the next call as before."""
    model = tiny_zimage()
    inputs = zimage_inputs(h=4, w=4)
    tofu_sd.apply(model, ratio=0.5)
    expected = run(model, inputs)
    with pytest.raises(ValueError, match="does not support Z-Image-Omni's nested list inputs"):
        run(model, dict(inputs, x=[[latent] for latent in inputs["x"]]))
    mixed = [inputs["x"][0], torch.randn(4, 1, 8, 10)]
    with pytest.raises(ValueError, match=r"latents of one size .* sizes \[\(1, 8, 8\), \(1, 8, 10\)\]"):
        run(model, dict(inputs, x=mixed))
    with pytest.raises(ValueError, match=r"one frame in a call .* sizes \[\(2, 8, 8\)\] with f_patch_size=1"):
        run(model, dict(inputs, x=[torch.randn(4, 2, 8, 8)] * 2))
    assert same(run(model, inputs), expected)


def test_unsupported_options_are_refused():
    model = tiny_zimage()
    model.layers[0].attention.set_processor(AttnProcessor2_0())
    with pytest.raises(ValueError, match="layers.0.attention: its attention processor AttnProcessor2_0 is not"):
        tofu_sd.apply(model)
    assert_unpatched(model)
    assert tofu_sd.get_state(model) is None


def test_zimage_pipeline_end_to_end():
    """ZImagePipeline (given prompt embeddings of different lengths for CFG, no text encoder, tokenizer or VAE):
    reduced in every layer at every step, and bit-identical after remove."""
    from diffusers import FlowMatchEulerDiscreteScheduler, ZImagePipeline

    model = tiny_zimage()
    pipe = ZImagePipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(), vae=None, text_encoder=None, tokenizer=None, transformer=model
    )
    g = torch.Generator().manual_seed(0)
    call = {
        "prompt_embeds": [torch.randn(5, 16, generator=g)],
        "negative_prompt_embeds": [torch.randn(40, 16, generator=g)],
        "guidance_scale": 4.0, "height": 80, "width": 112, "num_inference_steps": 2, "output_type": "latent",
    }  # fmt: skip

    def generate():
        with torch.no_grad():
            return pipe(**call, generator=torch.Generator().manual_seed(1)).images

    full = generate()
    tofu_sd.apply(pipe, ratio=0.5)
    with processor_calls() as calls:
        reduced = generate()
    assert reduced.shape == full.shape and not torch.allclose(reduced, full, atol=1e-6)
    # 80 x 112 pixels: a 10 x 14 latent, patch 2: a 5 x 7 grid of 35 tokens (padded to 64), 18 kept; the captions
    # pad to 32 and 64, so the CFG batch is padded to 128 with a key mask.
    layers = [(x.shape, mask.shape) for attn, x, mask, *_ in calls if attn is model.layers[0].attention]
    assert layers == [((2, 18 + 29 + 64, 32), (2, 18 + 29 + 64))] * 2
    tofu_sd.remove(pipe)
    assert torch.equal(generate(), full)
