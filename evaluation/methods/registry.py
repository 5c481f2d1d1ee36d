"""The registry: every method that ``tofu-sd generate`` and ``tofu-sd bench`` compare, one :class:`Method` entry
each, in the order the bench lists them.

Adding a method is adding one entry here: its name, a one-line summary, its patch (a context manager that
applies it and restores the model), its parameters (what the manifest records) and, where they differ from the
defaults, the kind of value after ``@`` in its names, a package it needs, how the bench times its step, why
it runs on U-Nets only if it does (``unet_only``: ``generate`` and ``bench`` refuse it on diffusion transformers),
why it runs on diffusion transformers only if it does (``transformer_only``: ``generate`` refuses it on U-Nets),
why the bench cannot time it if it cannot (``bench_refusal``),
the options that set its step time, its part in the bench's comparisons and a note in the report
(:class:`~.base.Method`). The names built on them (``tofu@0.5``) are :mod:`.names`.
"""

from __future__ import annotations

import contextlib

from ..errors import EvaluationError
from . import caches, catome, deepcache, oracle, todo
from .base import Method, NoParameter, Parameter, Requirement, format_ratio
from .tofu import merged_params, modules_params, rematch_mix, tofu_patch, tome_patch

REFERENCE = "full"  #: the unpatched model's entry, which the bench and the report measure every method against
DEEPCACHE = Requirement("DeepCache", "DeepCache", deepcache.DEEPCACHE_INSTALL)
#: Why the methods of other packages, and this project's ToDo, run on U-Nets only (:attr:`Method.unet_only`).
TOMESD_UNET = "the tomesd package patches a U-Net's BasicTransformerBlocks"
TODO_UNET = "this project's ToDo patches the self-attention of a U-Net's BasicTransformerBlocks"
CATOME_UNET = "the ca-tome package patches a U-Net's BasicTransformerBlocks"
DEEPCACHE_UNET = "DeepCache caches the deep blocks of a U-Net between its skip connections"
#: The tofu_sd options that set a tofu variant's step time (:attr:`Method.step_options`): it rematches every k steps.
REMATCHING = ("rematch_every", "max_downsample")


@contextlib.contextmanager
def _unpatched(pipe, options, params):
    yield


def _tofu(name: str, summary: str, modules: tuple[str, ...] | None = None, bench_pairs: str | None = None,
          **overrides) -> Method:  # fmt: skip
    """A tofu variant: ``tofu_sd.apply`` with ``overrides`` in place of the run's options and, given ``modules``
    (the ``+<module>`` variants, not in the bench's default set), those sub-modules on the reduced tokens. The
    transformer bench holds every one to its targets."""
    params = merged_params if modules is None else modules_params(modules)
    return Method(name, summary, tofu_patch(**overrides), params, step_mix=rematch_mix, in_bench_default=modules is None,
                  default_schedule="schedule" not in overrides, step_options=REMATCHING, bench_pairs=bench_pairs,
                  targeted=True)  # fmt: skip


def _tome(name: str, summary: str, modules: tuple[str, ...]) -> Method:
    return Method(name, summary, tome_patch, modules_params(modules), in_bench_default=False, unet_only=TOMESD_UNET)


def _deepcache_around(variant: Method) -> Method:
    """``deepcache+<variant>``: the tofu variant with DeepCache enabled around it at the run's ``--cache-interval``,
    at the name's ratio (the variant's parameter)."""
    return Method(
        f"deepcache+{variant.name}", f"{variant.name} with DeepCache around it, at --cache-interval (3)",
        deepcache.around(variant.patch), deepcache.with_interval(variant.params), requires=DEEPCACHE,
        step_mix=deepcache.combined_mix, in_bench_default=False, takes=("cache_interval",), unet_only=DEEPCACHE_UNET,
        default_schedule=variant.default_schedule, step_options=variant.step_options,
    )  # fmt: skip


def _cache(cache: caches.Cache) -> Method:
    """``<cache>@<value>``: one of diffusers' step caches (:mod:`.caches`), on diffusion transformers only."""
    return Method(
        cache.name, cache.summary, caches.cache_patch(cache), caches.cache_params(cache),
        parameter=cache.parameter or NoParameter("it runs at diffusers' defaults"), takes=cache.takes,
        transformer_only=caches.TRANSFORMERS_ONLY, bench_refusal=caches.BENCH_REFUSAL, in_bench_default=False,
        step_options=(), report_note=cache.note or None,
    )  # fmt: skip


def _cache_and(cache: caches.Cache, variant: Method) -> Method:
    """``<cache>+<variant>``: the cache at its default value (``<cache>@<value>+<variant>``: at that value,
    :mod:`.names`) and the tofu variant at the name's ratio, on the same transformer (the cache applied first;
    tofu_sd makes the order irrelevant to the images)."""
    value = "" if cache.parameter is None else f"@{format_ratio(cache.default)}"
    given = "" if cache.parameter is None else f" (or {cache.name}@<value>+{variant.name})"
    return Method(
        f"{cache.name}+{variant.name}", f"{variant.name} with {cache.name}{value}{given} on the same transformer",
        caches.stacked_patch(cache, variant.patch), caches.stacked_params(cache, variant.params), takes=cache.takes,
        transformer_only=caches.TRANSFORMERS_ONLY, bench_refusal=caches.BENCH_REFUSAL, in_bench_default=False,
        default_schedule=variant.default_schedule, step_options=variant.step_options,
    )  # fmt: skip


