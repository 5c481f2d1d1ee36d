"""Chroma (``ChromaTransformer2DModel``): its double-stream blocks, then its single-stream blocks, in forward order.

Chroma is FLUX.1 [schnell] with its per-block modulation computed once per call by an approximator
(``distilled_guidance_layer``) from the timestep alone, per batch element and not per token: it needs nothing.
The grid comes from the call's ``img_ids`` (columns 1 and 2: row and column, as in FLUX.1, :func:`.flux.grid_from_ids`).
A double-stream block is reduced around its ``attn`` (``FluxAttention`` with ``FluxAttnProcessor``): image
``hidden_states`` reduced and restored, text untouched, rotary positions following their tokens through the hooks
on ``norm_q`` / ``norm_k`` / ``norm_added_q`` / ``norm_added_k``, as in FLUX.1. The model concatenates
``[text, image]`` before its single-stream blocks, whose input is that sequence: their matching is taken on its last
``h * w`` tokens (``Site.image_last``) and only that image part of their ``attn`` is reduced (the block's MLP runs
beside the attention, on every token).

The attention mask: ``ChromaPipeline`` always passes one over ``[text, image]`` (its prompt's padding masked, the
image tokens not), which each block turns into a mask per query and key, ``(B, 1, S, S)``; the reduced attention
takes it cut to the text and the kept image tokens, each kept slot with its own position's row and column
(:func:`~tofu_sd.reducing.cut_joint_mask`), so a padded text token is masked exactly as in the full model.
(Diffusers 0.42.1's ``ChromaPipeline`` builds that mask as 0 / 1 floats, which attention adds as a bias rather than
masking; the cut mask is the same bias on the kept tokens.)

With ``reduce="kv"`` the attentions of both kinds of block keep every query (text and image) and take their image
keys and values from the block's reduced image tokens, run as ``FluxAttnProcessor`` computes them
(:func:`~tofu_sd.joint_kv.flux_attention`, each reduced key rotated with its slot's position, as in FLUX.1), under
the call's mask: its rows (every query) and text columns as they are, and one column per reduced key made from the
columns of its group's tokens, ``log(sum(exp(mask_i)))`` (:func:`~tofu_sd.joint_kv.grouped_key_bias`): the log of
the total weight the group's keys had, which is proportional attention's ``log(size)`` plus the mask's value when
the group's entries agree (ChromaPipeline's mask never masks an image token), counts only unmasked tokens when they
do not, and is ``-inf`` for a group masked throughout. So merged copies give the masked full attention exactly.

The default schedule, ``M`` in every block, is provisional: no Chroma weights were analysed (``tofu-sd
analyze``); it is the diffusion transformers' default.
"""

from __future__ import annotations

import torch
from diffusers.models.transformers.transformer_chroma import (
    ChromaSingleTransformerBlock,
    ChromaTransformerBlock,
)
from diffusers.models.transformers.transformer_flux import FluxAttnProcessor

from ..arguments import argument
from ..config import TokenFusionConfig
from ..joint_kv import JointAttention, fits_joint_mask, flux_attention
from .base import Family, Part, Site
from .flux import grid_from_ids, two_stream_sites


class ChromaFamily(Family):
    name = "Chroma"
    processors = (FluxAttnProcessor,)
    processor_reason = (
        "the one that rotates queries and keys right after their norms, where Token Fusion rotates each kept "
        "token (IP-Adapter processors are not supported)"
    )
    tested_diffusers = "0.42.1"  # the release its adapter was written and tested on
    timestep_index = 2
    timestep_scale = 1000.0
    rotary_norms = (("norm_q", False), ("norm_k", False), ("norm_added_q", True), ("norm_added_k", True))
    key_value_refusal = None
    joint_attention = JointAttention(
        FluxAttnProcessor, flux_attention, reads_fused_flag=True, fits=fits_joint_mask, mask=True
    )

    def sites(self, model: torch.nn.Module) -> list[Site]:
        return two_stream_sites(model, ChromaTransformerBlock, ChromaSingleTransformerBlock, image_last=True)

    def grid(self, module, args, kwargs) -> tuple[int, int]:
        """The token grid of a Chroma call, from its ``img_ids``; ``ValueError`` for ids that are no row-major
        grid of ``hidden_states``' tokens."""
        x = argument(args, kwargs, 0, "hidden_states")
        ids = argument(args, kwargs, 3, "img_ids")
        grid = grid_from_ids(ids) if isinstance(ids, torch.Tensor) else None
        if grid is None or x.shape[1] != grid[0] * grid[1]:
            raise ValueError(
                "Token Fusion on a ChromaTransformer2DModel takes the token grid from `img_ids`: columns 1 and 2 "
                "must hold the row and column of each image token of a row-major grid (as ChromaPipeline builds "
                f"them), one per token of `hidden_states`; got img_ids of shape "
                f"{None if ids is None else tuple(ids.shape)} for {x.shape[1]} tokens."
            )
        return grid

    def parts(self, site: Site, config: TokenFusionConfig) -> list[Part]:
        """Each block's ``attn``; a double-stream one cuts its mask over ``[text, image]`` to the kept tokens. With
        ``reduce="kv"``, a key-value part in every block (the hook finds a single-stream block's text in front)."""
        if config.reduce == "kv":
            return [Part(name, "kv") for name in site.attentions]
        if site.single_stream:
            return super().parts(site, config)
        return [Part(name, "tokens", joint_mask=True) for name in site.attentions]
