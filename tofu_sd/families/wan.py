"""Wan 2.1 / 2.2 video (``WanTransformer3DModel``, text-to-video and image-to-video): every ``WanTransformerBlock``,
reduced around its self-attention ``attn1``, in forward order.

The token grid is 3-D: ``(frames, h, w)`` of the call's ``hidden_states`` ``(B, C, F, H, W)`` cut into its
``patch_size`` ``(t, h, w)`` patches, tokens frame-major (as the patch embedding flattens them); it is read from
the shape once per transformer call. Cells span ``st`` frames (``TokenFusionConfig.st``, default 2 here: the
most similar tokens of a video are in neighbouring frames). The cross-attention ``attn2`` takes the text (and, in
image-to-video, the CLIP image tokens through its added key / value projections) as keys and values, and its
queries are the block's video tokens at full count: it is left alone, so image conditioning is untouched.

Rotary positions follow their tokens: ``WanRotaryPosEmbed`` gives a real ``(cos, sin)`` row per ``(t, h, w)``
position, ``(1, N, 1, D)``, passed to ``attn1`` as ``rotary_emb`` and applied by ``WanAttnProcessor`` after
``norm_q`` / ``norm_k``. The kept tokens differ per batch element, so the table is taken out of the call
(:class:`WanRotary`) and each kept token's own row (a merged group: its destination's) rotates the normalized
queries and keys, as the processor would have. Other processors are refused.

With ``reduce="kv"`` ``attn1`` keeps every video token as a query and takes its keys and values from the block's
reduced tokens, with proportional attention's ``log(size)`` on their logits (:func:`wan_attention`, run by
:class:`~tofu_sd.joint_kv.JointKeyValueHook` as ``WanAttnProcessor`` computes a self-attention): each query
rotated with its own ``(t, h, w)`` row, each reduced key with its slot's (a merged group: its destination's).
:class:`~tofu_sd.reducing.KeyValueHook`'s route (the reduced tokens as ``encoder_hidden_states``) cannot serve:
the processor rotates queries and keys with the one table of the call, which has a row per query.

A 2-D ``timestep`` (Wan 2.2 TI2V's per-token timesteps, 0 on the conditioning frame) keys the partition and
counts steps by its largest value per batch row, the step's noise level.

The default schedule, ``M`` in every block, is provisional: no Wan weights were analysed (``tofu-sd analyze``);
it is the diffusion transformers' default.
"""

from __future__ import annotations

import torch
from diffusers.models.attention_dispatch import dispatch_attention_fn
from diffusers.models.transformers.transformer_wan import (
    WanAttnProcessor,
    WanTransformerBlock,
)

from ..arguments import argument
from ..joint_kv import JointAttention
from ..merge import Matching, log_size_bias, reduce_tokens
from ..reducing import RotaryLayout, gather_rotary
from .base import Family, Site


