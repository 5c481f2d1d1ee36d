"""FLUX.1 (``FluxTransformer2DModel``): its double-stream blocks, then its single-stream blocks, in forward order.

Its input is packed ``(B, N, C)``: the grid comes from the call's ``img_ids`` (columns 1 and 2: the row and column
of each image token), which must form the row-major grid that ``FluxPipeline`` builds; it is read on the host
once per transformer call, outside any compiled graph. A double-stream block is reduced around ``attn`` (image
``hidden_states``, text ``encoder_hidden_states``); a single-stream block's ``attn`` sees ``[text, image]`` and
only its image part is reduced. Rotary positions follow their tokens: diffusers' ``apply_rotary_emb`` takes one
table for the whole batch while the kept tokens differ per batch element, so the attention is called without
``image_rotary_emb`` and rotary hooks on ``norm_q`` / ``norm_k`` (``norm_added_q`` / ``norm_added_k`` for the
text) rotate with a per-token table; a kept token keeps its own position and a merged group (A, M) takes its
destination's, the token that stays in the group's slot. That needs the processor to rotate right after the
norms, as ``FluxAttnProcessor`` does, so other Flux processors (IP-Adapter) are refused.

With ``reduce="kv"`` the attentions of both kinds of block keep every query (text and image) and take their
image keys and values from the reduced image tokens: :class:`~tofu_sd.joint_kv.JointKeyValueHook` runs them as
``FluxAttnProcessor`` computes them (:func:`~tofu_sd.joint_kv.flux_attention`), each reduced key rotated with
its slot's position by the same rule (:func:`~tofu_sd.joint_kv.key_rotary`)."""

from __future__ import annotations

import torch
from diffusers.models.transformers.transformer_flux import (
    FluxAttnProcessor,
    FluxSingleTransformerBlock,
    FluxTransformerBlock,
)

from ..arguments import argument
from ..config import TokenFusionConfig
from ..joint_kv import JointAttention, flux_attention
from .base import Family, Part, Site


def grid_from_ids(ids: torch.Tensor) -> tuple[int, int] | None:
    """``(h, w)`` if ``ids`` ``(N, 3)`` (or the deprecated ``(1, N, 3)``) hold, in columns 1 and 2, the row and
    column of each token of a row-major ``h x w`` grid, as ``FluxPipeline``'s ``img_ids`` do; else ``None``.
    Reads ``ids`` on the host (a sync)."""
    if ids.ndim == 3:
        ids = ids[0]
    if ids.ndim != 2 or ids.shape[-1] < 3 or ids.shape[0] == 0:
        return None
    rows, cols = ids[:, 1], ids[:, 2]
    h, w = (int(v) + 1 for v in torch.stack([rows.max(), cols.max()]).tolist())
    n = ids.shape[0]
    if h * w != n:
        return None
    position = torch.arange(n, device=ids.device)
    if not bool(((rows == position // w) & (cols == position % w)).all()):
        return None
    return h, w


def two_stream_sites(model: torch.nn.Module, double: type, single: type, image_last: bool = False) -> list[Site]:
    """The ``attn`` of each ``double`` block of ``model.transformer_blocks``, then of each ``single`` block of
    ``model.single_transformer_blocks`` (single-stream; ``image_last``: the model hands them ``[text, image]`` as one
    input, as FLUX.2 and Chroma do, where FLUX.1 passes the text apart)."""
    doubles = [
        Site(f"transformer_blocks.{i}", block, model, ("attn",))
        for i, block in enumerate(model.transformer_blocks)
        if isinstance(block, double)
    ]
    singles = [
        Site(f"single_transformer_blocks.{i}", block, model, ("attn",), single_stream=True, image_last=image_last)
        for i, block in enumerate(model.single_transformer_blocks)
        if isinstance(block, single)
    ]
    return doubles + singles


class FluxFamily(Family):
    name = "Flux"
    processors = (FluxAttnProcessor,)
    processor_reason = (
        "the one whose rotary embedding it knows how to apply per token (IP-Adapter processors are not "
        "supported)"
    )
    timestep_index = 3
    timestep_scale = 1000.0
    rotary_norms = (("norm_q", False), ("norm_k", False), ("norm_added_q", True), ("norm_added_k", True))
    key_value_refusal = None
    joint_attention = JointAttention(FluxAttnProcessor, flux_attention, reads_fused_flag=True)

    def sites(self, model: torch.nn.Module) -> list[Site]:
        return two_stream_sites(model, FluxTransformerBlock, FluxSingleTransformerBlock)

    def grid(self, module, args, kwargs) -> tuple[int, int]:
        """The patch grid of a Flux call, from its ``img_ids``; ``ValueError`` if they are no row-major grid."""
        x = argument(args, kwargs, 0, "hidden_states")
        ids = argument(args, kwargs, 4, "img_ids")
        grid = grid_from_ids(ids) if isinstance(ids, torch.Tensor) else None
        if grid is None or x.shape[1] != grid[0] * grid[1]:
            raise ValueError(
                "Token Fusion on a FluxTransformer2DModel takes the token grid from `img_ids`: columns 1 and 2 must "
                "hold the row and column of each image token of a row-major grid (as FluxPipeline builds them), one "
                f"per token of `hidden_states`; got img_ids of shape {None if ids is None else tuple(ids.shape)} for "
                f"{x.shape[1]} tokens. Pipelines that append other tokens to the image (FluxKontextPipeline's "
                "reference image, say) are not supported; tofu_sd.remove(pipe) to run them."
            )
        return grid

    def parts(self, site: Site, config: TokenFusionConfig) -> list[Part]:
        """Each block's ``attn``: with ``reduce="kv"`` a key-value part in single-stream blocks too (its
        :class:`~tofu_sd.joint_kv.JointKeyValueHook` finds the text in front of the image)."""
        if config.reduce == "kv":
            return [Part(name, "kv") for name in site.attentions]
        return super().parts(site, config)
