"""``reduce="kv"`` on joint attentions (SD3 / SD3.5, FLUX.1): every query kept, reduced image keys and values.

These attentions compute their queries, keys and values from the same tokens in one processor call, and SD3's
``JointAttnProcessor2_0`` takes no attention mask, so :class:`~tofu_sd.reducing.KeyValueHook`'s route (the reduced
tokens as ``encoder_hidden_states``, the bias as ``attention_mask``) cannot reach them. :class:`JointKeyValueHook`
runs such an attention itself, step by step as the family's processor does (:func:`sd3_attention` mirrors
``JointAttnProcessor2_0``, :func:`flux_attention` ``FluxAttnProcessor``, diffusers 0.42.1) with the module's own
projections, norms and output projections, except that the image keys and values come from the block's reduced
image tokens (its matching and schedule letter) and proportional attention's ``log(size)`` bias goes with them
(0 on the text keys) through an attention call that takes an additive mask: ``F.scaled_dot_product_attention``
for SD3 (which its processor calls), diffusers' ``dispatch_attention_fn`` with the processor's backend for Flux.
Every query (text and image) and the text keys and values are computed as the processor computes them.
Families outside this module give their own mirror the same way (Qwen-Image, Wan, Sana, Z-Image, FLUX.2 in
:mod:`tofu_sd.flux2_kv`: :class:`JointAttention` with the call's layout, ``fits``, that their mirror takes).
Chroma runs :func:`flux_attention` under its attention mask (``JointAttention.mask``): each reduced key's mask
entry is made from its group's tokens' entries (:func:`grouped_key_bias`, which also gives ``log(size)``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from diffusers.hooks import ModelHook
from diffusers.models.attention_dispatch import dispatch_attention_fn
from diffusers.models.embeddings import apply_rotary_emb

from .arguments import argument
from .merge import MODES, Matching, log_size_bias, reduce_tokens
from .reducing import gather_rotary
from .state import BlockState


def fits_sequence_table(text, emb, m: Matching, text_len: int, extras: dict) -> bool:
    """SD3's and Flux's calls: no rotary table, or one row per token of the call's ``[text, image]``."""
    positions = text_len + m.num_tokens + (0 if text is None else text.shape[1])
    return emb is None or emb[0].shape[0] == positions


@dataclass(frozen=True)
class JointAttention:
    """A family's joint attention under ``reduce="kv"``: the processor class whose computation ``run`` mirrors,
    and ``run(attn, x, text, rotary_emb, m, mode, text_len, **extras)``, the attention with the image keys and
    values reduced (``x`` the call's ``hidden_states``, its first ``text_len`` tokens text; ``text`` its
    ``encoder_hidden_states``), returning what the processor returns."""

    processor: type
    run: Callable
    #: the processor takes the fused QKV projections when the module's ``fused_projections`` is set (Flux's);
    #: SD3's fused projections come with a processor of their own
    reads_fused_flag: bool = False
    #: the call's argument (4th positional, or by name) that carries its rotary table
    rotary_argument: str = "image_rotary_emb"
    #: ``fits(text, rotary_emb, m, text_len, extras)``: whether a call's text, table and ``extras`` are laid out
    #: as ``run`` takes them (a call that does not fit runs untouched)
    fits: Callable = fits_sequence_table
    #: keyword arguments of the call that ``run`` takes too (Qwen-Image's ``encoder_hidden_states_mask``)
    extras: tuple[str, ...] = ()
    #: ``run`` takes the call's ``attention_mask`` (3rd positional, or by name) as the keyword ``attention_mask``
    #: and combines it with the reduced keys (Chroma's, Z-Image's); otherwise a call with a mask runs untouched
    mask: bool = False

    def fused(self, attn: torch.nn.Module) -> bool:
        """Whether ``attn``'s processor would compute with its fused QKV projections."""
        return self.reads_fused_flag and getattr(attn, "fused_projections", False) is True

    def mirrors(self, attn: torch.nn.Module) -> bool:
        """Whether ``run`` computes ``attn`` as its processor does (its processor class, unfused)."""
        return type(getattr(attn, "processor", None)) is self.processor and not self.fused(attn)

    def check(self, name: str, attn: torch.nn.Module) -> None:
        """Raise ``ValueError`` if ``attn`` is not computed as ``run`` mirrors (another processor, fused QKV)."""
        processor = getattr(attn, "processor", None)
        fused = self.fused(attn)
        if not self.mirrors(attn):
            what = "fused QKV projections" if fused else f"the attention processor {type(processor).__name__}"
            raise ValueError(
                f"reduce='kv' cannot patch {name}: it runs the attention itself as {self.processor.__name__} does "
                f"(unfused), and {name} has {what}; unfuse the projections or set {self.processor.__name__} "
                "(e.g. IP-Adapter, PAG and xformers processors are not mirrored), or use reduce='tokens'."
            )


