"""Sana / Sana 1.5 / Sana Sprint (``SanaTransformer2DModel``): every ``SanaTransformerBlock``, reduced around its
self-attention ``attn1`` alone; the grid is the latent's ``(H, W)`` in patches (``patch_size``, 1 for Sana).

Only ``attn1`` runs on reduced tokens: the cross-attention ``attn2`` is cheap (few text keys) and the feed-forward
``GLUMBConv`` reshapes the tokens into a ``(B, C, H, W)`` image for its 3 x 3 depthwise convolution, so it must
see every token in place. ``attn1`` is linear attention (``SanaLinearAttnProcessor2_0``: ReLU features, cost
linear in the token count): on ``N - r`` tokens its projections and its key-value products shrink in proportion,
``r / N`` of that attention's work, not the quadratic saving Token Fusion gives softmax attention, so the speed-up
per block is smaller than on PixArt at the same ratio. Accepted processors on ``attn1``: the linear one and its
perturbed-attention-guidance variants (``PAGCFGSanaLinearAttnProcessor2_0``, ``PAGIdentitySanaLinearAttnProcessor2_0``,
whose batch chunks are reduced with their rows of the one matching), and softmax ``SanaAttnProcessor2_0`` /
``AttnProcessor2_0``; others are refused.

``reduce="kv"`` is refused: the linear processor ignores an attention mask, so proportional attention's
``log(size)`` weight of a merged key cannot be applied (and reducing only keys and values of a linear attention
saves little). The timestep is the model's own argument: ``SanaPipeline`` already multiplies it by the config's
``timestep_scale``. The default schedule (``M`` in every block) is provisional: no trained Sana weights were
analysed (``tofu-sd analyze``); it is the choice made for the other transformers.
"""

from __future__ import annotations

import torch
from diffusers.models.attention_processor import (
    AttnProcessor2_0,
    PAGCFGSanaLinearAttnProcessor2_0,
    PAGIdentitySanaLinearAttnProcessor2_0,
    SanaLinearAttnProcessor2_0,
)
from diffusers.models.transformers.sana_transformer import (
    SanaAttnProcessor2_0,
    SanaTransformerBlock,
)

from .base import Family, Site, latent_grid

#: The processors of ``attn1`` that Token Fusion runs on reduced tokens (each maps every token on its own row).
PROCESSORS = (
    SanaLinearAttnProcessor2_0,
    PAGCFGSanaLinearAttnProcessor2_0,
    PAGIdentitySanaLinearAttnProcessor2_0,
    SanaAttnProcessor2_0,
    AttnProcessor2_0,
)


class SanaFamily(Family):
    name = "Sana"
    tested_diffusers = "0.42.1"  # the release its adapter was written and tested on
    timestep_index = 2
    key_value_refusal = (
        "its self-attention is linear attention, whose processor ignores attention masks, so proportional "
        "attention's log(size) weight of a merged key cannot be applied"
    )

    def sites(self, model: torch.nn.Module) -> list[Site]:
        return [
            Site(f"transformer_blocks.{i}", block, model, ("attn1",))
            for i, block in enumerate(model.transformer_blocks)
            if isinstance(block, SanaTransformerBlock)
        ]

    def grid(self, module, args, kwargs):
        return latent_grid(module, args, kwargs)

    def check_attention(self, name: str, attn: torch.nn.Module) -> None:
        processor = getattr(attn, "processor", None)
        if type(processor) not in PROCESSORS:
            raise ValueError(
                f"Token Fusion cannot patch {name}: its attention processor {type(processor).__name__} is not one it "
                f"knows to run on reduced tokens ({', '.join(p.__name__ for p in PROCESSORS)})."
            )
