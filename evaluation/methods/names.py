"""The names of a run's (or a bench's) methods: a registry entry, or ``<method>@<value>`` for a method at one
value of its parameter (``tofu@0.5``, ``todo@0.75``). ``--ratios`` expands each method that sweeps into one name
per ratio (:func:`expand_ratios`)."""

from __future__ import annotations

from dataclasses import dataclass

from tofu_sd import TokenFusionConfig

from ..errors import EvaluationError
from .base import Method, MethodOptions, format_ratio
from .registry import REGISTRY, get_method


@dataclass(frozen=True)
class Name:
    """A parsed name: its entry and the value after ``@`` (None when unsuffixed)."""

    method: Method
    value: float | None

    def __str__(self) -> str:
        return variant_name(self.method.name, self.value)

    def params(self, options: TokenFusionConfig, more: MethodOptions | None = None) -> dict:
        return self.method.parameters(self.value, options, more)


def variant_name(method: str, ratio: float | None) -> str:
    """``tofu``, or ``tofu@0.5`` for one ratio of a sweep."""
    return method if ratio is None else f"{method}@{format_ratio(ratio)}"


def parse_name(name: str) -> Name:
    """``tofu@0.5`` -> (tofu's entry, 0.5); EvaluationError for an unknown method or a bad value."""
    method, at, suffix = name.partition("@")
    entry = get_method(method)
    if not at:
        return Name(entry, None)
    return Name(entry, entry.parameter.parse(method, name, suffix))


def split_name(name: str) -> tuple[str, float | None]:
    """``tofu@0.5`` -> ("tofu", 0.5); ``tofu`` -> ("tofu", None). EvaluationError for an unknown method or bad ratio."""
    parsed = parse_name(name)
    return parsed.method.name, parsed.value


def check_name(name: str, reduction: TokenFusionConfig) -> str:
    """Validate one method name against the reduction options; returns it in normal form (``tofu@.50`` -> ``tofu@0.5``)."""
    parsed = parse_name(name)
    if parsed.value is not None:
        parsed.method.parameter.check(name, parsed.value, reduction)
    return str(parsed)


def ratios_of(text: str) -> list[float]:
    """``--ratios 0.3,0.5,0.7`` -> [0.3, 0.5, 0.7] (sorted); EvaluationError saying what to fix otherwise."""
    try:
        ratios = [float(p) for p in text.split(",") if p.strip()]
    except ValueError:
        raise EvaluationError(f"bad --ratios {text!r}: give comma-separated fractions, e.g. 0.3,0.5,0.7") from None
    if not ratios:
        raise EvaluationError(f"--ratios {text!r} gives no ratio; e.g. 0.3,0.5,0.7")
    bad = [r for r in ratios if not 0 < r < 1]
    if bad:
        raise EvaluationError(f"--ratios must lie in (0, 1); got {', '.join(map(format_ratio, bad))}")
    if len({format_ratio(r) for r in ratios}) != len(ratios):
        raise EvaluationError(f"--ratios lists a ratio twice: {text}")
    return sorted(ratios)


def expand_ratios(methods: list[str], ratios: list[float] | None, reduction: TokenFusionConfig) -> list[str]:
    """The run's names: each unsuffixed method that sweeps once per ratio (``tofu@0.3``, ...), others as given.

    ``todo`` runs at the pooling nearest each ratio, named by the fraction of keys it removes (``todo@0.75``),
    once per distinct pooling; ratios nearer to no pooling at all (under 0.25) skip it. ``full`` and ``catome``
    (whose parameter is a threshold) run once.
    """
    names: list[str] = []
    for name in methods:
        parsed = parse_name(name)
        if ratios is None or parsed.value is not None or not parsed.method.parameter.sweeps:
            names.append(check_name(name, reduction))
            continue
        for r in ratios:
            value = parsed.method.parameter.for_sweep(r)
            if value is not None:
                names.append(check_name(variant_name(parsed.method.name, value), reduction))
    return list(dict.fromkeys(names))


def split_list(text: str) -> list[str]:
    return [m.strip() for m in text.split(",") if m.strip()]


def normal_names(names: list[str], reduction: TokenFusionConfig, noun: str = "method") -> list[str]:
    """``names`` checked (:func:`check_name`) and in normal form; EvaluationError for an unknown or repeated one
    (``noun``: what the command calls them, ``method`` or ``variant``)."""
    unknown = [m for m in names if m.partition("@")[0] not in REGISTRY]
    if unknown or not names:
        raise EvaluationError(f"unknown {noun}(s) {', '.join(unknown) or '(none given)'}; choose from {', '.join(REGISTRY)}")
    normal = [check_name(m, reduction) for m in names]
    if len(set(normal)) != len(normal):
        raise EvaluationError(f"--{noun}s lists a {noun} twice: {','.join(names)}")
    return normal


def parse_methods(text: str, ratios: list[float] | None = None, reduction: TokenFusionConfig | None = None) -> list[str]:
    """``--methods`` (and ``--ratios``) -> the run's method names, validated against ``reduction``."""
    reduction = reduction or TokenFusionConfig()
    normal = normal_names(split_list(text), reduction)
    names = expand_ratios(normal, ratios, reduction)
    if not names:
        raise EvaluationError(f"--methods {text} with --ratios leaves no method to run")
    return names
