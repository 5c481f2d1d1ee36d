"""The oracle on diffusion transformers (SD3 / SD3.5, PixArt, Sana, Flux; Qwen-Image and Wan through
:mod:`.oracle_dit_families`): in exactly the blocks that ``tofu_sd.apply``
patches, the attention sees every ``stride``-th image token (:func:`~.strided.oracle_keep`) next to all the text
tokens, and each kept image token's output is copied to the ``stride - 1`` image tokens after it
(:func:`~.strided.oracle_spread`); text outputs pass as they are. No similarity, no matching.

The attentions are those Token Fusion reduces around (:class:`tofu_sd.Site`, from its family adapter): an attention whose
``hidden_states`` are the image stream (SD3's joint ``attn`` and SD3.5's ``attn2``, PixArt's ``attn1``, Flux's
double-stream ``attn``), and a Flux single-stream block's ``attn``, which sees ``[text, image]``: there the
block's hook records the text length, and only the image part is subset. Flux's rotary table ``(T + N, D)``
(text positions, then image positions) is subset alike, text rows then every ``stride``-th image row: the
subset is the same for every batch element, so the processor rotates the kept tokens at their own positions
with the one table it takes. A call with an attention mask is left alone (a mask is laid out for every token).
Sana's ``attn1`` (linear attention, no rotary table) is subset as PixArt's.
"""

from __future__ import annotations

import torch
from diffusers.hooks import ModelHook

from tofu_sd import Site, TokenFusionConfig
from tofu_sd.arguments import argument, with_arguments
from tofu_sd.hooking import register_innermost

from ..families import transformer_and_family

from .oracle_dit_families import IMAGE_TABLES, TableOracleHook, spread_image
from .strided import ORACLE_HOOK, oracle_keep, oracle_spread, oracle_stride


#: The families whose attention calls the oracle's hooks know (Qwen-Image and Wan: :data:`IMAGE_TABLES`).
ORACLE_FAMILIES = ("SD3", "PixArt", "Sana", "Flux", *IMAGE_TABLES)


def oracle_sites(model: torch.nn.Module, options: TokenFusionConfig) -> list[Site]:
    """The blocks that ``tofu_sd.apply`` patches on ``model`` with ``options.blocks`` (every block by default);
    ValueError, as ``apply``'s, for ``max_downsample`` (a U-Net's option) or blocks out of range."""
    arch = transformer_and_family(model)[1]
    if arch.name not in ORACLE_FAMILIES:
        raise ValueError(
            f"the oracle on diffusion transformers subsets the attention inputs and rotary tables as "
            f"{', '.join(ORACLE_FAMILIES)} models lay them out; a {arch.name} transformer lays them out otherwise "
            "(FLUX.2 and Chroma join text and image into one sequence before their single-stream blocks; Z-Image "
            "gives a rotary row per batch element and token of [image, padding, text]), and its oracle is not "
            "written yet: leave `oracle` out of --variants"
        )
    if options.max_downsample != 1:
        raise ValueError(
            f"max_downsample={options.max_downsample} only means something for U-Nets; a {arch.name} transformer "
            "has one token grid: choose its blocks with `blocks` instead."
        )
    return arch.select(arch.sites(model), options)


def keep_rotary(emb: tuple[torch.Tensor, ...], text_len: int, stride: int) -> tuple[torch.Tensor, ...]:
    """A ``[text, image]`` rotary table (each of its tensors ``(T + N, D)``) for the kept tokens: the text rows,
    then every ``stride``-th image row."""
    return tuple(torch.cat([table[:text_len], table[text_len:][::stride]]) for table in emb)


class TextLength:
    """The text length of the single-stream block call in progress (its ``encoder_hidden_states``' tokens)."""

    def __init__(self) -> None:
        self.value: int | None = None


class TextLengthHook(ModelHook):
    """On a Flux single-stream block: records the text tokens that it puts in front of the image tokens."""

    def __init__(self, text: TextLength) -> None:
        super().__init__()
        self.text = text

    def pre_forward(self, module, *args, **kwargs):
        text = argument(args, kwargs, 1, "encoder_hidden_states")
        self.text.value = None if text is None else text.shape[1]
        return args, kwargs

    def post_forward(self, module, output):
        self.text.value = None
        return output


class ImageOracleHook(ModelHook):
    """On an attention whose ``hidden_states`` are the image tokens: it sees every ``stride``-th of them (with the
    text, as ``encoder_hidden_states``, untouched); the image output (the first, or only, output) is spread back."""

    def __init__(self, stride: int) -> None:
        super().__init__()
        self.stride, self.n = stride, None

    def pre_forward(self, module, *args, **kwargs):
        x = argument(args, kwargs, 0, "hidden_states")
        self.n = None
        if x is None or argument(args, kwargs, 2, "attention_mask") is not None:
            return args, kwargs
        self.n = x.shape[1]
        values = {0: ("hidden_states", oracle_keep(x, self.stride))}
        emb = argument(args, kwargs, 3, "image_rotary_emb")
        if emb is not None:
            text = argument(args, kwargs, 1, "encoder_hidden_states")
            values[3] = ("image_rotary_emb", keep_rotary(emb, 0 if text is None else text.shape[1], self.stride))
        return with_arguments(args, kwargs, values)

    def post_forward(self, module, output):
        return output if self.n is None else spread_image(output, self.stride, self.n)


class SingleStreamOracleHook(ModelHook):
    """On a Flux single-stream block's ``attn``, whose ``hidden_states`` are ``[text, image]``: it sees the text
    and every ``stride``-th image token; the image part of its output is spread back, the text part kept."""

    def __init__(self, stride: int, text: TextLength) -> None:
        super().__init__()
        self.stride, self.text, self.n = stride, text, None

    def pre_forward(self, module, *args, **kwargs):
        x, t = argument(args, kwargs, 0, "hidden_states"), self.text.value
        self.n = None
        if x is None or t is None or argument(args, kwargs, 2, "attention_mask") is not None:
            return args, kwargs
        self.n = x.shape[1] - t
        values = {0: ("hidden_states", torch.cat([x[:, :t], oracle_keep(x[:, t:], self.stride)], dim=1))}
        emb = argument(args, kwargs, 3, "image_rotary_emb")
        if emb is not None:
            values[3] = ("image_rotary_emb", keep_rotary(emb, t, self.stride))
        return with_arguments(args, kwargs, values)

    def post_forward(self, module, output):
        if self.n is None:
            return output
        t = self.text.value
        return torch.cat([output[:, :t], oracle_spread(output[:, t:], self.stride, self.n)], dim=1)


def register_oracle(model: torch.nn.Module, options: TokenFusionConfig, ratio: float) -> None:
    """Register the oracle's hooks (named :data:`~.strided.ORACLE_HOOK`) on the attentions of :func:`oracle_sites`."""
    stride, table = oracle_stride(ratio), IMAGE_TABLES.get(transformer_and_family(model)[1].name)
    for site in oracle_sites(model, options):
        if site.single_stream:
            text = TextLength()
            register_innermost(site.block, TextLengthHook(text), ORACLE_HOOK)
            register_innermost(site.block.attn, SingleStreamOracleHook(stride, text), ORACLE_HOOK)
            continue
        for part in site.attentions:
            hook = ImageOracleHook(stride) if table is None else TableOracleHook(stride, table)
            register_innermost(getattr(site.block, part), hook, ORACLE_HOOK)
