"""PixArt-alpha / -Sigma (``PixArtTransformer2DModel``): every ``BasicTransformerBlock``, reduced around its
self-attention ``attn1`` (``reduce="kv"`` too: it takes a mask and its keys and values through
``encoder_hidden_states``); the grid is the latent's, in patches."""

from __future__ import annotations

import torch
from diffusers.models.attention import BasicTransformerBlock

from .base import Family, Site, latent_grid


class PixArtFamily(Family):
    name = "PixArt"
    timestep_index = 2
    key_value_refusal = None

    def sites(self, model: torch.nn.Module) -> list[Site]:
        return [
            Site(f"transformer_blocks.{i}", block, model, ("attn1",))
            for i, block in enumerate(model.transformer_blocks)
            if isinstance(block, BasicTransformerBlock)
        ]

    def grid(self, module, args, kwargs):
        return latent_grid(module, args, kwargs)
