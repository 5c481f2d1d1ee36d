"""Stable Diffusion 3 / 3.5 (``SD3Transformer2DModel``): every ``JointTransformerBlock``, reduced around its joint
attention ``attn`` (and SD3.5's second, image-only ``attn2``), whose ``hidden_states`` are the image tokens and
``encoder_hidden_states`` the text; the grid is the latent's, in patches. With ``reduce="kv"`` both attentions
keep every query and take their image keys and values from the reduced tokens: they are run by
:class:`~tofu_sd.joint_kv.JointKeyValueHook` as ``JointAttnProcessor2_0`` computes them
(:func:`~tofu_sd.joint_kv.sd3_attention`), the one processor that path mirrors."""

from __future__ import annotations

import torch
from diffusers.models.attention import JointTransformerBlock
from diffusers.models.attention_processor import (
    FusedJointAttnProcessor2_0,
    JointAttnProcessor2_0,
    XFormersJointAttnProcessor,
)

from ..joint_kv import JointAttention, sd3_attention
from .base import Family, Site, latent_grid

#: SD3 attention processors that work on fewer image tokens than the call started with.
PROCESSORS = (JointAttnProcessor2_0, FusedJointAttnProcessor2_0, XFormersJointAttnProcessor)


class SD3Family(Family):
    name = "SD3"
    timestep_index = 3
    key_value_refusal = None
    joint_attention = JointAttention(JointAttnProcessor2_0, sd3_attention)

    def sites(self, model: torch.nn.Module) -> list[Site]:
        return [
            Site(f"transformer_blocks.{i}", block, model, ("attn", "attn2") if block.attn2 is not None else ("attn",))
            for i, block in enumerate(model.transformer_blocks)
            if isinstance(block, JointTransformerBlock)
        ]

    def grid(self, module, args, kwargs):
        return latent_grid(module, args, kwargs)

    def check_attention(self, name: str, attn: torch.nn.Module) -> None:
        processor = getattr(attn, "processor", None)
        if not isinstance(processor, PROCESSORS):
            raise ValueError(
                f"Token Fusion cannot patch {name}: its attention processor {type(processor).__name__} is not one of "
                f"{', '.join(p.__name__ for p in PROCESSORS)} (IP-Adapter and PAG processors are not supported)."
            )
