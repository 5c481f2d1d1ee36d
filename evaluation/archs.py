"""Every model architecture this project builds from a config, and the inputs of one denoising step.

- The bench's full-size U-Nets (random weights: speed does not depend on weight values, so nothing is
  downloaded): :data:`SD15`, :data:`SDXL` and :data:`SD15_LEVEL`, SD 1.5's highest-resolution level alone.
- The bench's diffusion transformers, SD3 medium and FLUX.1-dev, whole and as slices of a few blocks, and tiny
  ones of each family (:mod:`evaluation.dit_archs`, :data:`DIT_ARCHS`).
- The random-weight tiny models of the tests and of ``--model tiny-random``
  (:mod:`evaluation.tiny_random`): U-Nets shaped like SD 1.5, SD 2 and SDXL (:data:`TINY_RANDOM_UNETS`), and
  the VAE and text encoder of its pipeline.
- The built-in trained model of ``--model tiny`` (:mod:`evaluation.shapes`): :data:`SHAPES_UNET`,
  :data:`SHAPES_VAE`, :data:`SHAPES_TEXT`, from which its training starts.

:func:`step_inputs` makes the inputs of one U-Net call for any of these U-Nets (:func:`dit_step_inputs`, those of
a transformer call); :func:`at_timestep` sets another timestep in either.
"""

from __future__ import annotations

import torch
from diffusers import UNet2DConditionModel

from . import dit_archs
from .dit_archs import DIT_ARCHS, DiTArch  # noqa: F401 - the transformers' archs, next to the U-Nets'
from .dit_archs import step_inputs as dit_step_inputs  # noqa: F401
from .shapes.data import SIZE as SHAPES_IMAGE_SIZE

# ---------------------------------------------------------------- full size (the bench)

SD15 = dict(
    sample_size=64,
    block_out_channels=(320, 640, 1280, 1280),
    layers_per_block=2,
    cross_attention_dim=768,
    attention_head_dim=8,
    down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
    up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
)
SDXL = dict(
    sample_size=128,
    block_out_channels=(320, 640, 1280),
    layers_per_block=2,
    cross_attention_dim=2048,
    attention_head_dim=(5, 10, 20),
    transformer_layers_per_block=(1, 2, 10),
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    use_linear_projection=True,
    addition_embed_type="text_time",
    addition_time_embed_dim=256,
    projection_class_embeddings_input_dim=2816,
)
# The highest-resolution level of SD 1.5 alone: 320 channels, 8 heads, 2 + 3 transformer blocks with their
# ResNets, no down- or upsampling and no mid block. Its step is dominated by the blocks that Token Fusion patches.
SD15_LEVEL = dict(
    SD15,
    block_out_channels=(320,),
    down_block_types=("CrossAttnDownBlock2D",),
    up_block_types=("CrossAttnUpBlock2D",),
    mid_block_type=None,
)
CLIP_TOKENS = 77  #: text tokens of SD's CLIP text encoders, as the bench's steps get them

# ---------------------------------------------------------------- tiny, random weights (tests, --model tiny-random)

TINY_RANDOM_TEXT_DIM = 32
TINY_RANDOM_TOKENS = 7  #: text tokens of the tiny U-Nets' test inputs

# Three resolution levels, transformer blocks at the two highest; layers_per_block=2 gives SD 1.x's
# 2 + 3 blocks at the highest resolution.
_TINY_SD15 = dict(
    sample_size=32,
    in_channels=4,
    out_channels=4,
    block_out_channels=(32, 64, 64),
    layers_per_block=2,
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    cross_attention_dim=TINY_RANDOM_TEXT_DIM,
    attention_head_dim=8,
    norm_num_groups=8,
)
# SD 2.x: linear projections in and out of the transformers, heads given per level.
_TINY_SD2 = {**_TINY_SD15, "use_linear_projection": True, "attention_head_dim": (2, 4, 4)}
# SDXL: no transformer at full resolution, two layers per transformer, text-time conditioning.
_TINY_SDXL = {
    **_TINY_SD15,
    "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    "up_block_types": ("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    "transformer_layers_per_block": (1, 2, 2),
    "use_linear_projection": True,
    "addition_embed_type": "text_time",
    "addition_time_embed_dim": 8,
    "projection_class_embeddings_input_dim": TINY_RANDOM_TEXT_DIM + 6 * 8,
}
TINY_RANDOM_UNETS = {"sd15": _TINY_SD15, "sd2": _TINY_SD2, "sdxl": _TINY_SDXL}
TINY_RANDOM_VAE = dict(
    in_channels=3,
    out_channels=3,
    block_out_channels=(32, 64),
    down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
    up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
    latent_channels=4,
    norm_num_groups=8,
    sample_size=64,
)
#: ``CLIPTextConfig`` options besides the vocabulary size (the tokenizer's) and the special token ids.
TINY_RANDOM_TEXT = dict(
    hidden_size=TINY_RANDOM_TEXT_DIM,
    intermediate_size=64,
    num_attention_heads=4,
    num_hidden_layers=2,
    max_position_embeddings=77,
)

