"""Tiny Stable Diffusion models built from configs with fixed-seed random weights: no download, no network.

They have the real architectures' shapes at a fraction of the size (as diffusers' own tests do), so every code
path of the plugin and of the evaluation runs on any machine. Their images are noise-like.
"""

from __future__ import annotations

import json
import string
import tempfile
from pathlib import Path

import torch
from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel

TEXT_DIM = 32

# Three resolution levels, transformer blocks at the two highest; layers_per_block=2 gives SD 1.x's
# 2 + 3 blocks at the highest resolution.
_SD15 = dict(
    sample_size=32,
    in_channels=4,
    out_channels=4,
    block_out_channels=(32, 64, 64),
    layers_per_block=2,
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    cross_attention_dim=TEXT_DIM,
    attention_head_dim=8,
    norm_num_groups=8,
)
# SD 2.x: linear projections in and out of the transformers, heads given per level.
_SD2 = {**_SD15, "use_linear_projection": True, "attention_head_dim": (2, 4, 4)}
# SDXL: no transformer at full resolution, two layers per transformer, text-time conditioning.
_SDXL = {
    **_SD15,
    "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    "up_block_types": ("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    "transformer_layers_per_block": (1, 2, 2),
    "use_linear_projection": True,
    "addition_embed_type": "text_time",
    "addition_time_embed_dim": 8,
    "projection_class_embeddings_input_dim": TEXT_DIM + 6 * 8,
}
UNET_CONFIGS = {"sd15": _SD15, "sd2": _SD2, "sdxl": _SDXL}


def tiny_unet(kind: str = "sd15", seed: int = 0) -> UNet2DConditionModel:
    """A small U-Net shaped like SD 1.5 (``sd15``), SD 2 (``sd2``) or SDXL (``sdxl``), in eval mode."""
    torch.manual_seed(seed)
    return UNet2DConditionModel(**UNET_CONFIGS[kind]).eval()


def tiny_unet_inputs(unet: UNet2DConditionModel, batch: int = 2, height: int = 16, width: int = 16, seed: int = 0):
    """Random ``(sample, timestep, encoder_hidden_states)`` and, for SDXL shapes, ``added_cond_kwargs``."""
    g = torch.Generator().manual_seed(seed)
    kwargs = {
        "sample": torch.randn(batch, 4, height, width, generator=g),
        "timestep": torch.tensor(500),
        "encoder_hidden_states": torch.randn(batch, 7, TEXT_DIM, generator=g),
    }
    if unet.config.addition_embed_type == "text_time":
        kwargs["added_cond_kwargs"] = {
            "text_embeds": torch.randn(batch, TEXT_DIM, generator=g),
            "time_ids": torch.tensor([[height * 8, width * 8, 0, 0, height * 8, width * 8]] * batch, dtype=torch.float32),
        }
    return kwargs


def tiny_tokenizer():
    """A byte-level CLIP tokenizer over printable ASCII with no merges, written to a temporary folder."""
    from transformers import CLIPTokenizer

    chars = sorted(set(string.printable) - set(string.whitespace))
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for c in chars:
        vocab[c] = len(vocab)
        vocab[c + "</w>"] = len(vocab)
    folder = Path(tempfile.mkdtemp(prefix="tofu_sd_tokenizer_"))
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    return CLIPTokenizer(
        str(folder / "vocab.json"), str(folder / "merges.txt"), pad_token="<|endoftext|>", model_max_length=77
    )


def tiny_pipeline(seed: int = 0) -> StableDiffusionPipeline:
    """A whole StableDiffusionPipeline of real diffusers / transformers components with small configs."""
    from transformers import CLIPTextConfig, CLIPTextModel

    tokenizer = tiny_tokenizer()
    torch.manual_seed(seed)
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=len(tokenizer),
            hidden_size=TEXT_DIM,
            intermediate_size=64,
            num_attention_heads=4,
            num_hidden_layers=2,
            max_position_embeddings=77,
            bos_token_id=0,
            eos_token_id=1,
            pad_token_id=1,
        )
    ).eval()
    torch.manual_seed(seed + 1)
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        block_out_channels=(32, 64),
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        latent_channels=4,
        norm_num_groups=8,
        sample_size=64,
    ).eval()
    scheduler = DDIMScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False, set_alpha_to_one=False,
        steps_offset=1,
    )
    pipe = StableDiffusionPipeline(
        unet=tiny_unet("sd15", seed + 2),
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe
