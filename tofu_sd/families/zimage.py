"""Z-Image (``ZImageTransformer2DModel``, Z-Image and Z-Image-Turbo): its main ``layers``, in forward order.

Its input is a list of latents ``(C, 1, H, W)``, one per batch element, and a list of captions. Per element the
model patchifies the latent into ``h x w`` tokens, row-major (``h = H / patch_size``), pads them to a multiple of
32 with a learned pad token and runs its noise refiner on them; it runs its context refiner on the caption (also
padded to a multiple of 32); then its main layers run on one sequence per element, ``[image, image padding,
caption, caption padding]``, padded across the batch to the longest element with a ``(B, S)`` key mask when the
captions' padded lengths differ (a CFG batch with a negative prompt, say). Rotary positions are 3-D, a complex
table per element and token ``(B, S, D / 2)`` that the attention's processor applies after its query / key norms,
passed to it as ``freqs_cis``.

A main layer is an ``image_first`` single-stream site: its matching is taken on the first ``h * w`` tokens, and its
``attention`` runs on the reduced image tokens followed by everything else bit for bit
(:class:`~tofu_sd.reducing.LeadingImageHook`); the key mask's columns and the ``freqs_cis`` rows are cut alike
(each kept token its own row, a merged group its destination's), and the image part of the output is restored.
The block's modulation is per batch element, not per token: it needs nothing. The refiners stay unpatched (they
run once each, on the image or the caption alone).

With ``reduce="kv"`` a main layer's ``attention`` keeps every query (image and the rest) and takes its keys and
values from ``[reduced image tokens, rest]`` (:func:`zimage_attention`, run by
:class:`~tofu_sd.joint_kv.JointKeyValueHook` as ``ZSingleStreamAttnProcessor`` computes it): each query rotated with
its own ``freqs_cis`` row, each reduced key with its slot's (a merged group: its destination's), the rest's keys
with their own; proportional attention's ``log(size)`` on the reduced keys and the key mask kept on the rest (a
reduced key's mask entry made from its group's, :func:`~tofu_sd.joint_kv.grouped_key_bias`; the model never masks
an image token, so it is ``log(size)``).

Refused: Z-Image-Omni's nested list inputs (condition images and SigLIP features before and after the image, with
a modulation per token), latents of different sizes in one batch, and more than one latent frame, each at the call.
The default schedule, ``M`` in every block, is provisional: no Z-Image weights were analysed (``tofu-sd analyze``).
"""

from __future__ import annotations

import torch
from diffusers.models.attention_dispatch import dispatch_attention_fn
from diffusers.models.transformers.transformer_z_image import ZImageTransformerBlock, ZSingleStreamAttnProcessor

from ..arguments import argument
from ..config import TokenFusionConfig
from ..joint_kv import JointAttention, additive_mask, grouped_key_bias
from ..merge import Matching, log_size_bias, reduce_tokens
from ..reducing import gather_positions, kept_positions
from .base import Family, Part, Site

OMNI_REFUSAL = (
    "Token Fusion on a ZImageTransformer2DModel does not support Z-Image-Omni's nested list inputs (condition "
    "images and SigLIP features around the image, their modulation per token): only a flat list of latents, one "
    "per batch element, as ZImagePipeline passes them. tofu_sd.remove(pipe) to run this model."
)


def rotate_complex_rows(x: torch.Tensor, freqs: torch.Tensor) -> torch.Tensor:
    """Queries or keys ``x`` ``(B, S, heads, D)`` turned pair by pair by ``freqs`` ``(B, S, D / 2)`` (unit complex
    numbers, one row per token), in float32, as ``ZSingleStreamAttnProcessor`` rotates them."""
    with torch.amp.autocast("cuda", enabled=False):
        pairs = torch.view_as_complex(x.float().reshape(*x.shape[:-1], -1, 2))
        return torch.view_as_real(pairs * freqs.unsqueeze(2)).flatten(3).type_as(x)


def leading_key_bias(m: Matching, rest: int, dtype: torch.dtype, mask: torch.Tensor | None) -> torch.Tensor:
    """The logit bias of the keys ``[reduced image, rest]``, ``(B, 1, 1, N - r + rest)`` in ``dtype``: the reduced
    keys' ``log(size)``, 0 on the rest; with a key mask ``(B, N + rest)`` (boolean or additive), its columns of the
    rest and the image's grouped (:func:`~tofu_sd.joint_kv.grouped_key_bias`)."""
    if mask is None:
        image = log_size_bias(m, dtype)
        return torch.cat([image, image.new_zeros(m.batch, 1, rest)], dim=-1).unsqueeze(1)
    bias = additive_mask(mask, torch.promote_types(dtype, torch.float32))[:, None, None, :]
    image = grouped_key_bias(bias[..., : m.num_tokens], m)
    return torch.cat([image, bias[..., m.num_tokens :]], dim=-1).to(dtype)


