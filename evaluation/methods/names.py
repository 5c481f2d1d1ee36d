"""The names of a run's (or a bench's) methods: a registry entry, or ``<method>@<value>`` for a method at one
value of its parameter (``tofu@0.5``, ``todo@0.75``). ``--ratios`` expands each method that sweeps into one name
per ratio (:func:`expand_ratios`).

A ``deepcache+<variant>`` name runs DeepCache at the run's ``--cache-interval``; ``deepcache@N+<variant>`` (e.g.
``deepcache@4+tofu-kv@0.75``) gives its own interval N, so one run can hold the combination at several intervals,
each paired with the same ``full`` images. Likewise a stack of one of diffusers' step caches and a tofu variant,
``<cache>+<variant>``, runs the cache at its default value and ``<cache>@<value>+<variant>`` (e.g.
``fbcache@0.2+tofu-kv@0.75``, ``taylorseer-lite@2+tofu@0.25``) at that value, checked as the cache's own."""

from __future__ import annotations

from dataclasses import dataclass, replace

from tofu_sd import TokenFusionConfig

from ..errors import EvaluationError
from .base import Method, MethodOptions, format_ratio
from .caches import CACHE_NAMES
from .registry import CACHE_STACKS, REGISTRY, get_method


@dataclass(frozen=True)
class Name:
    """A parsed name: its entry and the value after ``@`` (None when unsuffixed)."""

    method: Method
    value: float | None
    #: the cache interval a ``deepcache@N+<variant>`` name gives (None: the run's ``--cache-interval``)
    cache_interval: int | None = None
    #: the cache's value a ``<cache>@<value>+<variant>`` stack gives (None: the cache's default)
    cache_value: float | None = None

    def __str__(self) -> str:
        name = variant_name(self.method.name, self.value)
        head = self.method.name.partition("+")[0]
        given = self.cache_interval if self.cache_interval is not None else self.cache_value
        if given is None:
            return name
        return name.replace(f"{head}+", f"{head}@{format_ratio(given)}+", 1)

    def params(self, options: TokenFusionConfig, more: MethodOptions | None = None) -> dict:
        if self.cache_interval is not None:
            more = replace(more or MethodOptions(), cache_interval=self.cache_interval)
        out = self.method.parameters(self.value, options, more)
        if self.cache_value is not None:  # the stack's cache at the name's value (its parameters hold the default)
            out[CACHE_STACKS[self.method.name][0].key] = self.cache_value
        return out


def variant_name(method: str, ratio: float | None) -> str:
    """``tofu``, or ``tofu@0.5`` for one ratio of a sweep."""
    return method if ratio is None else f"{method}@{format_ratio(ratio)}"


CACHE_PREFIX = "deepcache"  #: the method whose interval a combined name may give: ``deepcache@N+<variant>``


def _valued_head(name: str) -> tuple[str, str, str] | None:
    """``(prefix, value, rest)`` of a combined name whose first method gives its own value,
    ``deepcache@<N>+<rest>`` or ``<cache>@<value>+<rest>``; None for any other name."""
    head, plus, rest = name.partition("+")
    prefix, at, value = head.partition("@")
    if plus and at and (prefix == CACHE_PREFIX or prefix in CACHE_NAMES):
        return prefix, value, rest
    return None


def parse_name(name: str) -> Name:
    """``tofu@0.5`` -> (tofu's entry, 0.5); ``deepcache@4+tofu-kv@0.75`` -> (deepcache+tofu-kv's entry, 0.75,
    interval 4); ``fbcache@0.2+tofu@0.5`` -> (fbcache+tofu's entry, 0.5, cache value 0.2); EvaluationError for an
    unknown method or a bad value."""
    valued = _valued_head(name)
    if valued is not None:
        return _with_value(name, *valued)
    return _plain(name, name)


def _plain(name: str, given: str) -> Name:
    """``name`` without a value of its first method; errors name ``given``, the name as written."""
    method, at, suffix = name.partition("@")
    entry = get_method(method)
    if not at:
        return Name(entry, None)
    return Name(entry, entry.parameter.parse(method, given, suffix))


def _with_value(name: str, prefix: str, value: str, rest: str) -> Name:
    """``deepcache@<N>+<variant>``: the ``deepcache+<variant>`` entry at interval N; ``<cache>@<value>+<variant>``:
    the ``<cache>+<variant>`` entry with the cache at that value, parsed and checked as the cache's own."""
    inner = _plain(f"{prefix}+{rest}", name)
    if prefix == CACHE_PREFIX:
        if "cache_interval" not in inner.method.takes:
            raise EvaluationError(f"bad method name {name!r}: {inner.method.name} takes no cache interval")
        return Name(inner.method, inner.value, get_method(CACHE_PREFIX).parameter.parse(CACHE_PREFIX, name, value))
    if CACHE_STACKS[inner.method.name][0].parameter is None:
        raise EvaluationError(
            f"bad method name {name!r}: {prefix} takes no value (it runs at diffusers' defaults); write {prefix}+{rest}"
        )
    return Name(inner.method, inner.value, cache_value=get_method(prefix).parameter.parse(prefix, name, value))


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
                names.append(check_name(str(replace(parsed, value=value)), reduction))
    return list(dict.fromkeys(names))


def method_of(name: str) -> str:
    """The registry entry a name belongs to, without parsing its value: ``tofu@0.5`` -> ``tofu``,
    ``deepcache@4+tofu-kv@0.75`` -> ``deepcache+tofu-kv``, ``fbcache@0.2+tofu@0.5`` -> ``fbcache+tofu``."""
    valued = _valued_head(name)
    if valued is not None:
        name = f"{valued[0]}+{valued[2]}"
    return name.partition("@")[0]


def split_list(text: str) -> list[str]:
    return [m.strip() for m in text.split(",") if m.strip()]


def normal_names(names: list[str], reduction: TokenFusionConfig, noun: str = "method") -> list[str]:
    """``names`` checked (:func:`check_name`) and in normal form; EvaluationError for an unknown or repeated one
    (``noun``: what the command calls them, ``method`` or ``variant``)."""
    unknown = [m for m in names if method_of(m) not in REGISTRY]
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