class JointKeyValueHook(ModelHook):
    """On a joint attention of a patched block: while the block has a matching, runs the attention itself with
    every query and the reduced image keys and values (``joint.run``); otherwise, or for a call it does not
    mirror, runs the module untouched: another processor or fused projections set after ``apply``, an attention
    mask of the caller's, context parallelism, another token count or batch, a rotary table laid out otherwise.

    ``text_first``: the call's ``hidden_states`` is ``[text, image]`` (Flux's single-stream blocks; the text
    length is the block's, :attr:`BlockState.text_len`). It replaces the module's forward (``new_forward``);
    the ``joint.extras`` arguments are keyword-only (diffusers' attentions take them so)."""

    def __init__(self, state: BlockState, letter: str, joint: JointAttention, text_first: bool = False) -> None:
        super().__init__()
        self.state, self.letter, self.mode = state, letter, MODES[letter]
        self.joint, self.text_first = joint, text_first

    def _mirrored(self, module, args, kwargs) -> bool:
        m = self.state.matching
        x = argument(args, kwargs, 0, "hidden_states")
        text_len = self.state.text_len if self.text_first else 0
        if m is None or text_len is None or not isinstance(x, torch.Tensor) or x.ndim != 3:
            return False
        if not self.joint.mirrors(module):
            return False
        if getattr(module.processor, "_parallel_config", None) is not None:
            return False
        if not self.joint.mask and argument(args, kwargs, 2, "attention_mask") is not None:
            return False
        if x.shape[0] != m.batch or x.shape[1] != text_len + m.num_tokens:
            return False
        emb = argument(args, kwargs, 3, self.joint.rotary_argument)
        text = argument(args, kwargs, 1, "encoder_hidden_states")
        return self.joint.fits(text, emb, m, text_len, self._extras(args, kwargs))

    def _extras(self, args, kwargs) -> dict:
        extras = {name: kwargs.get(name) for name in self.joint.extras}
        if self.joint.mask:
            extras["attention_mask"] = argument(args, kwargs, 2, "attention_mask")
        return extras

    def new_forward(self, module, *args, **kwargs):
        if not self._mirrored(module, args, kwargs):
            return self.fn_ref.original_forward(*args, **kwargs)
        return self.joint.run(
            module,
            argument(args, kwargs, 0, "hidden_states"),
            argument(args, kwargs, 1, "encoder_hidden_states"),
            argument(args, kwargs, 3, self.joint.rotary_argument),
            self.state.matching,
            self.mode,
            self.state.text_len if self.text_first else 0,
            **self._extras(args, kwargs),
        )


def _heads(t: torch.Tensor, batch: int, heads: int, head_dim: int) -> torch.Tensor:
    """``(B, S, heads * head_dim)`` as ``(B, heads, S, head_dim)``, as ``JointAttnProcessor2_0`` lays it out."""
    return t.view(batch, -1, heads, head_dim).transpose(1, 2)


def sd3_attention(attn, x, text, emb, m: Matching, mode: str, text_len: int = 0):
    """``JointAttnProcessor2_0`` (SD3's joint ``attn`` with ``text``, SD3.5's image-only ``attn2`` without) with
    the keys and values of the image tokens ``x`` reduced by ``m`` and ``mode``, and ``log(size)`` on their
    logits. Queries of every token, text keys and values as the processor computes them; outputs as it returns
    them (image, and text unless there is none)."""
    B, N = x.shape[:2]
    keys = reduce_tokens(x, m, mode)
    query, key, value = attn.to_q(x), attn.to_k(keys), attn.to_v(keys)
    bias = log_size_bias(m, query.dtype)  # the query's dtype, as scaled-dot-product attention takes a mask
    head_dim = key.shape[-1] // attn.heads
    query, key = _heads(query, B, attn.heads, head_dim), _heads(key, B, attn.heads, head_dim)
    value = _heads(value, B, attn.heads, head_dim)
    if attn.norm_q is not None:
        query = attn.norm_q(query)
    if attn.norm_k is not None:
        key = attn.norm_k(key)
    if text is not None:
        text_q = _heads(attn.add_q_proj(text), B, attn.heads, head_dim)
        text_k = _heads(attn.add_k_proj(text), B, attn.heads, head_dim)
        text_v = _heads(attn.add_v_proj(text), B, attn.heads, head_dim)
        if attn.norm_added_q is not None:
            text_q = attn.norm_added_q(text_q)
        if attn.norm_added_k is not None:
            text_k = attn.norm_added_k(text_k)
        query, key, value = torch.cat([query, text_q], 2), torch.cat([key, text_k], 2), torch.cat([value, text_v], 2)
        bias = torch.cat([bias, bias.new_zeros(B, 1, text.shape[1])], dim=-1)
    out = F.scaled_dot_product_attention(query, key, value, attn_mask=bias.unsqueeze(1), dropout_p=0.0, is_causal=False)
    out = out.transpose(1, 2).reshape(B, -1, attn.heads * head_dim).to(query.dtype)
    image, context = out[:, :N], out[:, N:]
    image = attn.to_out[1](attn.to_out[0](image))
    if text is None:
        return image
    return image, (context if attn.context_pre_only else attn.to_add_out(context))


