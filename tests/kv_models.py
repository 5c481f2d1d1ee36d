"""The tiny models of the ``reduce="kv"`` tests, every family in one place: how to build each, its call's inputs,
where its text sits in the joint sequence and which attentions ``reduce="kv"`` patches; and a recorder of what
reaches the attention kernel. A plain module (no tests) that the test_dit_kv* files share."""

import contextlib
import functools
from collections.abc import Callable
from dataclasses import dataclass
from unittest import mock

import torch
import torch.nn.functional as F
from test_dit_chroma import chroma_inputs, tiny_chroma
from test_dit_common import (
    flux_inputs,
    qwenimage_inputs,
    sd3_inputs,
    tiny_flux,
    tiny_qwenimage,
    tiny_sd3,
)
from test_dit_common import run as run_sample
from test_dit_flux2 import flux2_inputs, tiny_flux2
from test_dit_sana import sana_inputs, tiny_sana
from test_dit_wan import tiny_wan, wan_inputs
from test_dit_zimage import tiny_zimage, zimage_inputs


@dataclass(frozen=True)
class KvModel:
    """``build()`` makes the model, ``inputs(model)`` its call's keyword arguments; ``layout`` says where the text
    stands in a joint attention's sequence; ``patched`` names the attentions ``reduce="kv"`` hooks, in order."""

    build: Callable[[], torch.nn.Module]
    inputs: Callable[[torch.nn.Module], dict]
    layout: str  # "text-first", "image-first", or "image-only" (no text in the self-attention)
    patched: tuple[str, ...]


#: Text tokens of every call.
T = 5
#: The text padding of the "qwen-padded" call: element 0's last two tokens.
PADDING = torch.tensor([[True, True, True, False, False], [True] * T])


def blocks(stem, attention, n=2):
    return tuple(f"{stem}.{i}.{attention}" for i in range(n))


DOUBLE_AND_SINGLE = blocks("transformer_blocks", "attn") + blocks("single_transformer_blocks", "attn")
SD3_INPUTS = functools.partial(sd3_inputs, height=16, width=12, text=T)

#: 48 image / video tokens: SD3 a 16 x 12 latent in 2 x 2 patches, Flux and Qwen-Image 6 x 8, Wan 3 frames of
#: 4 x 4, Sana 6 x 8 patches. 30 image tokens (5 x 6): FLUX.2, Chroma and Z-Image, whose layers get [30 image
#: tokens, 66 more]: 2 of image padding, captions of 5 and 40 tokens padded to 32 and 64, batch padding, a key mask.
MODELS = {
    "sd3": KvModel(functools.partial(tiny_sd3, num_layers=2), SD3_INPUTS, "image-first",
                   blocks("transformer_blocks", "attn")),
    "sd3.5": KvModel(functools.partial(tiny_sd3, num_layers=2, dual_attention_layers=(0,)), SD3_INPUTS, "image-first",
                     ("transformer_blocks.0.attn", "transformer_blocks.0.attn2", "transformer_blocks.1.attn")),
    "flux": KvModel(tiny_flux, functools.partial(flux_inputs, h=6, w=8, text=T), "text-first", DOUBLE_AND_SINGLE),
    "qwen": KvModel(tiny_qwenimage, lambda model: qwenimage_inputs(model, h=6, w=8, text=T), "text-first",
                    blocks("transformer_blocks", "attn")),
    "qwen-padded": KvModel(tiny_qwenimage, lambda model: qwenimage_inputs(model, h=6, w=8, text=T, mask=PADDING),
                           "text-first", blocks("transformer_blocks", "attn")),
    "wan": KvModel(tiny_wan, lambda model: wan_inputs(model, frames=3, h=4, w=4, text=T), "image-only",
                   blocks("blocks", "attn1")),
    "wan-i2v": KvModel(lambda: tiny_wan(i2v=True), lambda model: wan_inputs(model, frames=3, h=4, w=4), "image-only",
                       blocks("blocks", "attn1")),
    "sana": KvModel(lambda: tiny_sana(num_layers=2), lambda model: sana_inputs(model, height=12, width=16, text=T),
                    "image-only", blocks("transformer_blocks", "attn1")),
    "flux2": KvModel(tiny_flux2, lambda model: flux2_inputs(model, h=5, w=6, text=T), "text-first", DOUBLE_AND_SINGLE),
    "chroma": KvModel(tiny_chroma, lambda model: chroma_inputs(model, h=5, w=6, text=T, padding=[2, 0]),
                      "text-first", DOUBLE_AND_SINGLE),
    "chroma-float": KvModel(
        tiny_chroma, lambda model: chroma_inputs(model, h=5, w=6, text=T, padding=[2, 0], dtype=torch.float32),
        "text-first", DOUBLE_AND_SINGLE,
    ),
    "zimage": KvModel(tiny_zimage, lambda model: zimage_inputs(h=5, w=6, text=(5, 40)), "image-first",
                      blocks("layers", "attention")),
}  # fmt: skip


def run(model, inputs):
    """The model's output for ``inputs``, without gradients; Z-Image's list of samples stacked into one tensor."""
    out = run_sample(model, inputs)
    return torch.stack(out) if isinstance(out, list) else out


@contextlib.contextmanager
def attention_calls():
    """Every ``F.scaled_dot_product_attention`` call's ``(query, key, value, mask)``, ``(B, H, S, D)``, in order
    (SD3's processor calls it, and so does diffusers' native backend that the other families dispatch to)."""
    seen = []
    original = F.scaled_dot_product_attention

    def record(query, key, value, attn_mask=None, **kwargs):
        seen.append((query, key, value, attn_mask))
        return original(query, key, value, attn_mask=attn_mask, **kwargs)

    with mock.patch.object(F, "scaled_dot_product_attention", record):
        yield seen
