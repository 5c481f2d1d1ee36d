"""Qwen-Image (``QwenImageTransformer2DModel``): its double-stream blocks, in forward order.

The same class runs Qwen-Image, Qwen-Image-Edit (``QwenImageEditPipeline``, ``QwenImageEditPlusPipeline``) and
Qwen-Image-Layered. Its input is packed ``(B, N, C)`` (2 x 2 latent pixels per token, rows first); the grid comes
from the call's ``img_shapes``, read on the host once per transformer call, outside any compiled graph: it must
describe a single image ``(1, h, w)`` of ``h * w`` tokens, as ``QwenImagePipeline`` passes it. The edit and
layered pipelines append reference images or layers to the sequence (several shapes): they are refused.

Each block is reduced around its joint attention ``attn``: the image ``hidden_states`` are reduced and restored,
the text ``encoder_hidden_states`` pass untouched. Rotary positions follow their tokens as in Flux
(:mod:`.flux`), but Qwen-Image's table is a pair of complex frequency tables ``(image (N, D/2), text (T, D/2))``
applied by diffusers' ``apply_rotary_emb_qwen`` (:class:`ComplexRotary`): the attention is called without
``image_rotary_emb`` and the rotary hooks on ``norm_q`` / ``norm_k`` (image) and ``norm_added_q`` /
``norm_added_k`` (text) rotate right after the norms, where ``QwenDoubleStreamAttnProcessor2_0`` rotates; other
processors are refused. The timestep: ``QwenImagePipeline`` passes ``t / 1000`` and the model's time projection
scales it by 1000, so the partition key is ``1000 x`` the argument, as in Flux.

The default schedule (``M`` in every block, :meth:`Family.default_schedule`) is provisional: no trained
Qwen-Image weights were analysed (``tofu-sd analyze``); it is the choice made for the other transformers.
"""

from __future__ import annotations

import torch
from diffusers.models.transformers.transformer_qwenimage import (
    QwenDoubleStreamAttnProcessor2_0,
    QwenImageTransformerBlock,
    apply_rotary_emb_qwen,
)

from ..arguments import argument
from ..merge import Matching
from ..reducing import RotaryLayout, gather_rotary
from .base import Family, Site


class ComplexRotary(RotaryLayout):
    """Qwen-Image's rotary table: ``image_rotary_emb`` is ``(image, text)``, complex frequencies of shapes
    ``(N, D/2)`` and ``(T, D/2)``, applied by ``apply_rotary_emb_qwen(x, table, use_real=False)``."""

    def split(self, emb, text_len: int, m: Matching) -> tuple | None:
        image, text = emb
        if image.shape[0] != m.num_tokens or text.shape[0] != text_len:
            return None
        return gather_rotary(image, m).flatten(0, 1), text

    def rotate(self, x: torch.Tensor, table) -> torch.Tensor:
        return apply_rotary_emb_qwen(x, table, use_real=False)


def grid_from_shapes(img_shapes) -> tuple[int, int] | None:
    """``(h, w)`` if ``img_shapes`` describes one image of one frame, ``(1, h, w)`` (in tokens), read as the model
    reads it (the first batch element's list of shapes, or a bare shape); ``None`` for several images or frames."""
    shapes = img_shapes
    if isinstance(shapes, list):
        shapes = shapes[0] if shapes else None
    if not isinstance(shapes, list):
        shapes = [shapes]
    if len(shapes) != 1 or not isinstance(shapes[0], (tuple, list)) or len(shapes[0]) != 3:
        return None
    try:
        frames, h, w = (int(v) for v in shapes[0])
    except (TypeError, ValueError):
        return None
    return (h, w) if frames == 1 and h > 0 and w > 0 else None


class QwenImageFamily(Family):
    name = "Qwen-Image"
    tested_diffusers = "0.42.1"  # the release its adapter was written and tested on
    timestep_index = 3
    timestep_scale = 1000.0
    rotary_norms = (("norm_q", False), ("norm_k", False), ("norm_added_q", True), ("norm_added_k", True))
    rotary_layout = ComplexRotary()
    key_value_refusal = (
        "its attention computes the image queries, keys and values from one input and rotates them together"
    )

    def sites(self, model: torch.nn.Module) -> list[Site]:
        return [
            Site(f"transformer_blocks.{i}", block, model, ("attn",))
            for i, block in enumerate(model.transformer_blocks)
            if isinstance(block, QwenImageTransformerBlock)
        ]

    def grid(self, module, args, kwargs) -> tuple[int, int]:
        """The token grid of a Qwen-Image call, from its ``img_shapes``; ``ValueError`` if it is no single image of
        ``hidden_states``' tokens."""
        x = argument(args, kwargs, 0, "hidden_states")
        shapes = argument(args, kwargs, 4, "img_shapes")
        grid = grid_from_shapes(shapes)
        if grid is None or x.shape[1] != grid[0] * grid[1]:
            raise ValueError(
                "Token Fusion on a QwenImageTransformer2DModel takes the token grid from `img_shapes`: it must "
                "describe one image of one frame, (1, h, w), with h * w tokens in `hidden_states` (as "
                f"QwenImagePipeline passes it); got img_shapes={shapes!r} for {x.shape[1]} tokens. Pipelines that "
                "append reference images or layers to the image tokens (QwenImageEditPipeline, "
                "QwenImageEditPlusPipeline, QwenImageLayeredPipeline) are not supported; tofu_sd.remove(pipe) to "
                "run them."
            )
        return grid

    def check_attention(self, name: str, attn: torch.nn.Module) -> None:
        processor = getattr(attn, "processor", None)
        missing = [norm for norm, _ in self.rotary_norms if getattr(attn, norm, None) is None]
        if type(processor) is not QwenDoubleStreamAttnProcessor2_0 or missing:
            raise ValueError(
                f"Token Fusion cannot patch {name}: it rotates queries and keys per kept token right after their "
                "norms (norm_q, norm_k, norm_added_q, norm_added_k), where QwenDoubleStreamAttnProcessor2_0 rotates "
                f"them; this attention has processor {type(processor).__name__}"
                + (f" and no {', '.join(missing)}" if missing else "")
                + "."
            )
