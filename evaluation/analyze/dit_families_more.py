"""What ``tofu-sd analyze`` knows of the blocks of Chroma, FLUX.2, Z-Image and Sana, whose blocks differ by kind
(double- and single-stream) or whose sequence holds more than the image: per family, :class:`SiteProbe` names, for
each block, the modules to watch and the function measured at each (:data:`SITE_PROBES`).

Each ``measured(module, args, kwargs, dst, rest)`` reads one call of a watched module (``dst``: the pairs'
destinations ``(B, K)``; ``rest``: how many of the block's tokens are not image tokens, the text in front of a
Chroma / FLUX.2 single-stream block's image, the padding and caption after a Z-Image layer's, 0 elsewhere) and
gives ``(f, z)``: ``z`` the call's image tokens, ``f`` the function of interpolated image tokens ``(B, K, P, C)``
whose FL is measured; None for a call laid out otherwise (then it is not measured). As in :mod:`.dit_families`,
an attention's ``f`` takes each point as the *query*, rotated at its pair's destination's rotary row, against the
keys and values of the call's real tokens (fixed), with the call's mask; as the processors of diffusers 0.42.1
compute one query:

- Chroma (``FluxAttnProcessor``) and FLUX.2 (``Flux2AttnProcessor``), double-stream ``attn``: ``to_q``, ``norm_q``,
  the real rotation of the ``[text, image]`` table's row ``T + dst``; keys and values of the text
  (``add_k_proj``, ``norm_added_k``) then of the image, all rotated; Chroma's mask ``(B, 1, S, S)`` cut to the
  query's row; ``to_out``. Single-stream ``attn`` alike on the block's ``[text, image]`` input, without
  ``to_out`` (Chroma's attention has none; FLUX.2's ``to_out`` projects the attention and the MLP together);
- FLUX.2's single-stream MLP: the MLP columns of the fused ``to_qkv_mlp_proj``, then ``mlp_act_fn`` (SwiGLU),
  as ``Flux2ParallelSelfAttnProcessor`` splits them; its queries are the first ``inner_dim`` columns;
- Z-Image (``ZSingleStreamAttnProcessor``): ``to_q``, ``norm_q``, the complex rotation of the element's own
  ``freqs_cis`` row at ``dst``; keys and values of the whole ``[image, rest]`` sequence with the key mask;
- Sana (``attn1``, linear attention with ReLU features, or the softmax processors): the attention's own processor
  with the points as queries and the real tokens as ``encoder_hidden_states`` (its keys and values); each query's
  output depends on no other query. Its feed-forward ``GLUMBConv`` is not measured: it mixes a 3 x 3 neighbourhood
  of the token grid and ``tofu_sd`` never runs it on reduced tokens, so its FL says nothing about the schedule.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

import torch
import torch.nn.functional as F
from diffusers.models.attention_dispatch import dispatch_attention_fn
from diffusers.models.attention_processor import AttnProcessor2_0, SanaLinearAttnProcessor2_0
from diffusers.models.embeddings import apply_rotary_emb
from diffusers.models.transformers.sana_transformer import SanaAttnProcessor2_0

from tofu_sd.arguments import argument
from tofu_sd.families.base import Site
from tofu_sd.families.zimage import rotate_complex_rows

SELF_ATTENTION, FEED_FORWARD = "self_attention", "feed_forward"


@dataclass(frozen=True)
class SiteProbe:
    """How analyze measures a family's blocks: ``hooks(site)`` lists ``(module, function, measured)``, a
    sub-module of the site's block (its name), the function (``self_attention`` or ``feed_forward``) and how a
    call of it is measured (see the module's docstring); ``attention_text`` and ``feed_forward_text`` say so in
    ``fl.json``."""

    hooks: Callable[[Site], list[tuple[str, str, Callable]]]
    attention_text: str
    feed_forward_text: str


# --- shared pieces ----------------------------------------------------------------------------------------------


def image_part(x: torch.Tensor, rest: int, image_first: bool = False) -> torch.Tensor:
    """The image tokens of a block's sequence ``x`` ``(B, S, C)``: after the ``rest`` tokens, or before them."""
    return x[:, : x.shape[1] - rest] if image_first else x[:, rest:]


def rows_per_point(table: torch.Tensor, rows: torch.Tensor, points: int) -> torch.Tensor:
    """``table[b, rows[b, j]]`` repeated for each of the ``points`` points of pair ``j``: ``(B, K * points, D)``;
    ``table`` ``(S, D)`` (one for the batch) or ``(B, S, D)`` (per element)."""
    B, K = rows.shape
    table = table.expand(B, *table.shape) if table.ndim == 2 else table
    picked = table.gather(1, rows[..., None].expand(-1, -1, table.shape[-1]))
    return picked[:, :, None].expand(-1, -1, points, -1).reshape(B, K * points, -1)


def mask_rows(mask: torch.Tensor | None, rows: torch.Tensor, points: int) -> torch.Tensor | None:
    """A ``(B, 1, S, S)`` attention mask cut to the query rows ``rows`` ``(B, K)``, each repeated for its
    ``points`` points: ``(B, 1, K * points, S)``; a mask the same for every query (``(B, 1, 1, S)``) as it is."""
    if mask is None or mask.shape[-2] == 1:
        return mask
    return rows_per_point(mask[:, 0], rows, points)[:, None]


def fits_mask(mask, tokens: int) -> bool:
    """A mask :func:`mask_rows` takes: none, or ``(B, 1, S or 1, S)`` over the ``tokens`` of the sequence."""
    return mask is None or (mask.ndim == 4 and mask.shape[1] == 1 and mask.shape[-1] == tokens
                            and mask.shape[-2] in (1, tokens))  # fmt: skip


def attend(attn, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask=None) -> torch.Tensor:
    """``(B, S, H, D)`` queries, keys and values through diffusers' dispatch with the processor's backend, as the
    processors call it; ``(B, M, H * D)`` in the queries' dtype."""
    backend = getattr(attn.processor, "_attention_backend", None)
    out = dispatch_attention_fn(q, k, v, attn_mask=mask, dropout_p=0.0, is_causal=False, backend=backend)
    return out.flatten(2, 3).to(q.dtype)


def rotated_query_attention(attn, q, k, v, rows, emb, mask) -> torch.Tensor:
    """Queries ``q`` ``(B, K, P, H, D)`` (after their norm) against keys ``k`` and values ``v`` ``(B, S, H, D)``
    over the call's sequence: each query of pair ``j`` rotated with row ``rows[b, j]`` of the real ``(cos, sin)``
    table ``emb`` over that sequence (the keys with their own rows), under the mask's row ``rows[b, j]``."""
    B, K, P = q.shape[:3]
    q = q.reshape(B, K * P, *q.shape[3:])
    if emb is not None:
        table = tuple(rows_per_point(t, rows, P).reshape(B * K * P, -1) for t in emb)
        q = apply_rotary_emb(q.reshape(1, B * K * P, *q.shape[2:]), table, sequence_dim=1).view(q.shape)
        k = apply_rotary_emb(k, emb, sequence_dim=1)
    return attend(attn, q, k, v, mask_rows(mask, rows, P))


def heads(attn, x: torch.Tensor) -> torch.Tensor:
    """``(..., H * D)`` -> ``(..., H, D)`` with the attention's ``head_dim``, as the Flux processors split heads."""
    return x.unflatten(-1, (-1, attn.head_dim))


def fits_rotary(emb, tokens: int) -> bool:
    """A rotary table the probes take: none, or a real ``(cos, sin)`` pair of ``(tokens, D)`` tables."""
    return emb is None or (isinstance(emb, tuple) and emb[0].ndim == 2 and emb[0].shape[0] == tokens)


def out_projected(attn, out: torch.Tensor) -> torch.Tensor:
    """``to_out`` (its projection, then its dropout if it has one) of an attention's output."""
    out = attn.to_out[0](out)
    return attn.to_out[1](out) if len(attn.to_out) > 1 else out


def feed_forward_measured(module, args, kwargs, dst, rest, *, image_first=False, before=None):
    """A per-token feed-forward: ``module`` (after ``before``, e.g. Chroma's ``act_mlp`` after ``proj_mlp``) on
    the interpolated points; ``z`` the image part of its input."""
    x = args[0] if args else next(iter(kwargs.values()), None)
    if not isinstance(x, torch.Tensor) or x.ndim != 3:
        return None
    f = module.forward if before is None else (lambda points: before(module.forward(points)))
    return f, image_part(x, rest, image_first)


# --- Chroma and FLUX.2 ------------------------------------------------------------------------------------------


def double_stream_measured(attn, args, kwargs, dst, rest):
    """A double-stream ``attn`` (``FluxAttnProcessor``, ``Flux2AttnProcessor``): image ``hidden_states``, text
    ``encoder_hidden_states``, rotary table and mask over ``[text, image]``."""
    z, text = argument(args, kwargs, 0, "hidden_states"), argument(args, kwargs, 1, "encoder_hidden_states")
    mask, emb = argument(args, kwargs, 2, "attention_mask"), argument(args, kwargs, 3, "image_rotary_emb")
    if not isinstance(z, torch.Tensor) or text is None:
        return None
    tokens, T = text.shape[1] + z.shape[1], text.shape[1]
    if not (fits_rotary(emb, tokens) and fits_mask(mask, tokens)):
        return None
    k = torch.cat([attn.norm_added_k(heads(attn, attn.add_k_proj(text))), attn.norm_k(heads(attn, attn.to_k(z)))], 1)
    v = torch.cat([heads(attn, attn.add_v_proj(text)), heads(attn, attn.to_v(z))], dim=1)

    def f(points: torch.Tensor) -> torch.Tensor:
        q = attn.norm_q(heads(attn, attn.to_q(points)))
        out = rotated_query_attention(attn, q, k, v, T + dst, emb, mask)
        return out_projected(attn, out).reshape(*points.shape[:3], -1)

    return f, z


def single_stream_measured(attn, args, kwargs, dst, rest, *, project):
    """A single-stream ``attn`` on ``[text, image]`` (``rest`` text tokens in front): ``project(attn, x, start,
    stop)`` gives columns ``start:stop`` of the queries, keys and values (``to_q`` / ``to_k`` / ``to_v``, or
    FLUX.2's fused projection); no output projection."""
    x, mask = argument(args, kwargs, 0, "hidden_states"), argument(args, kwargs, 1, "attention_mask")
    emb = argument(args, kwargs, 2, "image_rotary_emb")
    if not isinstance(x, torch.Tensor) or not (fits_rotary(emb, x.shape[1]) and fits_mask(mask, x.shape[1])):
        return None
    inner = attn.inner_dim
    k = attn.norm_k(heads(attn, project(attn, x, inner, 2 * inner)))
    v = heads(attn, project(attn, x, 2 * inner, 3 * inner))

    def f(points: torch.Tensor) -> torch.Tensor:
        q = attn.norm_q(heads(attn, project(attn, points, 0, inner)))
        return rotated_query_attention(attn, q, k, v, rest + dst, emb, mask).reshape(*points.shape[:3], -1)

    return f, image_part(x, rest)


def separate_projections(attn, x, start: int, stop: int) -> torch.Tensor:
    """Chroma's single-stream queries (0), keys (``inner_dim``) or values (``2 inner_dim``) of ``x``."""
    return (attn.to_q, attn.to_k, attn.to_v)[start // attn.inner_dim](x)


def fused_projection(attn, x, start: int, stop: int) -> torch.Tensor:
    """Columns ``start:stop`` of FLUX.2's fused ``to_qkv_mlp_proj`` of ``x`` (the processor splits its output
    there: queries, keys, values, then the MLP's input)."""
    proj = attn.to_qkv_mlp_proj
    bias = None if proj.bias is None else proj.bias[start:stop]
    return F.linear(x, proj.weight[start:stop], bias)


def flux2_mlp_measured(attn, args, kwargs, dst, rest):
    """FLUX.2's single-stream MLP: ``mlp_act_fn`` of the MLP columns of ``to_qkv_mlp_proj``."""
    x = argument(args, kwargs, 0, "hidden_states")
    if not isinstance(x, torch.Tensor):
        return None
    start = 3 * attn.inner_dim
    stop = attn.to_qkv_mlp_proj.out_features
    return (lambda points: attn.mlp_act_fn(fused_projection(attn, points, start, stop))), image_part(x, rest)


def chroma_hooks(site: Site) -> list:
    """A double-stream block's ``attn`` and ``ff``; a single-stream block's ``attn`` and ``act_mlp(proj_mlp(.))``."""
    if not site.single_stream:
        return [("attn", SELF_ATTENTION, double_stream_measured), ("ff", FEED_FORWARD, feed_forward_measured)]
    return [
        ("attn", SELF_ATTENTION, partial(single_stream_measured, project=separate_projections)),
        ("proj_mlp", FEED_FORWARD, partial(feed_forward_measured, before=site.block.act_mlp)),
    ]


def flux2_hooks(site: Site) -> list:
    """A double-stream block's ``attn`` and ``ff``; a single-stream block's fused ``attn``, both its halves."""
    if not site.single_stream:
        return [("attn", SELF_ATTENTION, double_stream_measured), ("ff", FEED_FORWARD, feed_forward_measured)]
    return [
        ("attn", SELF_ATTENTION, partial(single_stream_measured, project=fused_projection)),
        ("attn", FEED_FORWARD, flux2_mlp_measured),
    ]


# --- Z-Image and Sana -------------------------------------------------------------------------------------------


def zimage_measured(attn, args, kwargs, dst, rest):
    """A Z-Image layer's ``attention`` on ``[image, rest]``: per-element ``freqs_cis`` ``(B, S, D / 2)``, a key
    mask ``(B, S)`` or none."""
    x, mask, freqs = argument(args, kwargs, 0, "hidden_states"), kwargs.get("attention_mask"), kwargs.get("freqs_cis")
    if not isinstance(x, torch.Tensor) or argument(args, kwargs, 1, "encoder_hidden_states") is not None:
        return None
    shape = tuple(x.shape[:2])
    if (freqs is not None and tuple(freqs.shape[:2]) != shape) or (mask is not None and tuple(mask.shape) != shape):
        return None
    split = lambda t: t.unflatten(-1, (attn.heads, -1))
    norm_q = (lambda t: t) if attn.norm_q is None else attn.norm_q
    k, v = split(attn.to_k(x)), split(attn.to_v(x))
    k = k if attn.norm_k is None else attn.norm_k(k)
    k = k if freqs is None else rotate_complex_rows(k, freqs)
    key_mask = None if mask is None else mask[:, None, None, :]

    def f(points: torch.Tensor) -> torch.Tensor:
        B, K, P, C = points.shape
        q = norm_q(split(attn.to_q(points.reshape(B, K * P, C))))
        q = q if freqs is None else rotate_complex_rows(q, rows_per_point(freqs, dst, P))
        return out_projected(attn, attend(attn, q, k, v, key_mask)).reshape(B, K, P, -1)

    return f, image_part(x, rest, image_first=True)


#: Sana's ``attn1`` processors whose output for one query depends on no other query (not the PAG ones, which
#: treat batch chunks apart).
SANA_QUERY_PROCESSORS = (SanaLinearAttnProcessor2_0, SanaAttnProcessor2_0, AttnProcessor2_0)


def sana_measured(attn, args, kwargs, dst, rest):
    """Sana's ``attn1``: a self-attention of the image tokens, no mask."""
    z = argument(args, kwargs, 0, "hidden_states")
    if not isinstance(z, torch.Tensor) or type(attn.processor) not in SANA_QUERY_PROCESSORS:
        return None
    extra = ((1, "encoder_hidden_states"), (2, "attention_mask"))
    if any(argument(args, kwargs, i, name) is not None for i, name in extra):
        return None

    def f(points: torch.Tensor) -> torch.Tensor:
        B, K, P, C = points.shape
        return attn.forward(points.reshape(B, K * P, C), encoder_hidden_states=z).reshape(B, K, P, -1)

    return f, z


# --- the table --------------------------------------------------------------------------------------------------

_QUERY = "with the interpolated image token as query, rotated at the pair's destination's position; keys and values: "
_TWO_STREAMS = (
    "attn of double-stream blocks (as {processor}) " + _QUERY + "the call's real text and image tokens, fixed{mask}; "
    "single-stream blocks: attn on their [text, image] input alike, before the output projection"
)
#: The families (as :class:`tofu_sd.Family` names them) whose blocks these probes know.
SITE_PROBES = {
    "Chroma": SiteProbe(
        chroma_hooks, _TWO_STREAMS.format(processor="FluxAttnProcessor", mask=", the call's attention mask kept"),
        "ff on the interpolated ff input (image tokens); single-stream blocks: act_mlp(proj_mlp(.)) on the image part",
    ),
    "FLUX.2": SiteProbe(
        flux2_hooks, _TWO_STREAMS.format(processor="Flux2AttnProcessor", mask=""),
        "ff on the interpolated ff input (image tokens); single-stream blocks: mlp_act_fn of the MLP columns of "
        "to_qkv_mlp_proj, on the image part",
    ),
    "Z-Image": SiteProbe(
        lambda site: [("attention", SELF_ATTENTION, zimage_measured),
                      ("feed_forward", FEED_FORWARD, partial(feed_forward_measured, image_first=True))],
        "attention (ZSingleStreamAttnProcessor) " + _QUERY + "the layer's real [image, padding, caption] tokens, "
        "fixed, the key mask kept",
        "feed_forward on the interpolated feed_forward input (the image part)",
    ),
    "Sana": SiteProbe(
        lambda site: [("attn1", SELF_ATTENTION, sana_measured)],
        "attn1 (linear attention, SanaLinearAttnProcessor2_0) with the interpolated image token as query; keys and "
        "values: the call's real image tokens, fixed",
        "not measured: the feed-forward (GLUMBConv) mixes each token's 3 x 3 grid neighbourhood and tofu_sd never "
        "runs it on reduced tokens (only attn1), so its FL does not bear on the schedule; decide on self_attention",
    ),
}  # fmt: skip
