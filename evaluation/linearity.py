"""Functional linearity (Token Fusion paper, Sec. 3.1, Eq. 8) as small pure functions, tested on closed forms:
the interpolation path, FL of a function along it, the attention of a query against fixed keys and values, the
schedule it proposes, timestep groups and summary statistics. :mod:`evaluation.analyze` measures them on a
pipeline.

:func:`query_attention` is a U-Net's (or PixArt's) self-attention with fixed keys and values; :func:`joint_query_attention`
is the same for the attentions of diffusion transformers that take their text tokens as a second stream (SD3's
joint attention, SD3.5's second one, Flux's), with rotary positions where Flux has them."""

from __future__ import annotations

import math
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F

FUNCTIONS = ("self_attention", "feed_forward")
TIMESTEP_GROUPS = ("early", "middle", "late")
#: Break-even FL of merging versus pruning (see :class:`AnalyzeConfig`, ``threshold``): cos 45 degrees.
DEFAULT_THRESHOLD = 1 / math.sqrt(2)
QUANTILES = (0.05, 0.25, 0.5, 0.75, 0.95)


# ---------------------------------------------------------------------------------------------------------------
# Eq. 8, as pure functions
# ---------------------------------------------------------------------------------------------------------------


def interpolation_points(x1: torch.Tensor, x2: torch.Tensor, num_points: int) -> torch.Tensor:
    """``X(t_i) = (1 - t_i) X1 + t_i X2`` at ``t_i = i / (num_points - 1)``, ``i = 0 .. num_points - 1``.

    ``x1`` and ``x2`` are ``(..., C)``; the result is ``(..., num_points, C)``, its first and last points exactly
    ``x1`` and ``x2`` (``torch.lerp`` is exact at both ends).
    """
    if num_points < 2:
        raise ValueError(f"Eq. 8 needs at least 2 interpolation points (the two ends), got {num_points}.")
    if x1.shape != x2.shape:
        raise ValueError(f"x1 and x2 must have the same shape, got {tuple(x1.shape)} and {tuple(x2.shape)}.")
    t = torch.linspace(0, 1, num_points, dtype=x1.dtype, device=x1.device).unsqueeze(-1)
    return torch.lerp(x1.unsqueeze(-2), x2.unsqueeze(-2), t)


def path_linearity(outputs: torch.Tensor) -> torch.Tensor:
    """FL of Eq. 8 from ``f`` evaluated along the path: ``outputs`` ``(..., P, C')`` -> ``(...)``.

    ``||f(X(1)) - f(X(0))|| / sum_i ||f(X(t_{i+1})) - f(X(t_i))||``: the chord over the length of the
    polygonal output path. By the triangle inequality it lies in ``[0, 1]``, 1 for an affine ``f``. A path of
    length 0 (``f`` constant along the segment, an affine case) counts as 1. Computed in at least float32.
    """
    work = outputs.to(torch.promote_types(outputs.dtype, torch.float32))
    length = torch.linalg.vector_norm(work.diff(dim=-2), dim=-1).sum(dim=-1)
    chord = torch.linalg.vector_norm(work[..., -1, :] - work[..., 0, :], dim=-1)
    fl = torch.where(length > 0, chord / length.clamp_min(torch.finfo(work.dtype).tiny), torch.ones_like(chord))
    return fl.clamp(0, 1)  # rounding can put a straight path a hair above 1


def functional_linearity(
    f: Callable[[torch.Tensor], torch.Tensor], x1: torch.Tensor, x2: torch.Tensor, num_points: int
) -> torch.Tensor:
    """FL(f, X1, X2) of Eq. 8 for every pair of rows of ``x1``, ``x2`` ``(..., C)``; returns ``(...)``.

    ``f`` maps ``(..., P, C)`` to ``(..., P, C')`` row by row; it is called once on all the points.
    """
    return path_linearity(f(interpolation_points(x1, x2, num_points)))


