"""The compared methods: ``full`` (unpatched), ``tome`` (the real tomesd package) and ``tofu`` (ours)."""

from __future__ import annotations

import contextlib
from dataclasses import asdict

import tofu_sd
from tofu_sd import TokenFusionConfig
from tofu_sd.blocks import transformer_block_sites

from .errors import EvaluationError

METHODS = ("full", "tome", "tofu")


def parse_methods(text: str) -> list[str]:
    methods = [m.strip() for m in text.split(",") if m.strip()]
    unknown = [m for m in methods if m not in METHODS]
    if unknown or not methods:
        raise EvaluationError(f"unknown method(s) {', '.join(unknown) or '(none given)'}; choose from {', '.join(METHODS)}")
    if len(set(methods)) != len(methods):
        raise EvaluationError(f"--methods lists a method twice: {text}")
    return methods


def tome_max_downsample(pipe, options: TokenFusionConfig) -> int:
    """tomesd counts downsampling from the U-Net input, tofu_sd from its finest transformer level: patch the same blocks."""
    finest = min(site.downsample for site in transformer_block_sites(pipe.unet))
    return options.max_downsample * finest


@contextlib.contextmanager
def method_applied(pipe, method: str, options: TokenFusionConfig):
    """Patch ``pipe`` for ``method`` for the duration of the block, and restore it afterwards.

    ``tome`` takes ``ratio``, ``max_downsample``, ``sx``, ``sy`` and ``use_rand`` from ``options`` (ToMe has no
    schedule and no seed); ``tofu`` takes all of them.
    """
    if method == "full":
        yield
    elif method == "tofu":
        tofu_sd.apply(pipe, **asdict(options))
        try:
            yield
        finally:
            tofu_sd.remove(pipe)
    elif method == "tome":
        import tomesd

        tomesd.apply_patch(
            pipe, ratio=options.ratio, max_downsample=tome_max_downsample(pipe, options),
            sx=options.sx, sy=options.sy, use_rand=options.use_rand,
        )  # fmt: skip
        try:
            yield
        finally:
            tomesd.remove_patch(pipe)
    else:
        raise EvaluationError(f"unknown method {method!r}; choose from {', '.join(METHODS)}")
