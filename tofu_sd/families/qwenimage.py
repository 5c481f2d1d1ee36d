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

With ``reduce="kv"`` each block's ``attn`` keeps every query (text and image) and takes its image keys and values
from the block's reduced image tokens (:func:`qwen_attention`, run by
:class:`~tofu_sd.joint_kv.JointKeyValueHook` as ``QwenDoubleStreamAttnProcessor2_0`` computes it): each query
rotated with its own position, each reduced key with its slot's (a merged group: its destination's, as in Flux),
proportional attention's ``log(size)`` on the reduced keys, and the text's padding mask
(``encoder_hidden_states_mask``) kept: a padded text key gets ``-inf``, as the processor's boolean mask gives it.

The default schedule (``M`` in every block, :meth:`Family.default_schedule`) is provisional: no trained
Qwen-Image weights were analysed (``tofu-sd analyze``); it is the choice made for the other transformers.
"""

from __future__ import annotations

import torch
from diffusers.models.attention_dispatch import dispatch_attention_fn
from diffusers.models.transformers.transformer_qwenimage import (
    QwenDoubleStreamAttnProcessor2_0,
    QwenImageTransformerBlock,
    apply_rotary_emb_qwen,
)

from ..arguments import argument
from ..joint_kv import JointAttention
from ..merge import Matching, log_size_bias, reduce_tokens
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


def qwen_fits(text, emb, m: Matching, text_len: int, extras: dict) -> bool:
    """A call :func:`qwen_attention` mirrors: text, a boolean ``(B, T)`` padding mask or none, and no rotary table
    or ``(image (N, D/2), text (T, D/2))``."""
    mask = extras.get("encoder_hidden_states_mask")
    if text is None or (mask is not None and (mask.dtype != torch.bool or mask.shape != text.shape[:2])):
        return False
    return emb is None or (emb[0].shape[0] == m.num_tokens and emb[1].shape[0] == text.shape[1])


def text_key_bias(mask, text: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """The logit bias of the text keys, ``(B, T)`` in ``like``'s dtype: 0, or ``-inf`` where the boolean padding
    ``mask`` is False (what the processor's boolean mask does)."""
    bias = like.new_zeros(text.shape[:2])
    return bias if mask is None else bias.masked_fill(~mask, float("-inf"))


def qwen_attention(attn, x, text, emb, m: Matching, mode: str, text_len: int = 0, encoder_hidden_states_mask=None):
    """``QwenDoubleStreamAttnProcessor2_0`` with the image keys and values from the image tokens ``x`` reduced by
    ``m`` and ``mode`` and ``log(size)`` on their logits; every query and the text keys and values as the
    processor computes them. Through diffusers' dispatch with the processor's backend (which must take an
    additive mask: the native ones do). Returns ``(image, text)`` outputs, as the processor."""
    T, head_dim = text.shape[1], attn.inner_dim // attn.heads
    keys = reduce_tokens(x, m, mode)
    query, key, value = (t.unflatten(-1, (-1, head_dim)) for t in (attn.to_q(x), attn.to_k(keys), attn.to_v(keys)))
    projections = (attn.add_q_proj, attn.add_k_proj, attn.add_v_proj)
    text_q, text_k, text_v = (p(text).unflatten(-1, (-1, head_dim)) for p in projections)
    norms = (attn.norm_q, attn.norm_k, attn.norm_added_q, attn.norm_added_k)
    query, key, text_q, text_k = (t if n is None else n(t) for n, t in zip(norms, (query, key, text_q, text_k)))
    if emb is not None:
        rotary, (image_table, text_table) = ComplexRotary(), emb
        query = rotary.rotate(query, image_table)
        keys_table = gather_rotary(image_table, m).flatten(0, 1)  # each reduced key: its slot's position
        key = rotary.rotate(key.reshape(1, -1, *key.shape[2:]), keys_table).view(key.shape)
        text_q, text_k = rotary.rotate(text_q, text_table), rotary.rotate(text_k, text_table)
    query, key, value = torch.cat([text_q, query], 1), torch.cat([text_k, key], 1), torch.cat([text_v, value], 1)
    image_bias = log_size_bias(m, query.dtype)[:, 0]
    bias = torch.cat([text_key_bias(encoder_hidden_states_mask, text, image_bias), image_bias], dim=1)[:, None, None]
    backend = getattr(attn.processor, "_attention_backend", None)  # set by the model's set_attention_backend
    out = dispatch_attention_fn(query, key, value, attn_mask=bias, dropout_p=0.0, is_causal=False, backend=backend)
    out = out.flatten(2, 3).to(query.dtype)
    image = attn.to_out[0](out[:, T:].contiguous())
    if len(attn.to_out) > 1:
        image = attn.to_out[1](image)
    return image, attn.to_add_out(out[:, :T].contiguous())


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
    key_value_refusal = None
    joint_attention = JointAttention(
        QwenDoubleStreamAttnProcessor2_0, qwen_attention, fits=qwen_fits, extras=("encoder_hidden_states_mask",)
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
