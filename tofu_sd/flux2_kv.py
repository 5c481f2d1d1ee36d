"""``reduce="kv"`` on FLUX.2's attentions (``Flux2Transformer2DModel``): every query kept, reduced image keys and
values, run by :class:`~tofu_sd.joint_kv.JointKeyValueHook` as diffusers 0.42.1's processors compute them.

A FLUX.2 model has two kinds of attention, one processor each, under one family: the double-stream
``Flux2Attention`` (``Flux2AttnProcessor``: FLUX.1's computation, :func:`~tofu_sd.joint_kv.flux_query_key_value`)
and the single-stream ``Flux2ParallelSelfAttention`` (``Flux2ParallelSelfAttnProcessor``: one projection
``to_qkv_mlp_proj`` gives the queries, keys, values and the MLP's input of every token of ``[text, image]``, and
one output projection ``to_out`` takes the attention's and the MLP's outputs side by side). :data:`FLUX2_ATTENTION`
picks the mirror by the module's class.

In a single-stream block the projection runs on every token, as the processor runs it (the queries, the text's
keys and values and the MLP, which works per token, need every token); the image keys and values come from a
second call of the same module on the reduced image tokens, of which only the key and value columns are used.
That wastes the query and MLP columns of that call (about ``7/9`` of it with FLUX.2's MLP ratio 3) but keeps
whatever the module is (a LoRA or quantized layer, whose weights could not be sliced).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from diffusers.models.attention_dispatch import dispatch_attention_fn
from diffusers.models.embeddings import apply_rotary_emb
from diffusers.models.transformers.transformer_flux2 import (
    Flux2AttnProcessor,
    Flux2ParallelSelfAttention,
    Flux2ParallelSelfAttnProcessor,
)

from .joint_kv import JointAttention, flux_query_key_value, joint_key_bias, key_rotary, rotate_per_row
from .merge import Matching, reduce_tokens


def flux2_double_attention(attn, x, text, emb, m: Matching, mode: str, text_len: int = 0):
    """``Flux2AttnProcessor`` (a double-stream block's ``attn``: image ``x``, ``text`` apart) with the image keys
    and values reduced by ``m`` and ``mode`` and ``log(size)`` on their logits; returns ``(image, text)``
    outputs as the processor does."""
    query, key, value, bias = flux_query_key_value(attn, x, text, emb, m, mode)
    backend = getattr(attn.processor, "_attention_backend", None)  # set by the model's set_attention_backend
    out = dispatch_attention_fn(query, key, value, attn_mask=bias, backend=backend)
    out = out.flatten(2, 3).to(query.dtype)
    context, out = out.split_with_sizes([text.shape[1], out.shape[1] - text.shape[1]], dim=1)
    context = attn.to_add_out(context)
    return attn.to_out[1](attn.to_out[0](out)), context


def qkv_split(attn, projected: torch.Tensor) -> int:
    """How many columns of ``to_qkv_mlp_proj``'s output are queries, keys and values (the rest: the MLP's
    input), by the global ratio, as ``Flux2ParallelSelfAttnProcessor`` splits them."""
    qkv_dim, mlp_dim = 3 * attn.inner_dim, attn.mlp_hidden_dim * attn.mlp_mult_factor
    return projected.shape[-1] * qkv_dim // (qkv_dim + mlp_dim)


def flux2_parallel_attention(attn, x, text, emb, m: Matching, mode: str, text_len: int = 0):
    """``Flux2ParallelSelfAttnProcessor`` (a single-stream block's ``attn`` on ``x`` = ``[text, image]``, its first
    ``text_len`` tokens text) with the image keys and values from the reduced image tokens and ``log(size)`` on
    their logits: queries, text keys and values and the MLP half from the projection of every token, as the
    processor computes them; each query rotated with its own row, each reduced key with its slot's
    (:func:`~tofu_sd.joint_kv.key_rotary`)."""
    projected = attn.to_qkv_mlp_proj(x)
    split = qkv_split(attn, projected)
    qkv, mlp = torch.split(projected, [split, projected.shape[-1] - split], dim=-1)
    query, key, value = qkv.chunk(3, dim=-1)
    reduced = attn.to_qkv_mlp_proj(reduce_tokens(x[:, text_len:], m, mode))
    _, image_key, image_value = reduced[..., :split].chunk(3, dim=-1)
    key = torch.cat([key[:, :text_len], image_key], dim=1).unflatten(-1, (-1, attn.head_dim))
    value = torch.cat([value[:, :text_len], image_value], dim=1).unflatten(-1, (-1, attn.head_dim))
    query, key = attn.norm_q(query.unflatten(-1, (-1, attn.head_dim))), attn.norm_k(key)
    if emb is not None:
        query = apply_rotary_emb(query, emb, sequence_dim=1)
        key = rotate_per_row(key, key_rotary(emb, text_len, m))
    bias = joint_key_bias(m, text_len, query.dtype)
    backend = getattr(attn.processor, "_attention_backend", None)  # set by the model's set_attention_backend
    out = dispatch_attention_fn(query, key, value, attn_mask=bias, backend=backend)
    out = out.flatten(2, 3).to(query.dtype)
    return attn.to_out(torch.cat([out, attn.mlp_act_fn(mlp)], dim=-1))


def flux2_attention(attn, x, text, emb, m: Matching, mode: str, text_len: int = 0):
    """:func:`flux2_parallel_attention` for a single-stream attention, :func:`flux2_double_attention` else."""
    if isinstance(attn, Flux2ParallelSelfAttention):
        return flux2_parallel_attention(attn, x, text, emb, m, mode, text_len)
    return flux2_double_attention(attn, x, text, emb, m, mode)


def flux2_processor(attn: torch.nn.Module) -> type:
    """The processor class whose computation :func:`flux2_attention` mirrors for ``attn``."""
    return Flux2ParallelSelfAttnProcessor if isinstance(attn, Flux2ParallelSelfAttention) else Flux2AttnProcessor


@dataclass(frozen=True)
class Flux2JointAttention(JointAttention):
    """FLUX.2's joint attentions under ``reduce="kv"``: the processor mirrored is the module's kind's
    (:func:`flux2_processor`); ``processor`` names the double-stream one."""

    def mirrors(self, attn: torch.nn.Module) -> bool:
        return type(getattr(attn, "processor", None)) is flux2_processor(attn) and not self.fused(attn)

    def check(self, name: str, attn: torch.nn.Module) -> None:
        JointAttention(flux2_processor(attn), self.run, self.reads_fused_flag).check(name, attn)


#: FLUX.2's ``Family.joint_attention``. Only the double-stream processor reads the fused-projections flag (a
#: single-stream attention's projections are always fused into ``to_qkv_mlp_proj``, and cannot be unfused).
FLUX2_ATTENTION = Flux2JointAttention(Flux2AttnProcessor, flux2_attention, reads_fused_flag=True)
