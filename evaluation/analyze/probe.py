"""A block's probe: the token pairs the reduction would make from the block's input, FL (Eq. 8) at each function
the pairs enter, per timestep group, and the statistics of what it recorded."""

from __future__ import annotations

import numpy as np
import torch

from tofu_sd.hooks import MatchingHook
from tofu_sd.merge import Matching

from ..linearity import FUNCTIONS, TIMESTEP_GROUPS, functional_linearity, query_attention, summarize


def matched_pairs(m: Matching) -> tuple[torch.Tensor, torch.Tensor]:
    """Source and destination positions ``(B, r)`` of the pairs of a matching, most similar pair first.

    Each reduced source and the destination it is merged into (whose output it takes back at restore).
    """
    return m.src_idx, m.keep_idx.gather(1, m.dst_slot)


def spread(count: int, keep: int, device: torch.device) -> torch.Tensor:
    """``keep`` indices evenly spaced over ``0 .. count - 1`` (all of them when ``keep >= count``)."""
    if keep >= count:
        return torch.arange(count, device=device)
    return torch.linspace(0, count - 1, keep, device=device).round().long()


def take(x: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
    """Tokens ``x[b, pos[b, j]]``: ``(B, N, C)`` and ``(B, K)`` -> ``(B, K, C)``."""
    return x.gather(1, pos.unsqueeze(-1).expand(-1, -1, x.shape[-1]))


class BlockProbe:
    """Forward pre-hooks on one block: pairs from its input, FL at ``attn1`` and ``ff`` from theirs.

    The pairs come from tofu_sd's own ``MatchingHook`` (same partition, seed stream and matching as ``apply``),
    driven by these plain torch pre-hooks so that the block itself runs unreduced. ``run`` is the recorder that
    holds the probes: its ``config`` (:class:`~.config.AnalyzeConfig`) and the timestep ``group`` of the call
    in progress.
    """

    def __init__(self, site, matcher: MatchingHook, run) -> None:
        self.site, self.matcher, self.run = site, matcher, run
        self.pairs: tuple[torch.Tensor, torch.Tensor] | None = None
        self.values = {f: {g: [] for g in TIMESTEP_GROUPS} for f in FUNCTIONS}
        self.tokens: int | None = None

    def keep_pairs(self, m: Matching, x: torch.Tensor) -> None:
        """Keep up to ``max_pairs`` of matching ``m``'s pairs, evenly spaced in similarity rank, on input ``x``."""
        src, dst = matched_pairs(m)
        keep = spread(src.shape[1], self.run.config.max_pairs, x.device)
        self.pairs, self.tokens = (src[:, keep], dst[:, keep]), x.shape[1]

    def on_block(self, module, args, kwargs):
        x = args[0] if args else kwargs.get("hidden_states")
        self.pairs = None
        if x is None:
            return None
        self.matcher.pre_forward(module, x)
        m, self.matcher.state.matching = self.matcher.state.matching, None
        if m is not None:
            self.keep_pairs(m, x)
        return None

    def _record(self, function: str, f, z: torch.Tensor) -> None:
        src, dst = self.pairs
        fl = functional_linearity(f, take(z, src), take(z, dst), self.run.config.num_points)
        self.values[function][self.run.group].append(fl.reshape(-1).float().cpu())

    def on_attn1(self, module, args, kwargs):
        z = args[0] if args else kwargs.get("hidden_states")
        if self.pairs is None or z is None or z.ndim != 3 or z.shape[1] != self.tokens:
            return None
        if kwargs.get("attention_mask") is not None or (len(args) > 2 and args[2] is not None):
            return None  # masked self-attention is not reduced by tofu_sd either
        context = kwargs.get("encoder_hidden_states", args[1] if len(args) > 1 else None)
        context = z if context is None else context  # only_cross_attention blocks attend to the text instead

        def f(points: torch.Tensor) -> torch.Tensor:  # (B, K, P, C) -> (B, K, P, C)
            B, K, P, C = points.shape
            return query_attention(module, points.reshape(B, K * P, C), context).reshape(B, K, P, -1)

        self._record("self_attention", f, z)
        return None

    def on_ff(self, module, args, kwargs):
        z = args[0] if args else kwargs.get("hidden_states")
        if self.pairs is None or z is None or z.ndim != 3 or z.shape[1] != self.tokens:
            return None
        self._record("feed_forward", module.forward, z)
        return None


def _cat(chunks: list[torch.Tensor]) -> np.ndarray:
    return torch.cat(chunks).numpy() if chunks else np.zeros(0, dtype=np.float32)


def fl_statistics(probe: BlockProbe) -> dict:
    """A probe's FL statistics per measured function, overall and per timestep group."""
    fl = {}
    for function in FUNCTIONS:
        groups = {g: _cat(probe.values[function][g]) for g in TIMESTEP_GROUPS}
        fl[function] = summarize(np.concatenate(list(groups.values())))
        fl[function]["by_timestep"] = {g: summarize(v) for g, v in groups.items()}
    return fl


def block_result(probe: BlockProbe, letter: str, **where) -> dict:
    """A measured block's entry in ``fl.json``: ``where`` it is (its name first), its token count, its default
    letter and its FL statistics."""
    return {**where, "tokens": probe.tokens, "default_letter": letter, "fl": fl_statistics(probe)}
