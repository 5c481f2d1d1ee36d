"""FLUX.2 (``Flux2Transformer2DModel``, FLUX.2 [dev] and [klein]): its double-stream blocks, then its single-stream
blocks, in forward order (the ``blocks`` option indexes them so, as FLUX.1's).

Its input is packed ``(B, N, C)``; the grid comes from the call's ``img_ids``, as in FLUX.1 (:mod:`.flux`), but
FLUX.2's ids have four columns ``(t, row, col, layer)`` (``Flux2Pipeline._prepare_latent_ids``): columns 1 and 2
must form the row-major grid of the image tokens, one id per token. ``Flux2Pipeline`` appends reference images'
tokens (and ids, at other ``t``) to the image tokens for editing: no grid, refused at the call; so is the KV-cached
reference mode (``kv_cache_mode``) of FLUX.2 [klein].

A double-stream block is reduced around ``attn`` (image ``hidden_states``; the text ``encoder_hidden_states`` pass
untouched). The rotary table is computed once per call and shared by all blocks, a real ``(cos, sin)`` pair over
``[text, image]`` that ``Flux2AttnProcessor`` applies right after the query / key norms, as FLUX.1's: the
attention is called without it and the rotary hooks on ``norm_q`` / ``norm_k`` (``norm_added_q`` /
``norm_added_k`` for the text) rotate each kept token with its own position (a merged group: its destination's).
The shared modulation is per batch element, not per token: it needs nothing.

A single-stream block gets ``[text, image]``, concatenated by the model (its ``encoder_hidden_states`` is
``None``): its matching is taken on the last ``h * w`` tokens (``Site.image_last``), and its fused parallel
attention ``attn`` (``Flux2ParallelSelfAttnProcessor``: attention and MLP from one projection, one output
projection over both) runs on the text and the reduced image tokens, its image part restored. The MLP half works
per token, so it runs on the same reduced tokens, as the whole single-stream attention of FLUX.1 does; the rotary
table's rows follow their tokens through the hooks on ``norm_q`` / ``norm_k``.

With ``reduce="kv"`` the attentions of both kinds of block keep every query (text and image) and take their image
keys and values from the block's reduced image tokens, with proportional attention's ``log(size)`` on their
logits: :class:`~tofu_sd.joint_kv.JointKeyValueHook` runs them as ``Flux2AttnProcessor`` and
``Flux2ParallelSelfAttnProcessor`` compute them (:mod:`tofu_sd.flux2_kv`), each reduced key rotated with its
slot's position (a merged group: its destination's), as FLUX.1's.

The default schedule, ``M`` in every block, is provisional: no FLUX.2 weights were analysed (``tofu-sd
analyze``); it is the diffusion transformers' default.
"""

from __future__ import annotations

import torch
from diffusers.models.transformers.transformer_flux2 import (
    Flux2AttnProcessor,
    Flux2ParallelSelfAttention,
    Flux2ParallelSelfAttnProcessor,
    Flux2SingleTransformerBlock,
    Flux2TransformerBlock,
)

from ..arguments import argument
from ..config import TokenFusionConfig
from ..flux2_kv import FLUX2_ATTENTION
from .base import Family, Part, Site
from .flux import grid_from_ids, two_stream_sites


class Flux2Family(Family):
    name = "FLUX.2"
    tested_diffusers = "0.42.1"  # the release its adapter was written and tested on
    timestep_index = 2
    timestep_scale = 1000.0
    rotary_norms = (("norm_q", False), ("norm_k", False), ("norm_added_q", True), ("norm_added_k", True))
    key_value_refusal = None
    joint_attention = FLUX2_ATTENTION

    def sites(self, model: torch.nn.Module) -> list[Site]:
        return two_stream_sites(model, Flux2TransformerBlock, Flux2SingleTransformerBlock, image_last=True)

    def grid(self, module, args, kwargs) -> tuple[int, int]:
        """The token grid of a FLUX.2 call, from its ``img_ids``; ``ValueError`` if they are no row-major grid of
        ``hidden_states``' tokens or the call runs the KV-cached reference mode."""
        mode = kwargs.get("kv_cache_mode")
        if mode is not None:
            raise ValueError(
                f"Token Fusion on a Flux2Transformer2DModel does not support kv_cache_mode={mode!r} (FLUX.2 [klein]'s "
                "cached reference images): their tokens' keys and values are cached in full by the attention; "
                "tofu_sd.remove(pipe) to run it."
            )
        x = argument(args, kwargs, 0, "hidden_states")
        ids = argument(args, kwargs, 3, "img_ids")
        grid = grid_from_ids(ids) if isinstance(ids, torch.Tensor) else None
        if grid is None or x.shape[1] != grid[0] * grid[1]:
            raise ValueError(
                "Token Fusion on a Flux2Transformer2DModel takes the token grid from `img_ids`: columns 1 and 2 of "
                "its (t, row, col, layer) ids must hold the row and column of each image token of a row-major grid "
                "(as Flux2Pipeline builds them), one per token of `hidden_states`; got img_ids of shape "
                f"{None if ids is None else tuple(ids.shape)} for {x.shape[1]} tokens. Reference images appended "
                "to the image tokens (Flux2Pipeline's `image`) are not supported; tofu_sd.remove(pipe) to run them."
            )
        return grid

    def check_attention(self, name: str, attn: torch.nn.Module) -> None:
        processor = getattr(attn, "processor", None)
        single = isinstance(attn, Flux2ParallelSelfAttention)
        expected = Flux2ParallelSelfAttnProcessor if single else Flux2AttnProcessor
        if type(processor) is not expected:
            raise ValueError(
                f"Token Fusion cannot patch {name}: its attention processor {type(processor).__name__} is not "
                f"{expected.__name__}, the one that rotates queries and keys right after their norms, where Token "
                "Fusion rotates each kept token (the KV processors' cached reference tokens are not supported)."
            )

    def parts(self, site: Site, config: TokenFusionConfig) -> list[Part]:
        """Each block's ``attn``: with ``reduce="kv"`` a key-value part in single-stream blocks too (its
        :class:`~tofu_sd.joint_kv.JointKeyValueHook` finds the text in front of the image)."""
        if config.reduce == "kv":
            return [Part(name, "kv") for name in site.attentions]
        return super().parts(site, config)
