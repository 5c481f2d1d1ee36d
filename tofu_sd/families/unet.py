"""The U-Nets: Stable Diffusion 1.x / 2.x / XL (``UNet2DConditionModel``) and the spatial blocks of the video U-Nets
(AnimateDiff's ``UNetMotionModel``, Stable Video Diffusion's ``UNetSpatioTemporalConditionModel``).

The blocks are the ``BasicTransformerBlock`` s in the ``attentions`` of the down, mid and up blocks, found from
the U-Net's structure rather than from tensor sizes; their tokens are the pixels of the feature map that their
``Transformer2DModel`` (SVD: ``TransformerSpatioTemporalModel``) receives, whose height and width give the grid.
The temporal blocks, which attend over frames, are elsewhere and are not collected: AnimateDiff's motion modules
and SVD's ``temporal_transformer_blocks``. By default the blocks at the highest transformer resolution are
patched (``max_downsample`` adds lower ones), with pruned merging (``P``) on the down path and MLERP (``M``) after
it (SD 1.x / 2.x: ``PPMMM``), and each block's ``modules`` (``attn1`` by default) run on reduced tokens.
"""

from __future__ import annotations

import torch
from diffusers.models.attention import BasicTransformerBlock
from diffusers.models.unets.unet_2d_condition import UNet2DConditionModel
from diffusers.models.unets.unet_motion_model import UNetMotionModel
from diffusers.models.unets.unet_spatio_temporal_condition import UNetSpatioTemporalConditionModel

from ..arguments import argument
from ..config import TokenFusionConfig
from ..reducing import check_key_value_attention
from .base import Family, Part, Site

MODEL_CLASSES = (UNet2DConditionModel, UNetMotionModel, UNetSpatioTemporalConditionModel)


def transformer_block_sites(unet: torch.nn.Module) -> list[Site]:
    """Every ``BasicTransformerBlock`` in the ``attentions`` of the U-Net's down, mid and up blocks, in forward
    order, with its resolution factor (1, 2, 4, ...) relative to the U-Net's input."""
    sites: list[Site] = []
    level = 0

    def collect(prefix: str, unet_block: torch.nn.Module, on_down_path: bool) -> None:
        for a, transformer in enumerate(getattr(unet_block, "attentions", None) or []):
            for b, block in enumerate(getattr(transformer, "transformer_blocks", None) or []):
                if isinstance(block, BasicTransformerBlock):
                    name = f"{prefix}.attentions.{a}.transformer_blocks.{b}"
                    sites.append(Site(name, block, transformer, downsample=2**level, on_down_path=on_down_path))

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


def select_by_resolution(sites: list[Site], max_downsample: int) -> list[Site]:
    """The blocks at the highest transformer resolution, or up to ``max_downsample`` times lower."""
    if not sites:
        return []
    finest = min(site.downsample for site in sites)
    return [site for site in sites if site.downsample <= finest * max_downsample]


class UNetFamily(Family):
    name = "U-Net"
    pipeline_attribute = "unet"
    timestep_index = 1
    key_value_refusal = None

    def sites(self, model: torch.nn.Module) -> list[Site]:
        return transformer_block_sites(model)

    def grid(self, module: torch.nn.Module, args: tuple, kwargs: dict) -> tuple[int, int] | None:
        """The real ``(height, width)`` of the 4-D feature map a ``Transformer2DModel`` receives."""
        hidden_states = argument(args, kwargs, 0, "hidden_states")
        return tuple(hidden_states.shape[-2:]) if hidden_states.ndim == 4 else None

    def select(self, sites: list[Site], config: TokenFusionConfig) -> list[Site]:
        return select_by_resolution(sites, config.max_downsample)

    def default_schedule(self, sites: list[Site]) -> str:
        """The paper's hybrid: pruned merging on the down path, MLERP after it."""
        return "".join("P" if site.on_down_path else "M" for site in sites)

    def check(self, model: torch.nn.Module, sites: list[Site], config: TokenFusionConfig) -> None:
        if config.blocks is not None:
            raise ValueError("blocks chooses blocks of diffusion transformers; a U-Net's are chosen by max_downsample.")
        if config.reduce == "kv" and "attn1" in config.modules:
            for site in sites:
                check_key_value_attention(f"{site.name}.attn1", site.block.attn1)

    def parts(self, site: Site, config: TokenFusionConfig) -> list[Part]:
        """Each of ``config.modules`` that the block has (a block may lack cross-attention)."""
        kinds = {
            "attn1": Part("attn1", "kv" if config.reduce == "kv" else "tokens"),
            "attn2": Part("attn2", key_mask=True),
            "ff": Part("ff", chunks=True),
        }
        return [kinds[name] for name in config.modules if getattr(site.block, name, None) is not None]
