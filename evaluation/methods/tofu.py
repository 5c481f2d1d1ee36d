"""Token Fusion (this project's plugin, :mod:`tofu_sd`) and ToMe (the ``tomesd`` package) as compared methods.

Both reduce the tokens before self-attention (``attn1``) of each patched block and restore them after it; their
``+<module>`` variants reduce them before more of the block's sub-modules, each on its own input and restored
after it: ``attn2`` (cross-attention) and ``ff`` (the feed-forward) for tofu (``tofu_sd.apply(modules=...)``),
``merge_crossattn`` and ``merge_mlp`` for tomesd. Their parameters record the sub-modules (``modules``, in
tofu_sd's names for both), so a run refuses to change them."""

from __future__ import annotations

import contextlib
import statistics
from dataclasses import asdict, replace

import tofu_sd
from tofu_sd import TokenFusionConfig
from tofu_sd.families.unet import transformer_block_sites

from ..families import unet_of

from .base import StepMix


def merged_params(value: float | None, options: TokenFusionConfig) -> dict:
    """A ratio method's parameters: its ratio (the name's, else the run's) and the tokens (queries and keys)
    merged away before self-attention."""
    ratio = options.ratio if value is None else value
    return {"ratio": ratio, "keys_removed": ratio}


def modules_params(modules: tuple[str, ...]):
    """The parameters of a ``+<module>`` variant: :func:`merged_params` and the sub-modules of each patched block
    that see the reduced tokens (a list, as the manifest's JSON gives it back). ``keys_removed`` stays the ratio
    (with ``reduce="kv"`` too): the fraction of self-attention's keys."""

    def params(value: float | None, options: TokenFusionConfig) -> dict:
        return {**merged_params(value, options), "modules": list(modules)}

    return params


#: The timesteps of the bench's two calls of a ``rematch_every`` schedule: the second is the next step (lower).
REMATCH_TIMESTEPS = (500, 480)


def rematch_mix(params: dict, options: TokenFusionConfig) -> StepMix | None:
    """With ``rematch_every=k > 1`` a step matches once every k steps and reuses the stored matchings at the
    others: the bench times a fresh application's first call (step 0, matching) and a call at a lower timestep
    (step 1, reusing) and weighs them 1/k and (k-1)/k. None (one call is the step) for ``k = 1``."""
    k = options.rematch_every
    if k == 1:
        return None
    return StepMix(
        phases=("match", "reuse"), weights=(1 / k, 1 - 1 / k), summary={"rematch_every": k},
        note=lambda name, s: (
            f"rematch_every={k}: per-step mean of 1 matching step (median {statistics.median(s['match_s']):.4f} s) "
            f"and {k - 1} reusing (median {statistics.median(s['reuse_s']):.4f} s)"
        ),
        timesteps=REMATCH_TIMESTEPS,
    )  # fmt: skip


def tofu_patch(**overrides):
    """The patch of ``tofu_sd.apply`` with the run's options, the name's ratio and ``overrides`` (e.g.
    ``matching="local"``, ``schedule="P"``) in place of the run's, and the parameters' ``modules`` if they have
    them (``tofu+ff``: ``modules=("attn1", "ff")``)."""

    @contextlib.contextmanager
    def patch(pipe, options: TokenFusionConfig, params: dict):
        kwargs = {**asdict(replace(options, ratio=params["ratio"])), **overrides}
        if "modules" in params:
            kwargs["modules"] = tuple(params["modules"])
        tofu_sd.apply(pipe, **kwargs)
        try:
            yield
        finally:
            tofu_sd.remove(pipe)

    return patch


def default_letters(pipe, options: TokenFusionConfig) -> str | None:
    """The letters tofu_sd's default schedule gives the blocks that ``options`` patch on ``pipe``'s model, in
    forward order (what a run's default-schedule ToFu images are made with), found by applying and removing it;
    None where tofu_sd cannot patch the model (the method then refuses it with its own error)."""
    probe = replace(options, ratio=0.5, schedule=None, reduce="tokens", modules=("attn1",), rematch_every=1)
    try:
        tofu_sd.apply(pipe, **asdict(probe))
    except ValueError:
        return None
    try:
        return "".join(block.letter for block in tofu_sd.patched_blocks(pipe))
    finally:
        tofu_sd.remove(pipe)


def tome_max_downsample(pipe, options: TokenFusionConfig) -> int:
    """tomesd counts downsampling from the U-Net input, tofu_sd from its finest transformer level: patch the same blocks."""
    finest = min(site.downsample for site in transformer_block_sites(unet_of(pipe)))
    return options.max_downsample * finest


#: tomesd's ``apply_patch`` flag of each sub-module, in tofu_sd's names.
TOME_FLAGS = {"attn1": "merge_attn", "attn2": "merge_crossattn", "ff": "merge_mlp"}


@contextlib.contextmanager
def tome_patch(pipe, options: TokenFusionConfig, params: dict):
    """tomesd's patch with the ratio, ``max_downsample``, ``sx``, ``sy`` and ``use_rand`` (ToMe has no schedule
    and no seed), on the blocks that tofu_sd patches, merging before the parameters' ``modules`` (``attn1`` alone
    without them: tomesd's default); removed with the ``_tome_info`` that tomesd leaves."""
    import tomesd

    unet = unet_of(pipe)
    had_info = {id(m) for m in unet.modules() if "_tome_info" in m.__dict__}
    modules = params.get("modules", ("attn1",))
    tomesd.apply_patch(
        pipe, ratio=params["ratio"], max_downsample=tome_max_downsample(pipe, options),
        sx=options.sx, sy=options.sy, use_rand=options.use_rand,
        **{flag: module in modules for module, flag in TOME_FLAGS.items()},
    )  # fmt: skip
    try:
        yield
    finally:
        tomesd.remove_patch(pipe)
        for module in unet.modules():  # the state tomesd's remove_patch leaves behind
            if "_tome_info" in module.__dict__ and id(module) not in had_info:
                del module._tome_info
