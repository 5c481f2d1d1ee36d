"""The oracle's fixed strided subset of tokens (:mod:`.oracle`, :mod:`.oracle_dit`): the stride of a ratio, the
kept tokens, each kept token's output copied back over the tokens after it, and the name its hooks go by."""

from __future__ import annotations

import torch

ORACLE_HOOK = "evaluation.oracle"


def oracle_stride(ratio: float) -> int:
    """Every ``stride``-th token is kept: the stride whose kept fraction ``1 / stride`` is nearest ``1 - ratio``."""
    return max(1, round(1 / (1 - ratio)))


def oracle_keep(x: torch.Tensor, stride: int) -> torch.Tensor:
    """The kept tokens of ``(B, N, C)`` ``x``: every ``stride``-th one (a view)."""
    return x[:, ::stride]


def oracle_spread(kept: torch.Tensor, stride: int, n: int) -> torch.Tensor:
    """Each kept token's row copied to the ``stride - 1`` tokens after it, ``n`` tokens in all."""
    b, m, c = kept.shape
    return kept.unsqueeze(2).expand(b, m, stride, c).reshape(b, m * stride, c)[:, :n]
