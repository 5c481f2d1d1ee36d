"""The registry: every method that ``tofu-sd generate`` and ``tofu-sd bench`` compare, one :class:`Method` entry
each, in the order the bench lists them.

Adding a method is adding one entry here: its name, a one-line summary, its patch (a context manager that
applies it and restores the model), its parameters (what the manifest records) and, where they differ from the
defaults, the kind of value after ``@`` in its names, a package it needs, how the bench times its step, and why
it runs on U-Nets only if it does (``unet_only``: ``generate`` and ``bench`` refuse it on diffusion transformers).
The names built on them (``tofu@0.5``) are :mod:`.names`.
"""

from __future__ import annotations

import contextlib

from ..errors import EvaluationError
from . import catome, deepcache, oracle, todo
from .base import Method, NoParameter, Parameter, Requirement
from .tofu import merged_params, modules_params, rematch_mix, tofu_patch, tome_patch

DEEPCACHE = Requirement("DeepCache", "DeepCache", deepcache.DEEPCACHE_INSTALL)
#: Why the methods of other packages, and this project's ToDo, run on U-Nets only (:attr:`Method.unet_only`).
TOMESD_UNET = "the tomesd package patches a U-Net's BasicTransformerBlocks"
TODO_UNET = "this project's ToDo patches the self-attention of a U-Net's BasicTransformerBlocks"
CATOME_UNET = "the ca-tome package patches a U-Net's BasicTransformerBlocks"
DEEPCACHE_UNET = "DeepCache caches the deep blocks of a U-Net between its skip connections"


@contextlib.contextmanager
def _unpatched(pipe, options, params):
    yield


def _tofu(name: str, summary: str, modules: tuple[str, ...] | None = None, **overrides) -> Method:
    """A tofu variant: ``tofu_sd.apply`` with ``overrides`` in place of the run's options and, given ``modules``
    (the ``+<module>`` variants, not in the bench's default set), those sub-modules on the reduced tokens."""
    params = merged_params if modules is None else modules_params(modules)
    return Method(name, summary, tofu_patch(**overrides), params, step_mix=rematch_mix, in_bench_default=modules is None,
                  default_schedule="schedule" not in overrides)  # fmt: skip


def _tome(name: str, summary: str, modules: tuple[str, ...]) -> Method:
    return Method(name, summary, tome_patch, modules_params(modules), in_bench_default=False, unet_only=TOMESD_UNET)


def _deepcache_around(variant: Method) -> Method:
    """``deepcache+<variant>``: the tofu variant with DeepCache enabled around it at the run's ``--cache-interval``,
    at the name's ratio (the variant's parameter)."""
    return Method(
        f"deepcache+{variant.name}", f"{variant.name} with DeepCache around it, at --cache-interval (3)",
        deepcache.around(variant.patch), deepcache.with_interval(variant.params), requires=DEEPCACHE,
        step_mix=deepcache.combined_mix, in_bench_default=False, takes=("cache_interval",), unet_only=DEEPCACHE_UNET,
        default_schedule=variant.default_schedule,
    )  # fmt: skip


TOFU = _tofu("tofu", "Token Fusion (tofu_sd.apply) with the run's options")
TOFU_KV = _tofu("tofu-kv", 'tofu keeping every query: keys and values from the reduced tokens (reduce="kv")', reduce="kv")
TOFU_FF = _tofu("tofu+ff", 'tofu with the feed-forward on the reduced tokens too (modules="attn1,ff")', ("attn1", "ff"))


ENTRIES = (
    Method("full", "the unpatched model, the reference", _unpatched, lambda value, options: {"keys_removed": 0.0},
           parameter=NoParameter("it reduces nothing")),  # fmt: skip
    Method("tome", "ToMe, the tomesd package, on the blocks that tofu patches", tome_patch, merged_params,
           unet_only=TOMESD_UNET),  # fmt: skip
    TOFU,
    _tofu("tofu-P", "tofu with pruned merging (P) in every block", schedule="P"),
    _tofu("tofu-A", "tofu with average merging (A) in every block", schedule="A"),
    _tofu("tofu-M", "tofu with MLERP merging (M) in every block", schedule="M"),
    _tofu("tofu-local", 'tofu with local matching (matching="local")', matching="local"),
    TOFU_KV,
    _tofu("tofu-kv-local", 'tofu-kv with local matching', reduce="kv", matching="local"),
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
           todo.todo_params, parameter=todo.POOLING, describe=todo.describe, unet_only=TODO_UNET),  # fmt: skip
    Method("catome", "CA-ToMe, the ca-tome package: a similarity threshold, matchings cached across steps",
           catome.catome_patch, catome.catome_params, parameter=NoParameter("its own parameter is a similarity threshold"),
           requires=Requirement("ca_tome", "ca-tome", catome.CATOME_INSTALL), step_mix=catome.step_mix,
           unet_only=CATOME_UNET),  # fmt: skip
    Method("oracle", "attention on a fixed strided subset of the image tokens, outputs copied: a bound with no matching",
           oracle.oracle_patch, oracle.oracle_params, parameter=Parameter()),  # fmt: skip
    Method("deepcache", "DeepCache, the DeepCache package: the deep blocks computed once every N steps (deepcache@N; 3)",
           deepcache.deepcache_patch, deepcache.deepcache_params, parameter=deepcache.CACHE_INTERVAL,
           requires=DEEPCACHE, step_mix=deepcache.deepcache_mix, unet_only=DEEPCACHE_UNET),  # fmt: skip
    _deepcache_around(TOFU),
    _deepcache_around(TOFU_KV),
    _deepcache_around(TOFU_FF),
)
REGISTRY: dict[str, Method] = {method.name: method for method in ENTRIES}
METHODS = tuple(REGISTRY)  #: the names of the entries, in order


def get_method(method: str) -> Method:
    """The entry named ``method`` (no ``@`` suffix); EvaluationError listing the choices otherwise."""
    try:
        return REGISTRY[method]
    except KeyError:
        raise EvaluationError(f"unknown method {method!r}; choose from {', '.join(REGISTRY)}") from None
