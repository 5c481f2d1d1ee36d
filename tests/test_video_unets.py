"""Token Fusion on the U-Net video models: AnimateDiff's UNetMotionModel and Stable Video Diffusion's
UNetSpatioTemporalConditionModel, on tiny configs with random weights.

Their spatial transformer blocks attend over the H*W tokens of each frame (batch*frames rows) and are patched as
an image U-Net's are; their temporal blocks (AnimateDiff's motion modules, SVD's TemporalBasicTransformerBlocks)
attend over the frames (batch*H*W rows) and must be left alone: reducing their tokens would reduce frames.
"""

import pytest
import torch
from diffusers import (
    AnimateDiffPipeline,
    AutoencoderKL,
    AutoencoderKLTemporalDecoder,
    DDIMScheduler,
    EulerDiscreteScheduler,
    MotionAdapter,
    StableVideoDiffusionPipeline,
    UNet2DConditionModel,
    UNetMotionModel,
    UNetSpatioTemporalConditionModel,
)
from diffusers.models.attention import BasicTransformerBlock, TemporalBasicTransformerBlock

import tofu_sd
from tofu_sd import state as hooks
from tofu_sd.reducing import REDUCE_HOOK

B, F, H, W = 2, 3, 16, 12  # batch, frames, latent height and width: all different, so every shape tells them apart
TEXT_DIM = 32

# Spatial attention at two levels: full resolution (down_blocks.0, up_blocks.1) and half (the mid block).
FINEST = [
    "down_blocks.0.attentions.0.transformer_blocks.0",
    "down_blocks.0.attentions.1.transformer_blocks.0",
    "up_blocks.1.attentions.0.transformer_blocks.0",
    "up_blocks.1.attentions.1.transformer_blocks.0",
    "up_blocks.1.attentions.2.transformer_blocks.0",
]
MID = "mid_block.attentions.0.transformer_blocks.0"


def motion_unet(seed=0):
    torch.manual_seed(seed)
    return UNetMotionModel(
        block_out_channels=(32, 64),
        layers_per_block=2,
        down_block_types=("CrossAttnDownBlockMotion", "DownBlockMotion"),
        up_block_types=("UpBlockMotion", "CrossAttnUpBlockMotion"),
        cross_attention_dim=TEXT_DIM,
        num_attention_heads=4,
        norm_num_groups=16,
        motion_num_attention_heads=2,
        motion_max_seq_length=8,
    ).eval()


def svd_unet(seed=0):
    torch.manual_seed(seed)
    return UNetSpatioTemporalConditionModel(  # its TransformerSpatioTemporalModel has GroupNorm(32): 32 channels
        sample_size=16,
        in_channels=8,
        out_channels=4,
        block_out_channels=(32, 64),
        layers_per_block=2,
        down_block_types=("CrossAttnDownBlockSpatioTemporal", "DownBlockSpatioTemporal"),
        up_block_types=("UpBlockSpatioTemporal", "CrossAttnUpBlockSpatioTemporal"),
        cross_attention_dim=TEXT_DIM,
        num_attention_heads=(2, 4),
        addition_time_embed_dim=8,
        projection_class_embeddings_input_dim=3 * 8,
        num_frames=F,
    ).eval()


def motion_inputs(seed=0):
    g = torch.Generator().manual_seed(seed)
    return {
        "sample": torch.randn(B, 4, F, H, W, generator=g),  # (batch, channels, frames, height, width)
        "timestep": torch.tensor(500),
        # AnimateDiffPipeline repeats the text per frame: (batch * frames, tokens, dim)
        "encoder_hidden_states": torch.randn(B * F, 7, TEXT_DIM, generator=g),
    }


def svd_inputs(seed=0):
    g = torch.Generator().manual_seed(seed)
    return {
        "sample": torch.randn(B, F, 8, H, W, generator=g),  # (batch, frames, channels, height, width)
        "timestep": torch.tensor(0.5),
        "encoder_hidden_states": torch.randn(B, 1, TEXT_DIM, generator=g),  # one image embedding per video
        "added_time_ids": torch.tensor([[6.0, 127.0, 0.02]] * B),
    }


MODELS = {"animatediff": (motion_unet, motion_inputs), "svd": (svd_unet, svd_inputs)}


@pytest.fixture(params=sorted(MODELS))
def model(request):
    build, inputs = MODELS[request.param]
    return build(), inputs


def run(unet, inputs):
    with torch.no_grad():
        return unet(**inputs()).sample


