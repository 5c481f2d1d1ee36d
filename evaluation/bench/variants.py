"""The bench's variants: the registry's method names (``tofu``, ``tofu@0.5``, ``todo@0.75``, ``oracle``, ...),
as ``tofu-sd generate`` takes them. An unsuffixed name whose parameter is a ratio runs at the bench's ``--ratio``;
``todo`` unsuffixed is 2x2 pooling, as in ``generate``."""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from dataclasses import replace

from tofu_sd import TokenFusionConfig

from ..errors import EvaluationError
from ..methods.base import MethodOptions, StepMix
from ..methods.names import Name, normal_names, parse_name
from ..methods.registry import METHODS, REGISTRY

#: Every method of the registry, in its order; those in the bench's default set are :func:`default_variants`.
VARIANTS = METHODS
#: The options of every variant besides its name's parameter: tofu_sd's defaults (``--rematch-every`` aside).
BENCH_OPTIONS = TokenFusionConfig()


def default_variants() -> tuple[str, ...]:
    """The bench's variants when none are given: every entry in its default set whose package is installed
    (``catome`` needs the optional ``ca-tome``)."""
    return tuple(
        name for name, method in REGISTRY.items()
        if method.in_bench_default and (method.requires is None or method.requires.available())
    )  # fmt: skip


def resolve_variant(variant: str, ratio: float) -> Name:
    """The name ``variant`` with its value: the one after ``@``, else ``ratio`` where its parameter takes the run's."""
    name = parse_name(variant)
    if name.value is None and name.method.parameter.uses_run_ratio:
        return replace(name, value=ratio)
    return name


def bench_options(rematch_every: int = 1, max_downsample: int = 1) -> TokenFusionConfig:
    """The options of every variant besides its name's parameter: :data:`BENCH_OPTIONS`, with ``rematch_every``
    and ``max_downsample`` (the U-Net levels that every block-selecting method patches, as in ``generate``;
    ValueError if either is out of range)."""
    return replace(BENCH_OPTIONS, rematch_every=rematch_every, max_downsample=max_downsample)


def parse_variants(
    variants: Sequence[str], ratio: float, options: TokenFusionConfig = BENCH_OPTIONS, more: MethodOptions | None = None
) -> list[str]:
    """The variants in normal form (``tofu@.50`` -> ``tofu@0.5``); EvaluationError (or ValueError, for a missing
    package) saying what to fix, also for a method the bench cannot time (a step cache, ``bench_refusal``) or a
    step mix it cannot time (:func:`variant_mix`)."""
    names = normal_names(list(variants), options, noun="variant")
    for label in names:
        name = resolve_variant(label, ratio)
        if name.method.bench_refusal is not None:
            raise EvaluationError(f"variant {label} cannot be benched: {name.method.bench_refusal}")
        if name.value is not None:
            name.method.parameter.check(label, name.value, options)
        needs = name.method.requires
        if needs is not None and not needs.available():
            raise ValueError(f"variant {label} needs the {needs.package} package: {needs.install}")
        variant_mix(label, ratio, options, more)
    return names


def variant_params(variant: str, ratio: float, options: TokenFusionConfig = BENCH_OPTIONS, more: MethodOptions | None = None) -> dict:
    """The variant's parameters (``more``: the bench's :class:`~evaluation.methods.base.MethodOptions`)."""
    return resolve_variant(variant, ratio).params(options, more)


def variant_mix(
    variant: str, ratio: float, options: TokenFusionConfig = BENCH_OPTIONS, more: MethodOptions | None = None
) -> StepMix | None:
    """How the bench times the variant's step (:class:`~evaluation.methods.base.StepMix`), or None: one call."""
    name = resolve_variant(variant, ratio)
    return name.method.mix(name.params(options, more), options)


@contextlib.contextmanager
def variant_applied(
    unet, variant: str, ratio: float, options: TokenFusionConfig = BENCH_OPTIONS, more: MethodOptions | None = None
):
    """Patch ``unet`` as the name ``variant`` says (at ``ratio`` unless it says otherwise) for the block."""
    name = resolve_variant(variant, ratio)
    with name.method.patch(unet, options, name.params(options, more)):
        yield