def query_attention(attn: torch.nn.Module, queries: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
    """A diffusers ``Attention`` with ``queries`` ``(B, M, C)`` as queries and ``context`` ``(B, N, C)`` as keys and
    values: each query's output is what that token would get if it replaced one token of the sequence with
    every other token fixed (exactly so for ``context`` = the real sequence, up to the token's own key/value).
    """
    return attn.forward(queries, encoder_hidden_states=context)


def joint_query_attention(
    attn: torch.nn.Module,
    queries: torch.Tensor,
    context: torch.Tensor,
    added: torch.Tensor | None = None,
    *,
    query_rotary: tuple[torch.Tensor, torch.Tensor] | None = None,
    context_rotary: tuple[torch.Tensor, torch.Tensor] | None = None,
    added_rotary: tuple[torch.Tensor, torch.Tensor] | None = None,
    project_out: bool = True,
) -> torch.Tensor:
    """The image output of a diffusion transformer's attention for ``queries`` ``(B, M, C)``, against fixed keys and
    values: those of ``context`` ``(B, N, C)`` (through ``to_k`` / ``to_v`` / ``norm_k``, as the attention's
    ``hidden_states``) and, given ``added`` ``(B, T, C)`` (the text stream, its ``encoder_hidden_states``), those
    of ``added`` too (through ``add_k_proj`` / ``add_v_proj`` / ``norm_added_k``). The queries go through ``to_q``
    and ``norm_q``; ``to_out`` follows with ``project_out`` (not in Flux's single-stream blocks, whose attention
    has none). This is what ``JointAttnProcessor2_0`` (SD3's ``attn`` with the text, SD3.5's ``attn2`` without)
    and ``FluxAttnProcessor`` compute for one image query, its key and value left as they are in the context.

    Rotary embeddings (Flux), each a ``(cos, sin)`` pair as diffusers' ``apply_rotary_emb`` takes them:
    ``context_rotary`` ``(N, D)`` and ``added_rotary`` ``(T, D)`` rotate the keys, ``query_rotary`` ``(B, M, D)``
    the queries, one position per query (the batch is folded into the sequence, as :class:`tofu_sd.reducing.RotaryHook`
    does). Passing a query at its own position with the real streams gives that token's real attention output.

    Calling ``attn`` itself with the queries as ``hidden_states`` would not do: their keys and values would join
    the attention, and an ``encoder_hidden_states`` would be taken for the text stream (its queries computed too).
    """
    from diffusers.models.embeddings import apply_rotary_emb

    heads = attn.heads

    def split(x: torch.Tensor) -> torch.Tensor:  # (B, S, H * D) -> (B, S, H, D)
        return x.unflatten(-1, (heads, -1))

    q, k, v = split(attn.to_q(queries)), split(attn.to_k(context)), split(attn.to_v(context))
    if getattr(attn, "norm_q", None) is not None:
        q = attn.norm_q(q)
    if getattr(attn, "norm_k", None) is not None:
        k = attn.norm_k(k)
    if query_rotary is not None:
        B, M = q.shape[:2]
        table = tuple(t.reshape(B * M, -1) for t in query_rotary)
        q = apply_rotary_emb(q.reshape(1, B * M, *q.shape[2:]), table, sequence_dim=1).view(q.shape)
    if context_rotary is not None:
        k = apply_rotary_emb(k, context_rotary, sequence_dim=1)
    if added is not None:
        added_k, added_v = split(attn.add_k_proj(added)), split(attn.add_v_proj(added))
        if getattr(attn, "norm_added_k", None) is not None:
            added_k = attn.norm_added_k(added_k)
        if added_rotary is not None:
            added_k = apply_rotary_emb(added_k, added_rotary, sequence_dim=1)
        k, v = torch.cat([k, added_k], dim=1), torch.cat([v, added_v], dim=1)
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
    out = out.transpose(1, 2).flatten(2).to(q.dtype)
    if project_out:
        out = attn.to_out[1](attn.to_out[0](out))
    return out


def propose_schedule(mean_fl: list[float | None], threshold: float, fallback: str) -> str:
    """``P`` where the mean FL is below ``threshold``, ``M`` where it is not; ``fallback[i]`` where unmeasured."""
    if len(fallback) != len(mean_fl):
        raise ValueError(f"fallback has {len(fallback)} letters for {len(mean_fl)} blocks.")
    return "".join(
        fallback[i] if value is None or math.isnan(value) else ("P" if value < threshold else "M")
        for i, value in enumerate(mean_fl)
    )


def timestep_group(timestep: float, num_train_timesteps: int) -> str:
    """``early`` (t >= 2T/3, the noisiest third, first in generation), ``middle``, or ``late`` (t < T/3)."""
    if timestep >= 2 * num_train_timesteps / 3:
        return "early"
    return "middle" if timestep >= num_train_timesteps / 3 else "late"


def summarize(values: np.ndarray) -> dict:
    """``mean``, ``std``, ``count`` and the :data:`QUANTILES` (``q05`` ... ``q95``) of FL values; None if empty."""
    if values.size == 0:
        return {"mean": None, "std": None, "count": 0, **{_qname(q): None for q in QUANTILES}}
    qs = np.quantile(values, QUANTILES)
    return {
        "mean": float(values.mean()),
        "std": float(values.std()),
        "count": int(values.size),
        **{_qname(q): float(v) for q, v in zip(QUANTILES, qs)},
    }


def _qname(q: float) -> str:
    return "median" if q == 0.5 else f"q{round(q * 100):02d}"