def key_rotary(emb, text_len: int, m: Matching):
    """The rotary table of the keys ``[text, reduced image]``, one row per batch element and key, flat:
    ``(B * (T + N - r), D)`` for each of ``(cos, sin)``: the text keys keep their rows, and each reduced image key
    takes the row of the token in its slot (:func:`~tofu_sd.reducing.gather_rotary`): a kept token its own
    position, a merged group its destination's.

    Why the destination's: it is the token that stays in the group's slot, the one its sources were matched to
    (their most similar destination, usually a neighbour), so the group's key is placed where the group is
    anchored; with ``P`` the key *is* the destination's own key, which then rotates exactly as in full
    attention. It is also the rule of ``reduce="tokens"`` (:class:`~tofu_sd.reducing.RotaryHook`), so both
    reductions place a merged token alike. Averaging the positions instead would give a group a position no
    token of the image has."""
    rows = []
    for table in emb:
        text = table[:text_len].unsqueeze(0).expand(m.batch, -1, -1)
        rows.append(torch.cat([text, gather_rotary(table[text_len:], m)], dim=1).flatten(0, 1))
    return tuple(rows)


def rotate_per_row(x: torch.Tensor, table) -> torch.Tensor:
    """``x`` ``(B, S, H, D)`` rotated with a table of ``B * S`` rows (the batch folded into the sequence, which
    ``apply_rotary_emb`` takes one table for)."""
    B, S = x.shape[:2]
    return apply_rotary_emb(x.reshape(1, B * S, *x.shape[2:]), table, sequence_dim=1).view(x.shape)


