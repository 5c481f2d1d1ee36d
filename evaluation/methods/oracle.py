"""The oracle: a bound on what any reduction at a ratio can gain, with no similarity and no matching at all.

In the blocks that tofu_sd patches, self-attention runs on every ``stride``-th token (a fixed strided subset,
``stride = round(1 / (1 - ratio))``: 2 at ratio 0.5, 4 at 0.75) and each kept token's output is copied to the
``stride - 1`` tokens after it: no similarity, no matching, no gather by index. It is what the bench compares
the reductions' machinery with; its images are not meant to be good. On a diffusion transformer the same is
done to the image tokens of the attentions that Token Fusion reduces around, next to all the text tokens
(:mod:`.oracle_dit`).
"""

from __future__ import annotations

import contextlib

from diffusers.hooks import ModelHook

from tofu_sd import TokenFusionConfig
from tofu_sd.hooking import register_innermost, unregister_all

from ..families import is_transformer, transformer_and_family, unet_of, unet_sites

from .oracle_dit import register_oracle
from .strided import ORACLE_HOOK, oracle_keep, oracle_spread, oracle_stride


class OracleHook(ModelHook):
    """Self-attention on every k-th token; each kept token's output is copied to the k - 1 tokens after it."""

    def __init__(self, ratio: float) -> None:
        super().__init__()
        self.stride = oracle_stride(ratio)
        self.n: int | None = None

    def pre_forward(self, module, hidden_states, *args, **kwargs):
        self.n = hidden_states.shape[1]
        return (oracle_keep(hidden_states, self.stride), *args), kwargs

    def post_forward(self, module, output):
        return oracle_spread(output, self.stride, self.n)


def oracle_params(value: float | None, options: TokenFusionConfig) -> dict:
    ratio = options.ratio if value is None else value
    return {"ratio": ratio, "keys_removed": 1 - 1 / oracle_stride(ratio)}


@contextlib.contextmanager
def oracle_patch(pipe, options: TokenFusionConfig, params: dict):
    """The oracle on a U-Net's ``attn1`` of the blocks that tofu_sd patches with ``options.max_downsample``, or on
    a diffusion transformer's image attention in the blocks that tofu_sd patches with ``options.blocks``
    (:func:`.oracle_dit.register_oracle`); removed through :func:`tofu_sd.hooking.unregister_all`, so the model is
    left exactly as before (no hook registry, no instance ``forward``)."""
    transformer = is_transformer(pipe)
    model = transformer_and_family(pipe)[0] if transformer else unet_of(pipe)
    try:
        if transformer:
            register_oracle(model, options, params["ratio"])
        else:
            for site in unet_sites(model, options.max_downsample):
                register_innermost(site.block.attn1, OracleHook(params["ratio"]), ORACLE_HOOK)
        yield
    finally:
        unregister_all(model, (ORACLE_HOOK,))
