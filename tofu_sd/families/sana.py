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

With ``reduce="kv"``, ``attn1`` keeps every token a query and takes its keys and values from the block's reduced
tokens (:func:`sana_attention`, run by :class:`~tofu_sd.joint_kv.JointKeyValueHook` as
``SanaLinearAttnProcessor2_0`` computes it; other processors are refused). Linear attention has no logits for
proportional attention's ``log(size)``; its equivalent is exact: softmax attention weighs key ``j`` by
``exp(q . k_j)``, which ``log(s_j)`` turns into ``s_j exp(q . k_j)``, and linear attention weighs it by
``relu(q) . relu(k_j)``, so each reduced key's feature ``relu(k_j)`` is multiplied by its group's size ``s_j`` (in
both the numerator's and the normalizer's sums). As with softmax, ``s`` identical tokens reduced to one give the
attention of the ``s`` tokens exactly. It saves less than on softmax attention: only the key and value
projections and the key-value products shrink. The timestep is the model's own argument: ``SanaPipeline`` already multiplies it by the config's
``timestep_scale``. The default schedule (``M`` in every block) is provisional: no trained Sana weights were
analysed (``tofu-sd analyze``); it is the choice made for the other transformers.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
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

from ..joint_kv import JointAttention
from ..merge import Matching, destination_sizes, reduce_tokens
from .base import Family, Site, latent_grid

#: The processors of ``attn1`` that Token Fusion runs on reduced tokens (each maps every token on its own row).
PROCESSORS = (
    SanaLinearAttnProcessor2_0,
    PAGCFGSanaLinearAttnProcessor2_0,
    PAGIdentitySanaLinearAttnProcessor2_0,
    SanaAttnProcessor2_0,
    AttnProcessor2_0,
)


def self_attention_fits(text, emb, m: Matching, text_len: int, extras: dict) -> bool:
    """A call :func:`sana_attention` mirrors: a self-attention (no ``encoder_hidden_states``), no rotary table."""
    return text is None and emb is None


def group_sizes(m: Matching) -> torch.Tensor:
    """``(B, N - r)`` float32: how many tokens each slot of the reduced sequence stands for."""
    sizes = destination_sizes(m, torch.float32)
    return torch.cat([sizes.new_ones(m.batch, m.num_tokens - m.r - m.num_dst), sizes], dim=1)


def sana_attention(attn, x, text, emb, m: Matching, mode: str, text_len: int = 0):
    """``SanaLinearAttnProcessor2_0`` with the keys and values from the tokens ``x`` reduced by ``m`` and ``mode``,
    each key's ReLU feature weighted by its group's size; every query as the processor computes it."""
    dtype = x.dtype
    tokens = reduce_tokens(x, m, mode)
    query, key, value = attn.to_q(x), attn.to_k(tokens), attn.to_v(tokens)
    if attn.norm_q is not None:
        query = attn.norm_q(query)
    if attn.norm_k is not None:
        key = attn.norm_k(key)
    query = F.relu(query.transpose(1, 2).unflatten(1, (attn.heads, -1))).float()  # (B, H, d, N)
    key = F.relu(key.transpose(1, 2).unflatten(1, (attn.heads, -1)).transpose(2, 3)).float()  # (B, H, N - r, d)
    key = key * group_sizes(m)[:, None, :, None].to(key.device)
    value = value.transpose(1, 2).unflatten(1, (attn.heads, -1)).float()  # (B, H, d, N - r)
    value = F.pad(value, (0, 0, 0, 1), mode="constant", value=1.0)  # the last row sums the normalizer
    out = torch.matmul(torch.matmul(value, key), query)
    out = out[:, :, :-1] / (out[:, :, -1:] + 1e-15)
    out = out.flatten(1, 2).transpose(1, 2).to(dtype)
    out = attn.to_out[1](attn.to_out[0](out))
    return out.clip(-65504, 65504) if dtype == torch.float16 else out


class SanaFamily(Family):
    name = "Sana"
    processors = PROCESSORS
    processor_reason = "the ones it knows to run on reduced tokens"
    tested_diffusers = "0.42.1"  # the release its adapter was written and tested on
    timestep_index = 2
    key_value_refusal = None
    joint_attention = JointAttention(SanaLinearAttnProcessor2_0, sana_attention, fits=self_attention_fits)

    def sites(self, model: torch.nn.Module) -> list[Site]:
        return [
            Site(f"transformer_blocks.{i}", block, model, ("attn1",))
            for i, block in enumerate(model.transformer_blocks)
            if isinstance(block, SanaTransformerBlock)
        ]

    def grid(self, module, args, kwargs):
        return latent_grid(module, args, kwargs)
