"""The compared methods: ``full`` (unpatched), ``tome`` (the real tomesd package), ``tofu`` (ours) and the peers
``todo`` (token downsampling, this project's re-implementation: :mod:`evaluation.todo`) and ``catome`` (the
``ca-tome`` package, optional).

A run's methods are *names*: a method, or ``<method>@<ratio>`` for a method at one ratio of a sweep
(``tofu@0.5``). ``--ratios`` expands each reducing method into one name per ratio (:func:`expand_ratios`).
"""

from __future__ import annotations

import contextlib
from dataclasses import asdict, replace

import torch

import tofu_sd
from tofu_sd import TokenFusionConfig
from tofu_sd.blocks import transformer_block_sites, unwrap_unet

from . import todo as todo_module
from .errors import EvaluationError

METHODS = ("full", "tome", "tofu", "tofu-local", "todo", "catome")
NO_RATIO = ("full", "catome")  #: full reduces nothing; catome's own parameter is a similarity threshold
POOLED = ("todo",)  #: a ratio maps to a pooling (fraction of keys removed)

CATOME_THRESHOLD = 0.7  #: ca-tome's default cosine-similarity threshold (its ``apply_patch(r=0.7)``)
CATOME_CACHE = "CONFIG_3"  #: ca-tome's best cache schedule (its README): steps where matchings are recomputed
CATOME_BARE_STEPS = 50  #: the schedule length ca-tome's cache schedules are made for
CATOME_INSTALL = "pip install --no-deps ca-tome==0.1.3"


def format_ratio(ratio: float) -> str:
    return format(ratio, "g")


def variant_name(method: str, ratio: float | None) -> str:
    """``tofu``, or ``tofu@0.5`` for one ratio of a sweep."""
    return method if ratio is None else f"{method}@{format_ratio(ratio)}"


def split_name(name: str) -> tuple[str, float | None]:
    """``tofu@0.5`` -> ("tofu", 0.5); ``tofu`` -> ("tofu", None). EvaluationError for an unknown method or bad ratio."""
    method, at, suffix = name.partition("@")
    if method not in METHODS:
        raise EvaluationError(f"unknown method {method!r} in {name!r}; choose from {', '.join(METHODS)}")
    if not at:
        return method, None
    try:
        ratio = float(suffix)
    except ValueError:
        raise EvaluationError(f"bad method name {name!r}: write <method>@<ratio>, e.g. {method}@0.5") from None
    if not 0 < ratio < 1:
        raise EvaluationError(f"bad method name {name!r}: the ratio after '@' must lie in (0, 1)")
    return method, ratio


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


def todo_pool(name: str) -> tuple[int, int]:
    """The (height, width) pooling of a ``todo`` name: 2x2 (ToDo's default) unsuffixed, else the one whose
    fraction of keys removed is the name's ratio."""
    method, ratio = split_name(name)
    if method != "todo":
        raise ValueError(f"{name!r} is not a todo name")
    if ratio is None:
        return todo_module.DEFAULT_POOL
    for pool in todo_module.SWEEP_POOLS:
        if abs(todo_module.keys_removed(pool) - ratio) < 1e-9:
            return pool
    choices = ", ".join(f"todo@{format_ratio(todo_module.keys_removed(p))} ({p[0]}x{p[1]})" for p in todo_module.SWEEP_POOLS)
    raise EvaluationError(
        f"{name!r}: ToDo's ratio is the fraction of keys its pooling removes; use one of {choices}. "
        "With --ratios, each ratio is mapped to the nearest of them."
    )


def check_name(name: str, reduction: TokenFusionConfig) -> str:
    """Validate one method name against the reduction options; returns it in normal form (``tofu@.50`` -> ``tofu@0.5``)."""
    method, ratio = split_name(name)
    if ratio is None:
        return method
    if method in NO_RATIO:
        why = "it reduces nothing" if method == "full" else "its own parameter is a similarity threshold"
        raise EvaluationError(f"{name!r}: {method} takes no ratio ({why}); write {method}")
    if method in POOLED:
        todo_pool(name)
    else:
        try:
            replace(reduction, ratio=ratio)
        except ValueError as error:
            raise EvaluationError(f"{name!r}: {error}") from error
    return variant_name(method, ratio)


