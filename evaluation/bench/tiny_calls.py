"""Measurements on one call of the random-weight tiny SD-1.5-shaped U-Net: the ops each patch adds per patched
block, and the peak memory of a call at a large latent."""

from __future__ import annotations

import torch


from ..families import unet_sites
from ..tiny_random import tiny_unet, tiny_unet_inputs
from .profiling import count_ops, peak_alloc_bytes
from .steps import unet_step
from .variants import variant_applied


@torch.no_grad()
def ops_per_block(variants=("tome", "tofu", "tofu-local"), ratio: float = 0.5) -> dict:
    """Ops that each variant adds per patched block to one call of the tiny SD-1.5-shaped U-Net (batch 2, 16x16
    latent, fp32, eager, CPU): (ops of the patched call - ops of the unpatched call) / patched blocks."""
    unet = tiny_unet("sd15")
    inputs = tiny_unet_inputs(unet)
    blocks = len(unet_sites(unet, 1))

    def one_call():
        return unet_step(unet, inputs)

    one_call()
    base = count_ops(one_call)
    out = {}
    for variant in variants:
        with variant_applied(unet, variant, ratio):
            one_call()
            counts = count_ops(one_call)
        extra = counts.copy()
        extra.subtract(base)
        out[variant] = {
            "per_block": sum(extra.values()) / blocks,
            "by_op": {k: v for k, v in sorted(extra.items()) if v},
        }
    return out


@torch.no_grad()
def call_memory(latent: int, variants=("full", "tome", "tofu", "tofu-local"), ratio: float = 0.5, batch: int = 2) -> dict:
    """Peak of live tensors (MB, profiler allocation trace, weights excluded) of one call of the tiny SD-1.5-shaped
    U-Net at a ``latent x latent`` latent (N = latent**2 tokens at its highest resolution), per variant."""
    unet = tiny_unet("sd15")
    inputs = tiny_unet_inputs(unet, batch=batch, height=latent, width=latent)
    out = {}
    for variant in variants:
        with variant_applied(unet, variant, ratio):
            unet_step(unet, inputs)
            out[variant] = peak_alloc_bytes(lambda: unet_step(unet, inputs)) / 2**20
    return out
