"""Tiny Stable Diffusion models with fixed-seed random weights (``--model tiny-random``): no download, no network.

They have the real architectures' shapes at a fraction of the size (as diffusers' own tests do; the configs are
in :mod:`evaluation.archs`), so every code path of the plugin and of the evaluation runs on any machine. Their
images are noise-like. The built-in *trained* model, ``--model tiny``, is :mod:`evaluation.shapes`.
"""

from __future__ import annotations

import json
import string
import tempfile
from pathlib import Path

import torch
from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel

from .archs import TINY_RANDOM_TEXT, TINY_RANDOM_UNETS, TINY_RANDOM_VAE, build_unet, step_inputs


def tiny_unet(kind: str = "sd15", seed: int = 0) -> UNet2DConditionModel:
    """A small U-Net shaped like SD 1.5 (``sd15``), SD 2 (``sd2``) or SDXL (``sdxl``), in eval mode."""
    return build_unet(TINY_RANDOM_UNETS[kind], seed)


def tiny_unet_inputs(unet: UNet2DConditionModel, batch: int = 2, height: int = 16, width: int = 16, seed: int = 0):
    """Random ``(sample, timestep, encoder_hidden_states)`` (7 text tokens) and, for SDXL shapes,
    ``added_cond_kwargs``: :func:`evaluation.archs.step_inputs` on the CPU in fp32."""
    return step_inputs(unet, batch, height, width, seed=seed)


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
        CLIPTextConfig(vocab_size=len(tokenizer), bos_token_id=0, eos_token_id=1, pad_token_id=1, **TINY_RANDOM_TEXT)
    ).eval()
    torch.manual_seed(seed + 1)
    vae = AutoencoderKL(**TINY_RANDOM_VAE).eval()
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