class WanRotary(RotaryLayout):
    """Wan's rotary table: ``rotary_emb`` ``(cos, sin)``, each ``(1, N, 1, D)`` over the video tokens alone (its
    self-attention has no text), applied to pairs of channels ``(2i, 2i + 1)`` of each head."""

    argument = "rotary_emb"

    def split(self, emb, text_len: int, m: Matching) -> tuple | None:
        """Each kept token's row, flat over the batch: ``(B * (N - r), D)`` cos and sin; no text table.
        ``None`` (the call is left alone) for a table laid out otherwise."""
        if text_len or not self.fits(emb, m):
            return None
        return tuple(gather_rotary(t[0, :, 0], m).flatten(0, 1) for t in emb), None

    @staticmethod
    def fits(emb, m: Matching) -> bool:
        """Whether ``emb`` is a ``(cos, sin)`` pair of ``(1, N, 1, D)`` tables over ``m``'s ``N`` tokens."""
        if not isinstance(emb, (tuple, list)) or len(emb) != 2:
            return False
        return all(isinstance(t, torch.Tensor) and t.ndim == 4 and t.shape[:3] == (1, m.num_tokens, 1) for t in emb)

    def rotate(self, x: torch.Tensor, table) -> torch.Tensor:
        """Normalized queries or keys ``x`` ``(1, S, heads * D)`` rotated with ``table`` (one ``(S, D)`` cos and
        sin row per token): each channel pair ``(a, b)`` becomes ``(a cos - b sin, a sin + b cos)``, computed in
        the table's precision and returned in ``x``'s dtype, as ``WanAttnProcessor`` computes it."""
        cos, sin = table
        pairs = x.unflatten(-1, (-1, cos.shape[-1] // 2, 2))  # (1, S, heads, D / 2, 2)
        a, b = pairs.unbind(-1)
        c, s = cos[:, None, 0::2], sin[:, None, 1::2]  # (S, 1, D / 2): the table repeats each angle twice
        rotated = torch.stack([a * c - b * s, a * s + b * c], dim=-1)
        return rotated.flatten(-3).to(x.dtype)


def wan_fits(text, emb, m: Matching, text_len: int, extras: dict) -> bool:
    """A call :func:`wan_attention` mirrors: a self-attention (no ``encoder_hidden_states``) with no rotary table
    or one laid out as :class:`WanRotary` takes it."""
    return text is None and (emb is None or WanRotary.fits(emb, m))


def wan_attention(attn, x, text, emb, m: Matching, mode: str, text_len: int = 0):
    """``WanAttnProcessor``'s self-attention with the keys and values from the tokens ``x`` reduced by ``m`` and
    ``mode`` and ``log(size)`` on their logits: every query as the processor computes it (rotated with its own
    row, :meth:`WanRotary.rotate` computing as the processor does); each reduced key rotated with its slot's row.
    Through diffusers' dispatch with the processor's backend (which must take an additive mask: the native ones
    do)."""
    tokens = reduce_tokens(x, m, mode)
    query, key, value = attn.to_q(x), attn.to_k(tokens), attn.to_v(tokens)
    query, key = attn.norm_q(query), attn.norm_k(key)
    if emb is not None:
        rotary = WanRotary()
        query = rotary.rotate(query, tuple(t[0, :, 0] for t in emb))
        keys_table = tuple(gather_rotary(t[0, :, 0], m).flatten(0, 1) for t in emb)  # each key: its slot's row
        key = rotary.rotate(key.reshape(1, -1, key.shape[-1]), keys_table).view(key.shape)
    query, key, value = (t.unflatten(2, (attn.heads, -1)) for t in (query, key, value))
    bias = log_size_bias(m, query.dtype).unsqueeze(1)  # (B, 1, 1, N - r): over heads and queries
    backend = getattr(attn.processor, "_attention_backend", None)  # set by the model's set_attention_backend
    out = dispatch_attention_fn(query, key, value, attn_mask=bias, dropout_p=0.0, is_causal=False, backend=backend)
    out = out.flatten(2, 3).type_as(query)
    return attn.to_out[1](attn.to_out[0](out))


class WanFamily(Family):
    name = "Wan"
    processors = (WanAttnProcessor,)
    processor_reason = "the one whose rotary embedding it knows how to apply per kept token"
    tested_diffusers = "0.42.1"  # the release its adapter was written and tested on
    timestep_index = 1
    default_st = 2
    rotary_norms = (("norm_q", False), ("norm_k", False))
    rotary_layout = WanRotary()
    key_value_refusal = None
    joint_attention = JointAttention(
        WanAttnProcessor, wan_attention, reads_fused_flag=True, rotary_argument="rotary_emb", fits=wan_fits
    )

    def sites(self, model: torch.nn.Module) -> list[Site]:
        return [
            Site(f"blocks.{i}", block, model, ("attn1",))
            for i, block in enumerate(model.blocks)
            if isinstance(block, WanTransformerBlock)
        ]

    def grid(self, module, args, kwargs) -> tuple[int, int, int] | None:
        """``(frames, h, w)`` of the call's ``(B, C, F, H, W)`` latent in ``patch_size`` patches."""
        x = argument(args, kwargs, 0, "hidden_states")
        if not isinstance(x, torch.Tensor) or x.ndim != 5:
            return None
        return tuple(n // p for n, p in zip(x.shape[2:], module.config.patch_size))

    def timestep(self, args: tuple, kwargs: dict):
        """The call's timestep; a per-token one ``(B, N)`` (Wan 2.2 TI2V) by its largest value per batch row."""
        timestep = super().timestep(args, kwargs)
        if isinstance(timestep, torch.Tensor) and timestep.ndim == 2:
            return timestep.amax(dim=1)
        return timestep
