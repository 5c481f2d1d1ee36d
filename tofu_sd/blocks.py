"""Finding the U-Net transformer blocks to patch, from the U-Net's structure rather than from tensor sizes."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from diffusers.models.attention import BasicTransformerBlock

SUPPORTED = (
    "a diffusers pipeline with a `unet` (StableDiffusionPipeline, StableDiffusionXLPipeline, their img2img / "
    "inpaint / ControlNet variants, ...) or a UNet2DConditionModel"
)


@dataclass(frozen=True)
class TransformerBlockSite:
    """One ``BasicTransformerBlock`` of the U-Net and where it sits."""

    name: str  #: qualified module name, e.g. ``down_blocks.0.attentions.1.transformer_blocks.0``
    block: BasicTransformerBlock
    #: the ``Transformer2DModel`` (``TransformerSpatioTemporalModel`` in Stable Video Diffusion's U-Net) that holds
    #: it and sees the 2-D feature map
    transformer: torch.nn.Module
    downsample: int  #: resolution factor relative to the U-Net input (1, 2, 4, ...)
    on_down_path: bool  #: in ``down_blocks`` (as opposed to the mid or up blocks)


def unwrap_unet(obj: object) -> torch.nn.Module:
    """The U-Net of a pipeline or a U-Net, with a ``torch.compile`` wrapper removed; ValueError otherwise."""
    unet = getattr(obj, "unet", obj)
    unet = getattr(unet, "_orig_mod", unet)  # torch.compile's OptimizedModule
    if not isinstance(unet, torch.nn.Module) or not hasattr(unet, "down_blocks") or not hasattr(unet, "up_blocks"):
        kind = type(obj).__name__
        hint = " Diffusion transformers: SD3, PixArt and Flux (tofu_sd.dit)." if hasattr(obj, "transformer") else ""
        raise ValueError(f"tofu_sd needs {SUPPORTED}; got {kind}.{hint}")
    return unet


def transformer_block_sites(unet: torch.nn.Module) -> list[TransformerBlockSite]:
    """Every ``BasicTransformerBlock`` in the ``attentions`` of the U-Net's down, mid and up blocks, in forward order.

    These are the spatial blocks: their tokens are the pixels of a feature map. The temporal blocks of the video
    U-Nets, which attend over frames, are elsewhere and are not collected: AnimateDiff's motion modules
    (``motion_modules`` of a ``UNetMotionModel``'s blocks) and SVD's ``temporal_transformer_blocks`` (beside
    ``transformer_blocks`` in a ``TransformerSpatioTemporalModel``).
    """
    sites: list[TransformerBlockSite] = []
    level = 0

    def collect(prefix: str, unet_block: torch.nn.Module, on_down_path: bool) -> None:
        for a, transformer in enumerate(getattr(unet_block, "attentions", None) or []):
            for b, block in enumerate(getattr(transformer, "transformer_blocks", None) or []):
                if isinstance(block, BasicTransformerBlock):
                    name = f"{prefix}.attentions.{a}.transformer_blocks.{b}"
                    sites.append(TransformerBlockSite(name, block, transformer, 2**level, on_down_path))

    for i, down in enumerate(unet.down_blocks):
        collect(f"down_blocks.{i}", down, True)
        if getattr(down, "downsamplers", None):
            level += 1
    if getattr(unet, "mid_block", None) is not None:
        collect("mid_block", unet.mid_block, False)
    for i, up in enumerate(unet.up_blocks):
        collect(f"up_blocks.{i}", up, False)
        if getattr(up, "upsamplers", None):
            level -= 1
    return sites


def select_sites(sites: list[TransformerBlockSite], max_downsample: int) -> list[TransformerBlockSite]:
    """The blocks at the highest transformer resolution, or up to ``max_downsample`` times lower."""
    if not sites:
        return []
    finest = min(site.downsample for site in sites)
    return [site for site in sites if site.downsample <= finest * max_downsample]