TOFU = _tofu("tofu", "Token Fusion (tofu_sd.apply) with the run's options", bench_pairs="reducer")
TOFU_KV = _tofu("tofu-kv", 'tofu keeping every query: keys and values from the reduced tokens (reduce="kv")', reduce="kv")
TOFU_KV_LOCAL = _tofu("tofu-kv-local", "tofu-kv with local matching", reduce="kv", matching="local")
TOFU_M = _tofu("tofu-M", "tofu with MLERP merging (M) in every block", schedule="M")
TOFU_FF = _tofu("tofu+ff", 'tofu with the feed-forward on the reduced tokens too (modules="attn1,ff")', ("attn1", "ff"))

#: The tofu variants that stack with each of diffusers' step caches (``<cache>+<variant>``): those that run on
#: diffusion transformers, which is where the caches run, with the default and MLERP schedules and both reductions.
STACKED = (TOFU, TOFU_M, TOFU_KV, TOFU_KV_LOCAL)


ENTRIES = (
    Method(REFERENCE, "the unpatched model, the reference", _unpatched, lambda value, options: {"keys_removed": 0.0},
           parameter=NoParameter("it reduces nothing"), step_options=()),  # fmt: skip
    Method("tome", "ToMe, the tomesd package, on the blocks that tofu patches", tome_patch, merged_params,
           unet_only=TOMESD_UNET, bench_pairs="baseline"),  # fmt: skip
    TOFU,
    _tofu("tofu-P", "tofu with pruned merging (P) in every block", schedule="P"),
    _tofu("tofu-A", "tofu with average merging (A) in every block", schedule="A"),
    TOFU_M,
    _tofu("tofu-local", 'tofu with local matching (matching="local")', bench_pairs="reducer", matching="local"),
    TOFU_KV,
    TOFU_KV_LOCAL,
    TOFU_FF,
    _tofu("tofu+attn2", 'tofu with cross-attention on the reduced tokens too (modules="attn1,attn2")', ("attn1", "attn2")),
    _tofu("tofu+attn2+ff", "tofu with cross-attention and the feed-forward on the reduced tokens too",
          ("attn1", "attn2", "ff")),  # fmt: skip
    _tofu("tofu-kv+ff", 'tofu-kv with the feed-forward on the reduced tokens (reduce="kv", modules="attn1,ff")',
          ("attn1", "ff"), reduce="kv"),  # fmt: skip
    _tome("tome+mlp", "tome merging before the feed-forward too (tomesd's merge_mlp)", ("attn1", "ff")),
    _tome("tome+ca+mlp", "tome merging before cross-attention and the feed-forward too (merge_crossattn, merge_mlp)",
          ("attn1", "attn2", "ff")),  # fmt: skip
    Method("todo", "ToDo, keys and values pooled (this project's re-implementation)", todo.todo_patch,
           todo.todo_params, parameter=todo.POOLING, describe=todo.describe, unet_only=TODO_UNET,
           report_note="`todo`: ToDo (this project's re-implementation): self-attention takes keys and values from an "
           "average-pooled token grid, every query stays; its ratio is the fraction of keys removed (`todo`: 2x2 "
           "pooling, 0.75)."),  # fmt: skip
    Method("catome", "CA-ToMe, the ca-tome package: a similarity threshold, matchings cached across steps",
           catome.catome_patch, catome.catome_params, parameter=NoParameter("its own parameter is a similarity threshold"),
           requires=Requirement("ca_tome", "ca-tome", catome.CATOME_INSTALL), step_mix=catome.step_mix,
           unet_only=CATOME_UNET, report_note="`catome`: the ca-tome package (adaptive merging above a similarity "
           "threshold, matchings cached across steps)."),  # fmt: skip
    Method("oracle", "attention on a fixed strided subset of the image tokens, outputs copied: a bound with no matching",
           oracle.oracle_patch, oracle.oracle_params, parameter=Parameter(), bench_pairs="baseline", bound=True),  # fmt: skip
    Method("deepcache", "DeepCache, the DeepCache package: the deep blocks computed once every N steps (deepcache@N; 3)",
           deepcache.deepcache_patch, deepcache.deepcache_params, parameter=deepcache.CACHE_INTERVAL,
           requires=DEEPCACHE, step_mix=deepcache.deepcache_mix, unet_only=DEEPCACHE_UNET, step_options=()),  # fmt: skip
    _deepcache_around(TOFU),
    _deepcache_around(TOFU_KV),
    _deepcache_around(TOFU_KV_LOCAL),
    _deepcache_around(TOFU_FF),
    *(_cache(cache) for cache in caches.CACHES),
    *(_cache_and(cache, variant) for variant in STACKED for cache in caches.CACHES),
)
REGISTRY: dict[str, Method] = {method.name: method for method in ENTRIES}
METHODS = tuple(REGISTRY)  #: the names of the entries, in order
#: Each stack's entry name (``fbcache+tofu-kv``) -> its cache and its tofu variant.
CACHE_STACKS: dict[str, tuple[caches.Cache, Method]] = {
    f"{cache.name}+{variant.name}": (cache, variant) for variant in STACKED for cache in caches.CACHES
}


def get_method(method: str) -> Method:
    """The entry named ``method`` (no ``@`` suffix); EvaluationError listing the choices otherwise."""
    try:
        return REGISTRY[method]
    except KeyError:
        raise EvaluationError(f"unknown method {method!r}; choose from {', '.join(REGISTRY)}") from None
