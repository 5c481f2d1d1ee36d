"""What ``tofu-sd analyze`` knows of the blocks of the newer diffusion-transformer families (Qwen-Image, Wan), whose
attentions differ from the joint attention of SD3 / Flux that :func:`~evaluation.linearity.joint_query_attention`
computes: per family, the attention function ``f`` of a reduced attention call and the block's feed-forward
(:class:`FamilyProbe`, :data:`FAMILY_PROBES`).

``f`` maps interpolated image tokens to the attention's image output for each as the *query*, the keys and values
those of the call's real tokens (fixed), each query rotated at its pair's *destination*'s rotary position (the
position a merged group takes in ``tofu_sd``), as the family's processor in diffusers 0.42.1 computes one query:

- Qwen-Image (``QwenDoubleStreamAttnProcessor2_0``): heads of ``inner_dim / heads``; ``to_q`` then ``norm_q`` then
  the complex rotation of the image table (``apply_rotary_emb_qwen``); image keys (``to_k``, ``norm_k``, image
  table) and text keys (``add_k_proj``, ``norm_added_k``, text table), text first, with the processor's mask from
  ``encoder_hidden_states_mask``; ``to_out`` on the image output;
- Wan (``WanAttnProcessor``, ``attn1``: a self-attention of the video tokens, no text): ``to_q`` and ``norm_q``
  over all heads, then the real ``(cos, sin)`` rotation of channel pairs ``(2i, 2i + 1)`` of each head with the
  token's ``(t, h, w)`` row; keys alike with their own rows; ``to_out``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from diffusers.models.transformers.transformer_qwenimage import apply_rotary_emb_qwen

from tofu_sd.arguments import argument

from .dit_families_more import SITE_PROBES, attend


def destination_rows(table: torch.Tensor, dst: torch.Tensor, points: int) -> torch.Tensor:
    """Rows ``table[dst[b, j]]`` of a per-token table ``(N, D)``, each repeated for the ``points`` points of pair
    ``j``: ``(B * K * points, D)``, batch-major, the layout of the queries flattened over the batch."""
    B, K = dst.shape
    rows = table.index_select(0, dst.reshape(-1)).view(B, K, 1, -1)
    return rows.expand(B, K, points, -1).reshape(B * K * points, -1)


# --- Qwen-Image --------------------------------------------------------------------------------------------------


def qwen_query_attention(attn, queries, image, text, *, query_table=None, image_table=None, text_table=None,
                         text_mask=None) -> torch.Tensor:  # fmt: skip
    """The image output of a Qwen-Image joint attention for ``queries`` ``(B, M, C)`` against the fixed keys and
    values of ``image`` ``(B, N, C)`` and ``text`` ``(B, T, C)``. Complex rotary tables (``apply_rotary_emb_qwen``,
    ``use_real=False``): ``query_table`` ``(B * M, D / 2)``, a row per query, batch-major; ``image_table``
    ``(N, D / 2)``, ``text_table`` ``(T, D / 2)``. ``text_mask``: the call's ``encoder_hidden_states_mask``
    ``(B, T)``, joined to the image keys as the processor joins it."""
    head_dim = attn.inner_dim // attn.heads
    heads = lambda x: x.unflatten(-1, (-1, head_dim))
    q, k, v = heads(attn.to_q(queries)), heads(attn.to_k(image)), heads(attn.to_v(image))
    text_k, text_v = heads(attn.add_k_proj(text)), heads(attn.add_v_proj(text))
    q = q if attn.norm_q is None else attn.norm_q(q)
    k = k if attn.norm_k is None else attn.norm_k(k)
    text_k = text_k if attn.norm_added_k is None else attn.norm_added_k(text_k)
    if query_table is not None:
        q = apply_rotary_emb_qwen(q.reshape(1, -1, *q.shape[2:]), query_table, use_real=False).view(q.shape)
        k = apply_rotary_emb_qwen(k, image_table, use_real=False)
        text_k = apply_rotary_emb_qwen(text_k, text_table, use_real=False)
    mask = None
    if text_mask is not None:
        image_mask = torch.ones(image.shape[:2], dtype=torch.bool, device=image.device)
        mask = torch.cat([text_mask, image_mask], dim=1)[:, None, None, :]
    out = attend(attn, q, torch.cat([text_k, k], dim=1), torch.cat([text_v, v], dim=1), mask)
    out = attn.to_out[0](out.contiguous())
    return attn.to_out[1](out) if len(attn.to_out) > 1 else out


def qwen_measured(attn, args: tuple, kwargs: dict, dst: torch.Tensor):
    """``(f, z)`` of a call of a Qwen-Image block's ``attn`` (``z``: its image tokens); None for a call laid out
    otherwise (no text, an ``attention_mask``, a rotary table not over ``(image, text)``)."""
    z, text = argument(args, kwargs, 0, "hidden_states"), argument(args, kwargs, 1, "encoder_hidden_states")
    emb, mask = kwargs.get("image_rotary_emb"), kwargs.get("encoder_hidden_states_mask")
    if not isinstance(z, torch.Tensor) or text is None or argument(args, kwargs, 2, "attention_mask") is not None:
        return None
    if emb is not None and (emb[0].shape[0] != z.shape[1] or emb[1].shape[0] != text.shape[1]):
        return None

    def f(points: torch.Tensor) -> torch.Tensor:
        B, K, P, C = points.shape
        tables = {}
        if emb is not None:
            tables = {"query_table": destination_rows(emb[0], dst, P), "image_table": emb[0], "text_table": emb[1]}
        out = qwen_query_attention(attn, points.reshape(B, K * P, C), z, text, text_mask=mask, **tables)
        return out.reshape(B, K, P, -1)

    return f, z


# --- Wan ---------------------------------------------------------------------------------------------------------


def wan_rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """``x`` ``(B, S, H, D)`` with each channel pair ``(2i, 2i + 1)`` of each head rotated by the angle of its
    token's row, ``cos`` and ``sin`` ``(S, D)`` (each angle twice, as ``WanRotaryPosEmbed`` lays them out);
    computed as ``WanAttnProcessor`` does, in the tables' precision, returned in ``x``'s dtype."""
    even, odd = x[..., 0::2], x[..., 1::2]
    c, s = cos[:, None, 0::2], sin[:, None, 1::2]  # (S, 1, D / 2)
    return torch.stack([even * c - odd * s, even * s + odd * c], dim=-1).flatten(-2).to(x.dtype)


def wan_query_attention(attn, queries, context, *, query_rotary=None, context_rotary=None) -> torch.Tensor:
    """Wan's self-attention ``attn1`` for ``queries`` ``(B, M, C)`` against the fixed keys and values of
    ``context`` ``(B, N, C)``. Rotary ``(cos, sin)`` rows: ``query_rotary`` ``(B * M, D)`` (a row per query,
    batch-major), ``context_rotary`` ``(N, D)``."""
    q, k, v = attn.to_q(queries), attn.to_k(context), attn.to_v(context)
    q, k = attn.norm_q(q), attn.norm_k(k)  # over all heads, before they are split
    q, k, v = (t.unflatten(2, (attn.heads, -1)) for t in (q, k, v))
    if query_rotary is not None:
        q = wan_rotate(q.reshape(1, -1, *q.shape[2:]), *query_rotary).view(q.shape)
        k = wan_rotate(k, *context_rotary)
    out = attend(attn, q, k, v)
    return attn.to_out[1](attn.to_out[0](out))


def wan_measured(attn, args: tuple, kwargs: dict, dst: torch.Tensor):
    """``(f, z)`` of a call of a Wan block's ``attn1``; None for a call that is no plain self-attention (a text,
    a mask, added keys) or whose rotary table is not ``(cos, sin)`` ``(1, N, 1, D)`` over its tokens."""
    z, emb = argument(args, kwargs, 0, "hidden_states"), argument(args, kwargs, 3, "rotary_emb")
    if not isinstance(z, torch.Tensor) or getattr(attn, "add_k_proj", None) is not None:
        return None
    if any(argument(args, kwargs, i, name) is not None for i, name in ((1, "encoder_hidden_states"), (2, "attention_mask"))):
        return None
    if emb is not None and not all(t.ndim == 4 and t.shape[:3] == (1, z.shape[1], 1) for t in emb):
        return None
    table = None if emb is None else tuple(t[0, :, 0] for t in emb)  # (N, D) cos and sin

    def f(points: torch.Tensor) -> torch.Tensor:
        B, K, P, C = points.shape
        rotary = {}
        if table is not None:
            rotary = {"query_rotary": tuple(destination_rows(t, dst, P) for t in table), "context_rotary": table}
        return wan_query_attention(attn, points.reshape(B, K * P, C), z, **rotary).reshape(B, K, P, -1)

    return f, z


# --- the table ---------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class FamilyProbe:
    """How analyze measures a family's blocks: ``measured(attn, args, kwargs, dst)`` gives ``(f, z)`` of a call
    of a reduced attention (``dst``: the pairs' destinations ``(B, K)``; None: the call is not measured), the
    block's feed-forward module is ``feed_forward``; ``attention_text`` and ``feed_forward_text`` say so in
    ``fl.json``."""

    measured: Callable
    feed_forward: str
    attention_text: str
    feed_forward_text: str


_QUERY = "with the interpolated image token as query, rotated at the pair's destination's position; keys and values: "
#: The families (as :class:`tofu_sd.Family` names them) whose blocks these probes know.
FAMILY_PROBES = {
    "Qwen-Image": FamilyProbe(
        qwen_measured, "img_mlp", "attn (QwenDoubleStreamAttnProcessor2_0) " + _QUERY + "the call's real image and "
        "text tokens, fixed, the text's padding mask kept", "img_mlp on the interpolated img_mlp input (image tokens)",
    ),
    "Wan": FamilyProbe(
        wan_measured, "ffn", "attn1 (WanAttnProcessor) " + _QUERY + "the call's real video tokens, fixed",
        "ffn on the interpolated ffn input (video tokens)",
    ),
    **SITE_PROBES,  # Chroma, FLUX.2, Z-Image, Sana: their blocks differ by kind (:class:`.dit_families_more.SiteProbe`)
}  # fmt: skip

#: Why the other diffusion-transformer families have no probe yet (analyze refuses them with this reason): none
#: left since Chroma, FLUX.2, Z-Image and Sana got theirs (:mod:`.dit_families_more`).
UNPROBED: dict[str, str] = {}
