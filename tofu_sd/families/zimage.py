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

Refused: Z-Image-Omni's nested list inputs (condition images and SigLIP features before and after the image, with
a modulation per token), latents of different sizes in one batch, and more than one latent frame, each at the call;
``reduce="kv"`` (the attention takes queries, keys and values from one sequence). The default schedule, ``M`` in
every block, is provisional: no Z-Image weights were analysed (``tofu-sd analyze``).
"""

from __future__ import annotations

import torch
from diffusers.models.transformers.transformer_z_image import ZImageTransformerBlock, ZSingleStreamAttnProcessor

from ..arguments import argument
from .base import Family, Site

OMNI_REFUSAL = (
    "Token Fusion on a ZImageTransformer2DModel does not support Z-Image-Omni's nested list inputs (condition "
    "images and SigLIP features around the image, their modulation per token): only a flat list of latents, one "
    "per batch element, as ZImagePipeline passes them. tofu_sd.remove(pipe) to run this model."
)


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
    key_value_refusal = (
        "its attention computes queries, keys and values from one padded [image, caption] sequence, so Token "
        "Fusion would have to run it itself with the reduced image keys (not written yet)"
    )

    def sites(self, model: torch.nn.Module) -> list[Site]:
        return [
            Site(f"layers.{i}", block, model, ("attention",), single_stream=True, image_first=True)
            for i, block in enumerate(model.layers)
            if isinstance(block, ZImageTransformerBlock)
        ]

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