def additive_mask(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """An attention mask as the logit bias it stands for, in ``dtype``: a boolean one 0 where True, ``-inf`` where
    False; a floating one (added to the logits by scaled-dot-product attention) as it is."""
    if mask.dtype == torch.bool:
        return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(~mask, float("-inf"))
    return mask.to(dtype)


def grouped_key_bias(image: torch.Tensor, m: Matching) -> torch.Tensor:
    """The logit bias of the reduced image keys from that of the image tokens: ``image`` ``(B, ..., N)`` (additive,
    per query if it likes), returned ``(B, ..., N - r)``: for each reduced key, ``log(sum(exp(b_i)))`` over the
    tokens ``i`` of its group (:attr:`~tofu_sd.merge.Matching.restore_idx`).

    Why: a group of ``s`` tokens stands for ``s`` keys, whose softmax weights, each ``exp(q . k_i + b_i)``, sum to
    ``exp(q . k + log(sum(exp(b_i))))`` when the keys are alike (``k_i = k``). Unmasked (``b_i = 0``) that is
    proportional attention's ``log(s)``; under a mask it counts the group's tokens that the query may see, each
    with its own bias (a boolean mask: ``log`` of the number of unmasked tokens, ``-inf`` if all are masked). So
    copies merged into one key give the full attention exactly, mask and all, and a key whose group is all
    padding stays masked. Computed in ``image``'s dtype (at least float32 for a bias in half precision)."""
    top = image.amax(dim=-1, keepdim=True)
    top = torch.where(torch.isfinite(top), top, torch.zeros_like(top))  # a row masked throughout: sums of 0
    slots = m.restore_idx.to(image.device)
    slots = slots.view(m.batch, *[1] * (image.ndim - 2), m.num_tokens).expand(image.shape)
    sums = image.new_zeros(*image.shape[:-1], m.num_tokens - m.r).scatter_add_(-1, slots, (image - top).exp())
    return sums.log() + top


def joint_key_bias(m: Matching, text_len: int, dtype: torch.dtype, mask: torch.Tensor | None = None) -> torch.Tensor:
    """The logit bias of the keys ``[text_len text keys, reduced image keys]``, broadcast over heads and queries:
    0 on the text and ``log(size)`` on the image keys, ``(B, 1, 1, T + N - r)``; with ``mask`` (a boolean or
    additive mask over ``[text, image]`` keys, ``(B or 1, heads or 1, queries or 1, T + N)``), the text keys'
    columns of it and the image keys' grouped (:func:`grouped_key_bias`), ``(B, heads or 1, queries or 1,
    T + N - r)``. In ``dtype`` (computed in at least float32)."""
    if mask is None:
        image_bias = log_size_bias(m, dtype)
        return torch.cat([image_bias.new_zeros(m.batch, 1, text_len), image_bias], dim=-1).unsqueeze(1)
    bias = additive_mask(mask, torch.promote_types(dtype, torch.float32))
    bias = bias.expand(m.batch, *bias.shape[1:])
    return torch.cat([bias[..., :text_len], grouped_key_bias(bias[..., text_len:], m)], dim=-1).to(dtype)


def fits_joint_mask(text, emb, m: Matching, text_len: int, extras: dict) -> bool:
    """:func:`fits_sequence_table`, and no ``attention_mask`` or a 4-D one over the call's ``[text, image]``
    queries and keys (Chroma's blocks make one so), ``(B or 1, heads or 1, S or 1, S)``."""
    if not fits_sequence_table(text, emb, m, text_len, extras):
        return False
    mask = extras.get("attention_mask")
    S = text_len + m.num_tokens + (0 if text is None else text.shape[1])
    if mask is None:
        return True
    return mask.ndim == 4 and mask.shape[0] in (1, m.batch) and mask.shape[-1] == S and mask.shape[-2] in (1, S)


def flux_query_key_value(attn, x, text, emb, m: Matching, mode: str, text_len: int = 0, attention_mask=None):
    """The queries, keys, values and key bias of :func:`flux_attention`: ``FluxAttnProcessor``'s (and
    ``Flux2AttnProcessor``'s, which computes them alike) up to the attention call, with the image keys and values
    from the image tokens reduced by ``m`` and ``mode``, each rotated with its slot's position
    (:func:`key_rotary`), and their bias from :func:`joint_key_bias`."""
    image = x[:, text_len:]
    keys = reduce_tokens(image, m, mode)
    if text_len:
        keys = torch.cat([x[:, :text_len], keys], dim=1)
    query = attn.to_q(x).unflatten(-1, (-1, attn.head_dim))
    key = attn.to_k(keys).unflatten(-1, (-1, attn.head_dim))
    value = attn.to_v(keys).unflatten(-1, (-1, attn.head_dim))
    query, key = attn.norm_q(query), attn.norm_k(key)
    if text is not None:
        text_q = attn.add_q_proj(text).unflatten(-1, (-1, attn.head_dim))
        text_k = attn.add_k_proj(text).unflatten(-1, (-1, attn.head_dim))
        text_v = attn.add_v_proj(text).unflatten(-1, (-1, attn.head_dim))
        text_q, text_k = attn.norm_added_q(text_q), attn.norm_added_k(text_k)
        query, key, value = torch.cat([text_q, query], 1), torch.cat([text_k, key], 1), torch.cat([text_v, value], 1)
    T = text_len if text is None else text.shape[1]  # text tokens in front of the image queries and keys
    if emb is not None:
        query = apply_rotary_emb(query, emb, sequence_dim=1)
        key = rotate_per_row(key, key_rotary(emb, T, m))
    return query, key, value, joint_key_bias(m, T, query.dtype, attention_mask)


def flux_attention(attn, x, text, emb, m: Matching, mode: str, text_len: int = 0, attention_mask=None):
    """``FluxAttnProcessor`` with the image keys and values reduced by ``m`` and ``mode`` and ``log(size)`` on
    their logits: a double-stream ``attn`` (image ``x``, ``text`` apart) or a single-stream one (``x`` is
    ``[text, image]``, its first ``text_len`` tokens text; no output projection). Every query is rotated with
    the call's table, as the processor does; keys with :func:`key_rotary`. A single-stream block projects its
    text keys in one call with the reduced image tokens, as the processor does with all of them (the same
    arithmetic per row; a BLAS may still round a product of fewer rows differently). The attention goes through
    the processor's backend (diffusers' dispatch), which must take an additive mask: the native ones do;
    diffusers' flash and sage backends refuse a mask with a ValueError. ``attention_mask`` (Chroma's, over
    ``[text, image]``): its text columns kept, its image columns grouped with the reduced keys
    (:func:`joint_key_bias`)."""
    query, key, value, bias = flux_query_key_value(attn, x, text, emb, m, mode, text_len, attention_mask)
    backend = getattr(attn.processor, "_attention_backend", None)  # set by the model's set_attention_backend
    out = dispatch_attention_fn(query, key, value, attn_mask=bias, backend=backend)
    out = out.flatten(2, 3).to(query.dtype)
    if text is None:
        return out
    context, out = out.split_with_sizes([text.shape[1], out.shape[1] - text.shape[1]], dim=1)
    out = attn.to_out[1](attn.to_out[0](out.contiguous()))
    return out, attn.to_add_out(context.contiguous())