def is_temporal(name, module):
    """A transformer block that attends over frames: in AnimateDiff's motion modules, or SVD's temporal blocks."""
    return isinstance(module, TemporalBasicTransformerBlock) or (
        isinstance(module, BasicTransformerBlock) and ".motion_modules." in name
    )


def transformer_blocks(unet):
    """Spatial and temporal transformer blocks of the U-Net, by name."""
    spatial, temporal = {}, {}
    for name, module in unet.named_modules():
        if is_temporal(name, module):
            temporal[name] = module
        elif isinstance(module, BasicTransformerBlock):
            spatial[name] = module
    return spatial, temporal


def grid_tokens(name):
    """Tokens of a frame at the level of the block named ``name``: H*W at full resolution, a quarter below."""
    low = name.startswith(("mid_block.", "down_blocks.1.", "up_blocks.0."))
    return (H // 2) * (W // 2) if low else H * W


def attention_calls(unet, inputs):
    """``(block name, attention name, rows, tokens)`` of the queries reaching every attention module of every
    transformer block (``to_q``, after Token Fusion's reduction), in call order."""
    spatial, temporal = transformer_blocks(unet)
    calls, handles = [], []
    for name, block in {**spatial, **temporal}.items():
        for part in ("attn1", "attn2"):
            attn = getattr(block, part, None)
            if attn is None:
                continue

            def hook(_, args, name=name, part=part):
                calls.append((name, part, args[0].shape[0], args[0].shape[1]))

            handles.append(attn.to_q.register_forward_pre_hook(hook))
    try:
        run(unet, inputs)
    finally:
        for h in handles:
            h.remove()
    return calls


def test_tiny_configs_have_spatial_and_temporal_blocks(model):
    """The premise of the other tests: both kinds of blocks exist, temporal ones as BasicTransformerBlocks too
    (AnimateDiff) or as their own class (SVD), and the spatial ones are where expected."""
    unet, _ = model
    spatial, temporal = transformer_blocks(unet)
    assert sorted(spatial) == sorted(FINEST + [MID])
    assert len(temporal) >= len(spatial)
    if isinstance(unet, UNetMotionModel):
        assert all(isinstance(block, BasicTransformerBlock) for block in temporal.values())


def test_exactly_the_finest_spatial_blocks_are_patched(model):
    unet, _ = model
    tofu_sd.apply(unet, ratio=0.5)
    blocks = tofu_sd.patched_blocks(unet)
    assert [b.name for b in blocks] == FINEST
    assert "".join(b.letter for b in blocks) == "PPMMM"  # pruned on the down path, MLERP after
    assert {b.downsample for b in blocks} == {1}
    _, temporal = transformer_blocks(unet)
    hooked = {name for name, m in unet.named_modules() if getattr(m, "_diffusers_hook", None) is not None}
    assert {f"{name}.attn1" for name in FINEST} | set(FINEST) == hooked
    assert not any(name.startswith(t) for name in hooked for t in temporal)


def test_max_downsample_adds_spatial_blocks_never_temporal_ones(model):
    unet, _ = model
    tofu_sd.apply(unet, ratio=0.5, max_downsample=2)
    spatial, temporal = transformer_blocks(unet)
    names = [b.name for b in tofu_sd.patched_blocks(unet)]
    assert names == FINEST[:2] + [MID] + FINEST[2:]
    assert set(names) == set(spatial) and not set(names) & set(temporal)
    assert {b.name: b.downsample for b in tofu_sd.patched_blocks(unet)}[MID] == 2


@pytest.mark.parametrize("ratio", [0.5, 0.25])
def test_tokens_reaching_each_attention(model, ratio):
    """Patched spatial self-attention sees (1 - ratio) of the H*W tokens of each frame, batch*frames rows; the
    other spatial attention sees them all; temporal attention sees every frame, batch*H*W rows at its level."""
    unet, inputs = model
    tofu_sd.apply(unet, ratio=ratio)
    calls = attention_calls(unet, inputs)
    _, temporal = transformer_blocks(unet)
    seen = set()
    for name, part, rows, tokens in calls:
        seen.add(name)
        n = grid_tokens(name)
        if name in temporal:
            assert (rows, tokens) == (B * n, F), (name, part)
        elif name in FINEST and part == "attn1":
            assert (rows, tokens) == (B * F, n - int(n * ratio)), (name, part)
        else:
            assert (rows, tokens) == (B * F, n), (name, part)
    assert seen == set(FINEST) | {MID} | set(temporal)  # every block ran


def test_grid_is_the_frame_grid(model, monkeypatch):
    """The partition is planned on each frame's H x W grid with batch*frames rows (not on frames, not on the
    batch alone)."""
    unet, inputs = model
    planned = []
    original = hooks.plan_blocks

    def spy(h, w, sx, sy, batch, r, *args, **kwargs):
        planned.append((h, w, batch, r))
        return original(h, w, sx, sy, batch, r, *args, **kwargs)

    monkeypatch.setattr(hooks, "plan_blocks", spy)
    tofu_sd.apply(unet, ratio=0.5)
    run(unet, inputs)
    assert planned == [(H, W, B * F, H * W // 2)]  # one plan per call and grid, for all five blocks


def test_patched_output_shape_finite_and_changed(model):
    unet, inputs = model
    reference = run(unet, inputs)
    tofu_sd.apply(unet, ratio=0.5)
    out = run(unet, inputs)
    assert out.shape == reference.shape
    assert torch.isfinite(out).all()
    assert not torch.equal(out, reference)
    assert (out - reference).abs().max() < 10 * reference.abs().max()


def test_ratio_zero_is_a_no_op(model):
    unet, inputs = model
    reference = run(unet, inputs)
    tofu_sd.apply(unet, ratio=0)
    assert [b.name for b in tofu_sd.patched_blocks(unet)] == FINEST
    assert not any(getattr(m, "_diffusers_hook", None) is not None for m in unet.modules())
    assert torch.equal(run(unet, inputs), reference)


def test_remove_restores_bit_identical_outputs(model):
    unet, inputs = model
    reference = run(unet, inputs)
    tofu_sd.apply(unet, ratio=0.5, schedule="A")
    run(unet, inputs)
    tofu_sd.remove(unet)
    assert tofu_sd.get_state(unet) is None and tofu_sd.patched_blocks(unet) == []
    assert not any(getattr(m, "_diffusers_hook", None) is not None for m in unet.modules())
    assert torch.equal(run(unet, inputs), reference)


def test_schedule_letters_go_to_the_blocks_in_forward_order(model):
    unet, inputs = model
    tofu_sd.apply(unet, ratio=0.5, schedule="paamm")
    assert [(b.name, b.letter) for b in tofu_sd.patched_blocks(unet)] == list(zip(FINEST, "PAAMM"))
    spatial, _ = transformer_blocks(unet)
    for name, letter in zip(FINEST, "PAAMM"):
        assert spatial[name].attn1._diffusers_hook.get_hook(REDUCE_HOOK).letter == letter
    # The blocks listed are called in that order.
    order = [name for name, part, *_ in attention_calls(unet, inputs) if name in FINEST and part == "attn1"]
    assert order == FINEST
    out = run(unet, inputs)
    tofu_sd.apply(unet, ratio=0.5, schedule="paama")  # only the last block's letter differs
    assert not torch.equal(run(unet, inputs), out)


def test_schedule_of_the_wrong_length_is_refused_and_model_untouched(model):
    unet, inputs = model
    reference = run(unet, inputs)
    with pytest.raises(ValueError, match=r"3 letters but 5 blocks are patched(.|\n)*up_blocks.1.attentions.2"):
        tofu_sd.apply(unet, ratio=0.5, schedule="PPM")
    with pytest.raises(ValueError, match="6 letters but 5 blocks"):
        tofu_sd.apply(unet, ratio=0.5, schedule="PPMMMM")
    assert tofu_sd.get_state(unet) is None
    assert torch.equal(run(unet, inputs), reference)


@pytest.mark.parametrize(
    "options,reduced",
    [
        ({"modules": "attn1,attn2,ff"}, {"attn1", "attn2"}),
        ({"reduce": "kv"}, set()),  # every query stays; keys and values are reduced
        ({"matching": "local", "schedule": "A"}, {"attn1"}),
    ],
)
def test_other_options_keep_temporal_blocks_whole(model, options, reduced):
    unet, inputs = model
    reference = run(unet, inputs)
    tofu_sd.apply(unet, ratio=0.5, **options)
    _, temporal = transformer_blocks(unet)
    n = H * W
    for name, part, rows, tokens in attention_calls(unet, inputs):
        if name in temporal:
            assert tokens == F, (name, part)
        elif name in FINEST:
            assert (rows, tokens) == (B * F, n // 2 if part in reduced else n), (name, part)
    out = run(unet, inputs)
    assert torch.isfinite(out).all() and not torch.equal(out, reference)


# ------------------------------------------------------------------------------------------------ pipelines


def animatediff_pipeline(seed=0):
    from transformers import CLIPTextConfig, CLIPTextModel

    from evaluation.archs import TINY_RANDOM_TEXT, TINY_RANDOM_VAE
    from evaluation.tiny_random import tiny_tokenizer

    tokenizer = tiny_tokenizer()
    torch.manual_seed(seed)
    text_encoder = CLIPTextModel(
        CLIPTextConfig(vocab_size=len(tokenizer), bos_token_id=0, eos_token_id=1, pad_token_id=1, **TINY_RANDOM_TEXT)
    ).eval()
    vae = AutoencoderKL(**TINY_RANDOM_VAE).eval()
    unet = UNet2DConditionModel(  # AnimateDiffPipeline makes a UNetMotionModel of it and the motion adapter
        sample_size=16,
        block_out_channels=(32, 64),
        layers_per_block=2,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=TEXT_DIM,
        attention_head_dim=8,
        norm_num_groups=16,
    )
    adapter = MotionAdapter(
        block_out_channels=(32, 64), motion_layers_per_block=2, motion_norm_num_groups=16,
        motion_num_attention_heads=2, motion_max_seq_length=8,
    )  # fmt: skip
    scheduler = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="linear", clip_sample=False)
    pipe = AnimateDiffPipeline(
        vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, motion_adapter=adapter,
        scheduler=scheduler,
    )  # fmt: skip
    pipe.set_progress_bar_config(disable=True)
    return pipe


def svd_pipeline(seed=0):
    from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModelWithProjection

    unet = svd_unet(seed)
    torch.manual_seed(seed + 1)
    vae = AutoencoderKLTemporalDecoder(
        block_out_channels=(32, 64), down_block_types=("DownEncoderBlock2D",) * 2, latent_channels=4, sample_size=32
    ).eval()
    image_encoder = CLIPVisionModelWithProjection(
        CLIPVisionConfig(
            hidden_size=32, projection_dim=TEXT_DIM, num_hidden_layers=2, num_attention_heads=4,
            intermediate_size=37, image_size=32, patch_size=8,
        ),
    ).eval()  # fmt: skip
    scheduler = EulerDiscreteScheduler(
        beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, prediction_type="v_prediction",
        sigma_max=700.0, sigma_min=0.002, steps_offset=1, timestep_spacing="leading", timestep_type="continuous",
        use_karras_sigmas=True, interpolation_type="linear",
    )  # fmt: skip
    pipe = StableVideoDiffusionPipeline(
        vae=vae, image_encoder=image_encoder, unet=unet, scheduler=scheduler,
        feature_extractor=CLIPImageProcessor(crop_size=32, size=32),
    )  # fmt: skip
    pipe.set_progress_bar_config(disable=True)
    return pipe


def call_animatediff(pipe):
    scale = pipe.vae_scale_factor
    return pipe(
        "a red square", num_frames=F, height=scale * H, width=scale * W, num_inference_steps=2, guidance_scale=7.5,
        output_type="pt", generator=torch.Generator().manual_seed(0),
    ).frames  # fmt: skip


def call_svd(pipe):
    scale = pipe.vae_scale_factor
    image = torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    return pipe(
        image, num_frames=F, height=scale * H, width=scale * W, num_inference_steps=2, decode_chunk_size=F,
        output_type="pt", generator=torch.Generator().manual_seed(0),
    ).frames  # fmt: skip


@pytest.mark.parametrize(
    "build,call,unet_class",
    [
        (animatediff_pipeline, call_animatediff, UNetMotionModel),
        (svd_pipeline, call_svd, UNetSpatioTemporalConditionModel),
    ],
    ids=["AnimateDiffPipeline", "StableVideoDiffusionPipeline"],
)
def test_pipeline(build, call, unet_class):
    pipe = build()
    assert isinstance(pipe.unet, unet_class)
    reference = call(pipe)
    scale = pipe.vae_scale_factor
    assert reference.shape == (1, F, 3, scale * H, scale * W)

    tofu_sd.apply(pipe, ratio=0)
    assert torch.equal(call(pipe), reference)

    tofu_sd.apply(pipe, ratio=0.5)
    assert [b.name for b in tofu_sd.patched_blocks(pipe)] == FINEST
    tokens = []
    attn1 = pipe.unet.get_submodule(FINEST[0]).attn1.to_q
    handle = attn1.register_forward_pre_hook(lambda _, args: tokens.append(tuple(args[0].shape[:2])))
    try:
        out = call(pipe)
    finally:
        handle.remove()
    # two steps, classifier-free guidance batched: 2 * frames rows of half the tokens
    assert tokens == [(2 * F, H * W // 2)] * 2
    assert out.shape == reference.shape and torch.isfinite(out).all()
    assert not torch.equal(out, reference)

    tofu_sd.remove(pipe)
    assert torch.equal(call(pipe), reference)
