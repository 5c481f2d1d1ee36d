"""The oracle on the diffusion transformers whose reduced attention takes its image rotary table apart from any
text (Qwen-Image, Wan): the attention sees every ``stride``-th image (or video) token with that token's own
rotary row, and each kept token's output is copied to the ``stride - 1`` tokens after it
(:func:`~.strided.oracle_spread`). The attentions are those Token Fusion reduces around (the family's
:class:`tofu_sd.Site` ``attentions``), in the blocks ``tofu_sd.apply`` patches (:func:`.oracle_dit.oracle_sites`).

- Qwen-Image: each double-stream block's ``attn`` takes the image ``hidden_states``, the text
  ``encoder_hidden_states`` (untouched) and ``image_rotary_emb`` = ``(image (N, D/2), text (T, D/2))`` complex
  rows: the image table's rows are subset as the tokens, the text table is passed as it is. Its text padding mask
  ``encoder_hidden_states_mask`` is ``(B, T)``, over the text alone: it is kept, and the processor lays out the
  image part of its joint mask from the tokens it is given. An ``attention_mask`` (which
  ``QwenDoubleStreamAttnProcessor2_0`` refuses) leaves the call alone.
- Wan: each block's self-attention ``attn1`` takes the video tokens and ``rotary_emb`` = ``(cos, sin)``, each
  ``(1, N, 1, D)`` over the sequence: both are subset along it. The cross-attention ``attn2`` is left alone, as
  Token Fusion leaves it.

A table that has no row per image token (laid out otherwise) leaves the call alone too: nothing is guessed.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from diffusers.hooks import ModelHook

from tofu_sd.arguments import argument, with_arguments

from .strided import oracle_keep, oracle_spread


def spread_image(output, stride: int, n: int):
    """An attention's output with its image part (the first output of a tuple, or the only one) spread back to
    ``n`` tokens; any other output (a joint attention's text) as it is."""
    if isinstance(output, tuple):
        return (oracle_spread(output[0], stride, n), *output[1:])
    return oracle_spread(output, stride, n)


def keep_qwen_table(emb, n: int, stride: int):
    """Qwen-Image's ``(image (N, D/2), text (T, D/2))`` for the kept tokens: every ``stride``-th image row, the
    text table whole; ``None`` if the image table has no row per token of the ``n``."""
    image, text = emb
    if image.ndim != 2 or image.shape[0] != n:
        return None
    return image[::stride], text


def keep_wan_table(emb, n: int, stride: int):
    """Wan's ``(cos, sin)``, each ``(1, N, 1, D)``, for the kept tokens: every ``stride``-th row of each; ``None``
    for tables laid out otherwise."""
    if len(emb) != 2 or any(t.ndim != 4 or t.shape[:3] != (1, n, 1) for t in emb):
        return None
    return tuple(t[:, ::stride] for t in emb)


@dataclass(frozen=True)
class ImageTable:
    """How a family's reduced attention takes its rotary table over the image tokens alone."""

    argument: str  #: the table's keyword; passed by position, it is the attention's fourth argument
    #: ``(table, n, stride)`` -> the kept tokens' table, or ``None`` when the table has no row per image token
    keep: Callable


#: The families whose attention takes an image table of its own, by family name (:attr:`tofu_sd.Family.name`).
IMAGE_TABLES = {
    "Qwen-Image": ImageTable("image_rotary_emb", keep_qwen_table),
    "Wan": ImageTable("rotary_emb", keep_wan_table),
}


class TableOracleHook(ModelHook):
    """On an attention whose ``hidden_states`` are the image tokens and whose rotary table (``table``) has one
    row per image token: it sees every ``stride``-th token with its own row; the image output is spread back."""

    def __init__(self, stride: int, table: ImageTable) -> None:
        super().__init__()
        self.stride, self.table, self.n = stride, table, None

    def pre_forward(self, module, *args, **kwargs):
        x = argument(args, kwargs, 0, "hidden_states")
        self.n = None
        if not isinstance(x, torch.Tensor) or argument(args, kwargs, 2, "attention_mask") is not None:
            return args, kwargs
        values = {0: ("hidden_states", oracle_keep(x, self.stride))}
        emb = argument(args, kwargs, 3, self.table.argument)
        if emb is not None:
            kept = self.table.keep(emb, x.shape[1], self.stride)
            if kept is None:
                return args, kwargs
            values[3] = (self.table.argument, kept)
        self.n = x.shape[1]
        return with_arguments(args, kwargs, values)

    def post_forward(self, module, output):
        return output if self.n is None else spread_image(output, self.stride, self.n)