def expand_ratios(methods: list[str], ratios: list[float] | None, reduction: TokenFusionConfig) -> list[str]:
    """The run's names: each unsuffixed reducing method once per ratio (``tofu@0.3``, ...), others as given.

    ``todo`` runs at the pooling nearest each ratio, named by the fraction of keys it removes (``todo@0.75``),
    once per distinct pooling; ratios nearer to no pooling at all (under 0.25) skip it. ``full`` and ``catome``
    (whose parameter is a threshold) run once.
    """
    names: list[str] = []
    for name in methods:
        method, ratio = split_name(name)
        if ratios is None or ratio is not None or method in NO_RATIO:
            names.append(check_name(name, reduction))
            continue
        for r in ratios:
            if method in POOLED:
                pool = todo_module.pool_for_ratio(r)
                if pool is None:
                    continue
                r = todo_module.keys_removed(pool)
            names.append(check_name(variant_name(method, r), reduction))
    return list(dict.fromkeys(names))


def parse_methods(text: str, ratios: list[float] | None = None, reduction: TokenFusionConfig | None = None) -> list[str]:
    """``--methods`` (and ``--ratios``) -> the run's method names, validated against ``reduction``."""
    reduction = reduction or TokenFusionConfig()
    methods = [m.strip() for m in text.split(",") if m.strip()]
    unknown = [m for m in methods if m.partition("@")[0] not in METHODS]
    if unknown or not methods:
        raise EvaluationError(f"unknown method(s) {', '.join(unknown) or '(none given)'}; choose from {', '.join(METHODS)}")
    normal = [check_name(m, reduction) for m in methods]
    if len(set(normal)) != len(normal):
        raise EvaluationError(f"--methods lists a method twice: {text}")
    names = expand_ratios(normal, ratios, reduction)
    if not names:
        raise EvaluationError(f"--methods {text} with --ratios leaves no method to run")
    return names


def method_params(name: str, options: TokenFusionConfig) -> dict:
    """What shapes a name's images beyond the run's options, and the fraction of tokens its attention drops:
    recorded per method in the manifest (a run refuses to change it) and used by the report's Pareto plot."""
    method, ratio = split_name(name)
    params: dict = {"method": method}
    if method == "full":
        params["keys_removed"] = 0.0
    elif method == "todo":
        pool = todo_pool(name)
        params.update(ratio=todo_module.keys_removed(pool), pool=list(pool), keys_removed=todo_module.keys_removed(pool))
    elif method == "catome":
        params.update(threshold=CATOME_THRESHOLD, cache=CATOME_CACHE, keys_removed=None)  # adaptive: not fixed
    else:
        r = options.ratio if ratio is None else ratio
        params.update(ratio=r, keys_removed=r)  # tokens (queries and keys) merged away before self-attention
    return params


def tome_max_downsample(pipe, options: TokenFusionConfig) -> int:
    """tomesd counts downsampling from the U-Net input, tofu_sd from its finest transformer level: patch the same blocks."""
    finest = min(site.downsample for site in transformer_block_sites(unwrap_unet(pipe)))
    return options.max_downsample * finest


@contextlib.contextmanager
def method_applied(pipe, method: str, options: TokenFusionConfig):
    """Patch ``pipe`` (a pipeline, or a bare U-Net) for ``method`` for the duration of the block, and restore it
    afterwards.

    ``method`` is a name, ``tofu`` or ``tofu@0.3``: the ratio after ``@`` replaces ``options.ratio``. ``tome``
    takes ``ratio``, ``max_downsample``, ``sx``, ``sy`` and ``use_rand`` from ``options`` (ToMe has no schedule
    and no seed); ``tofu`` takes all of them. ``todo`` takes ``max_downsample`` and its pooling from the name
    (2x2 without a ratio). ``catome`` takes ``max_downsample``, ``sx``, ``sy`` and ``use_rand``, with ca-tome's
    default threshold and cache schedule.
    """
    method, ratio = split_name(method)
    if ratio is not None and method not in NO_RATIO and method not in POOLED:
        options = replace(options, ratio=ratio)
    if method == "full":
        yield
    elif method in ("tofu", "tofu-local"):
        kwargs = asdict(options)
        if method == "tofu-local":
            kwargs["matching"] = "local"
        tofu_sd.apply(pipe, **kwargs)
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
    elif method == "todo":
        todo_module.apply_todo(pipe, todo_pool(variant_name(method, ratio)), options.max_downsample)
        try:
            yield
        finally:
            todo_module.remove_todo(pipe)
    elif method == "catome":
        with catome_applied(pipe, options):
            yield
    else:
        raise EvaluationError(f"unknown method {method!r}; choose from {', '.join(METHODS)}")