def zimage_fits(text, emb, m: Matching, text_len: int, extras: dict) -> bool:
    """A call :func:`zimage_attention` mirrors: no ``encoder_hidden_states``, ``freqs_cis`` none or one row per
    batch element and token, a key mask none or ``(B, S)``."""
    shape, mask = (m.batch, m.num_tokens + text_len), extras.get("attention_mask")
    if text is not None or (emb is not None and (emb.ndim != 3 or tuple(emb.shape[:2]) != shape)):
        return False
    return mask is None or (mask.ndim == 2 and tuple(mask.shape) == shape)


def zimage_attention(attn, x, text, emb, m: Matching, mode: str, text_len: int = 0, attention_mask=None):
    """``ZSingleStreamAttnProcessor`` on ``x`` = ``[image, rest]`` (``text_len``: the rest's length, the tokens
    after the image) with the keys and values of ``[image reduced by m and mode, rest]``: every query as the
    processor computes it, each reduced key rotated with its slot's ``freqs_cis`` row (:func:`kept_positions`),
    the rest's keys with their own; :func:`leading_key_bias` through the processor's backend (which must take an
    additive mask: the native ones do). The rest's keys are projected in one call with the reduced image tokens
    (the same arithmetic per row; a BLAS may still round a product of fewer rows differently)."""
    keys = torch.cat([reduce_tokens(x[:, : m.num_tokens], m, mode), x[:, m.num_tokens :]], dim=1)
    query = attn.to_q(x).unflatten(-1, (attn.heads, -1))
    key = attn.to_k(keys).unflatten(-1, (attn.heads, -1))
    value = attn.to_v(keys).unflatten(-1, (attn.heads, -1))
    if attn.norm_q is not None:
        query = attn.norm_q(query)
    if attn.norm_k is not None:
        key = attn.norm_k(key)
    if emb is not None:
        query = rotate_complex_rows(query, emb)
        key = rotate_complex_rows(key, gather_positions(emb, kept_positions(m, 0, text_len)))
    bias = leading_key_bias(m, text_len, query.dtype, attention_mask)
    backend = getattr(attn.processor, "_attention_backend", None)  # set by the model's set_attention_backend
    out = dispatch_attention_fn(query, key, value, attn_mask=bias, dropout_p=0.0, is_causal=False, backend=backend)
    out = attn.to_out[0](out.flatten(2, 3).to(query.dtype))
    return attn.to_out[1](out) if len(attn.to_out) > 1 else out


class ZImageFamily(Family):
    name = "Z-Image"
    processors = (ZSingleStreamAttnProcessor,)
    processor_reason = (
        "the one that takes the rotary table per token as `freqs_cis` and the key mask that Token Fusion cut "
        "to the kept tokens"
    )
    tested_diffusers = "0.42.1"  # the release its adapter was written and tested on
    timestep_index = 1
    timestep_scale = 1000.0  # the model embeds `t * t_scale` (1000 by default)
    token_rotary = "freqs_cis"
    key_value_refusal = None
    joint_attention = JointAttention(
        ZSingleStreamAttnProcessor, zimage_attention, rotary_argument="freqs_cis", fits=zimage_fits, mask=True
    )

    def sites(self, model: torch.nn.Module) -> list[Site]:
        return [
            Site(f"layers.{i}", block, model, ("attention",), single_stream=True, image_first=True)
            for i, block in enumerate(model.layers)
            if isinstance(block, ZImageTransformerBlock)
        ]

    def parts(self, site: Site, config: TokenFusionConfig) -> list[Part]:
        """Each main layer's ``attention``: with ``reduce="kv"`` a key-value part (its
        :class:`~tofu_sd.joint_kv.JointKeyValueHook` finds the rest after the image)."""
        if config.reduce == "kv":
            return [Part(name, "kv") for name in site.attentions]
        return super().parts(site, config)

    def timestep(self, args: tuple, kwargs: dict):
        """The call's ``t`` (Z-Image's name for the timestep), scaled as the model scales it."""
        t = argument(args, kwargs, self.timestep_index, "t")
        return None if t is None else t * self.timestep_scale

    def grid(self, module, args, kwargs) -> tuple[int, int] | None:
        """The token grid of a Z-Image call, ``(H / p, W / p)`` of its latents ``(C, 1, H, W)``; ``ValueError``
        for Z-Image-Omni's nested lists, latents of different sizes or more than one latent frame."""
        x = argument(args, kwargs, 0, "x")
        if not isinstance(x, (list, tuple)) or not x:
            return None
        if not all(isinstance(latent, torch.Tensor) for latent in x):
            raise ValueError(OMNI_REFUSAL)
        p = argument(args, kwargs, 7, "patch_size") or 2
        pf = argument(args, kwargs, 8, "f_patch_size") or 1
        shapes = {tuple(latent.shape[1:]) for latent in x}
        (frames, height, width), *others = shapes
        if others or frames // pf != 1:
            raise ValueError(
                "Token Fusion on a ZImageTransformer2DModel needs latents of one size and one frame in a call (the "
                f"image tokens of every batch element in the same place); got latents (C, F, H, W) of sizes "
                f"{sorted(shapes)} with f_patch_size={pf}. Call it per size, or tofu_sd.remove(pipe) to run it."
            )
        return height // p, width // p