# ---------------------------------------------------------------- the built-in trained model (--model tiny)

SHAPES_TEXT_DIM = 64
SHAPES_MAX_TOKENS = 16  # "A high-quality photograph of a purple triangle." is 12 tokens with its start and end
SHAPES_UNET = dict(
    sample_size=SHAPES_IMAGE_SIZE // 4,
    in_channels=4,
    out_channels=4,
    block_out_channels=(48, 96, 128),
    layers_per_block=2,  # as in SD 1.x: 2 transformer blocks down and 3 up at the highest resolution
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    cross_attention_dim=SHAPES_TEXT_DIM,
    attention_head_dim=4,  # diffusers' legacy name: 4 heads
    norm_num_groups=16,
)
SHAPES_VAE = dict(
    in_channels=3,
    out_channels=3,
    down_block_types=("DownEncoderBlock2D",) * 3,
    up_block_types=("UpDecoderBlock2D",) * 3,
    block_out_channels=(32, 64, 64),
    layers_per_block=1,
    latent_channels=4,
    norm_num_groups=16,
    sample_size=SHAPES_IMAGE_SIZE,
)
#: ``CLIPTextConfig`` options besides the vocabulary size (the tokenizer's) and the special token ids.
SHAPES_TEXT = dict(
    hidden_size=SHAPES_TEXT_DIM,
    intermediate_size=4 * SHAPES_TEXT_DIM,
    num_attention_heads=4,
    num_hidden_layers=3,
    max_position_embeddings=SHAPES_MAX_TOKENS,
)

# ---------------------------------------------------------------- building

#: The U-Nets ``tofu-sd bench --arch`` builds, with random weights.
BENCH_ARCHS = {"sd15": SD15, "sdxl": SDXL, "sd15-level": SD15_LEVEL, "tiny-random": _TINY_SD15}


def build_unet(config: dict, seed: int = 0) -> UNet2DConditionModel:
    """A ``UNet2DConditionModel`` of ``config`` with the random weights of ``seed``, in eval mode."""
    torch.manual_seed(seed)
    return UNet2DConditionModel(**config).eval()


def step_inputs(
    unet, batch: int = 2, height: int = 16, width: int | None = None, *, text_tokens: int = TINY_RANDOM_TOKENS,
    seed: int = 0, device=None, dtype: torch.dtype | None = None,
) -> dict:  # fmt: skip
    """Inputs of one denoising step of ``unet``, drawn from a generator seeded with ``seed``: random latents of
    ``height x width`` (``width`` defaults to ``height``), timestep 500, random text embeddings of
    ``text_tokens`` tokens and, for SDXL's text-time conditioning, ``added_cond_kwargs`` (pooled text embeddings
    and the size and crop ids of a ``8 * height x 8 * width`` image). Drawn on the CPU, then moved to ``device``
    and ``dtype`` (the timestep stays an integer)."""
    width = height if width is None else width
    g = torch.Generator().manual_seed(seed)
    config = unet.config
    move = (lambda t: t) if device is None and dtype is None else (lambda t: t.to(device, dtype))  # noqa: E731
    inputs = {
        "sample": move(torch.randn(batch, config.in_channels, height, width, generator=g)),
        "timestep": torch.tensor(500, device=device),
        "encoder_hidden_states": move(torch.randn(batch, text_tokens, config.cross_attention_dim, generator=g)),
    }
    if config.addition_embed_type == "text_time":
        text_dim = config.projection_class_embeddings_input_dim - 6 * config.addition_time_embed_dim
        time_ids = torch.tensor([[height * 8, width * 8, 0, 0, height * 8, width * 8]] * batch, dtype=torch.float32)
        inputs["added_cond_kwargs"] = {
            "text_embeds": move(torch.randn(batch, text_dim, generator=g)),
            "time_ids": move(time_ids),
        }
    return inputs


def at_timestep(inputs: dict, timestep: int) -> dict:
    """One step's inputs (of :func:`step_inputs`, or of :func:`dit_step_inputs`) at another ``timestep`` on the
    schedulers' 0-1000 scale, given as each model takes it."""
    if "sample" in inputs:  # a U-Net's
        return {**inputs, "timestep": torch.tensor(timestep, device=inputs["sample"].device)}
    return dit_archs.at_timestep(inputs, timestep)