@contextlib.contextmanager
def catome_applied(pipe, options: TokenFusionConfig, threshold: float = CATOME_THRESHOLD):
    """CA-ToMe through the ``ca-tome`` package's block patch (``ca_tome.patch.apply_patch``).

    The package's ``apply_CA_ToMe`` also replaces the U-Net's ``forward`` and adds ``pipe.call``, copies of an
    older diffusers' code whose only change is an ``inference_step`` argument that reaches the blocks (and it
    does not undo them, so a plain ``pipe()`` fails afterwards). Here a forward pre-hook on the U-Net gives the
    blocks that step instead, numbered as the package's pipeline numbers it (1 for the first step), and
    drops the cached matchings at the first step of each pipeline call, which the package would carry over from
    the previous images. Without a scheduler (a bare U-Net) every U-Net call counts as the next step of a
    :data:`CATOME_BARE_STEPS`-step schedule, over and over.
    """
    try:
        from ca_tome import CacheConf
        from ca_tome.patch import apply_patch, remove_patch
    except ImportError as error:
        raise EvaluationError(
            f"method catome needs the ca-tome package ({error}). Install it with `{CATOME_INSTALL}`: its metadata "
            "pins torch<2.2.2 and numpy<2, which would replace this environment's torch (diffusers 0.42 needs "
            "torch>=2.6), while its code runs on them (README: CA-ToMe)"
        ) from error
    unet = unwrap_unet(pipe)
    scheduler = getattr(pipe, "scheduler", None)
    before = {id(m): set(m.__dict__) for m in unet.modules()}
    compute_on = list(getattr(CacheConf, CATOME_CACHE))
    blocks = []
    counter = {"calls": 0}

    def set_step(module, args, kwargs):
        timestep = kwargs["timestep"] if "timestep" in kwargs else args[1]
        timesteps = getattr(scheduler, "timesteps", None)
        # The first step of a pipeline call runs at the schedule's first timestep (some schedules, PNDM's, repeat
        # later timesteps, so the step is counted rather than looked up).
        if timesteps is not None and len(timesteps) and float(torch.as_tensor(timestep).flatten()[0]) == float(timesteps[0]):
            counter["calls"] = 0
        elif timesteps is None and counter["calls"] == CATOME_BARE_STEPS:  # a bare U-Net: cycle through a schedule
            counter["calls"] = 0
        counter["calls"] += 1
        for block in blocks:
            block.inference_step = counter["calls"]
            if counter["calls"] == 1:
                block._cache_info["merge"] = block._cache_info["unmerge"] = None
        return None

    apply_patch(
        unet, compute_on, r=threshold, max_downsample=tome_max_downsample(unet, options),
        sx=options.sx, sy=options.sy, use_rand=options.use_rand,
    )  # fmt: skip
    blocks.extend(m for m in unet.modules() if "_cache_info" in m.__dict__)
    handle = unet.register_forward_pre_hook(set_step, with_kwargs=True)
    try:
        yield
    finally:
        handle.remove()
        remove_patch(unet)
        for module in unet.modules():  # the attributes the patch added (remove_patch leaves them)
            for attr in set(module.__dict__) - before.get(id(module), set()):
                if attr in ("_cache_info", "_ca_tome_info", "inference_step", "use_ada_layer_norm", "use_ada_layer_norm_zero"):
                    del module.__dict__[attr]
