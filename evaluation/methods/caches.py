"""diffusers' step caches as compared methods, on diffusion transformers only, alone and stacked with Token
Fusion: ``fbcache@T`` (First Block Cache, threshold T), ``taylorseer@N`` / ``taylorseer-lite@N`` (TaylorSeer,
full and lite mode, cache interval N), ``magcache@T`` (MagCache, threshold T), ``pab@N`` (Pyramid Attention
Broadcast, spatial attention computed once every N steps) and ``fastercache@N`` (FasterCache, spatial attention
computed once every N steps, otherwise diffusers' defaults),
and the stacks ``<cache>+<variant>`` of a cache and a Token Fusion variant on the same transformer (``tofu``,
``tofu-M``, ``tofu-kv``, ``tofu-kv-local``: :data:`evaluation.methods.registry.STACKED`): ``fbcache+tofu@0.5`` runs
the cache at its default value, ``fbcache@0.2+tofu-kv@0.75`` at the value the name gives (checked as the cache's
own), each with the variant at the name's ratio.

Each cache is applied with diffusers' own API on the pipeline's transformer: ``enable_cache(config)`` where the
model has ``CacheMixin`` (Flux), else the cache's ``apply_*(model, config)`` (SD3 and PixArt in diffusers
0.42.1); it is removed with ``disable_cache()``, else ``HookRegistry.remove_hook`` of each hook it registered,
and what the registry leaves behind (empty registries, ``forward`` attributes, ``_cache_config``) is deleted, so
the model is exactly as before (:func:`cache_applied`). Meanwhile a forward pre-hook and a forward hook on the
transformer (:class:`CacheSupport`) give the caches what a ``CacheMixin`` pipeline would:

- **the current timestep**, for PAB's and FasterCache's ``current_timestep_callback``: the transformer call's
  ``timestep`` as the family scales it (0-1000; tofu_sd's ``Family.timestep``), since StableDiffusion3Pipeline
  and PixArtSigmaPipeline keep no ``_current_timestep`` in 0.42.1;
- **a cache context** around each transformer call, where the pipeline sets none (StableDiffusion3Pipeline and
  PixArtSigmaPipeline in diffusers 0.42.1 call no ``cache_context``, and First Block Cache, TaylorSeer and
  FasterCache's state managers refuse to run without one): the context ``"cond"`` on the cache's state managers
  for the call, unless the pipeline has set one (FluxPipeline's ``"cond"`` / ``"uncond"``);
- **a reset of the cache's state after each pipeline call**: a model without ``CacheMixin`` gets a
  ``_reset_stateful_cache`` attribute for the application, which the pipeline's ``maybe_free_model_hooks``
  calls at the end of every call, as it does for ``CacheMixin`` models (so no state carries over to the next
  batch's images).

SD3's last block (``context_pre_only``) returns None for the text stream, which SD3Transformer2DModel discards.
In diffusers 0.42.1 First Block Cache then fails at its tail block (``TypeError: unsupported operand type(s)
for -: 'NoneType' and 'Tensor'``: the text residual) and TaylorSeer's lite mode at its first full step
(``AttributeError: 'NoneType' object has no attribute 'dtype'``: the recorded outputs). For these two caches a
registry hook innermost on such a block (:class:`TextPassThrough`, only while the cache is applied) returns the
block's text input in place of None: the transformer never reads it, so no image changes, and the caches see a
tensor where they expect one.

MagCache needs ``num_inference_steps`` (the run's ``--steps``) and ``mag_ratios``, the magnitude ratios of a
model's successive step residuals. diffusers ships calibrated ratios for Flux only (``FLUX_MAG_RATIOS``, which
MagCacheConfig interpolates to the run's steps): Flux uses them. Any other model is calibrated with MagCache's
own calibrate mode (``MagCacheConfig(calibrate=True)``), once per ``generate`` call and step count, by one
pipeline call at the run's options on a fixed job (class 0, sample 0: the run's prompt set, seed, size,
guidance and steps), outside the timing; ``generate`` provides it (:func:`calibrating`). Outside ``generate``
such a model's first call stops with a clear error.

FasterCache (``fastercache@N``) computes the self-attentions once every N steps within timesteps (-1, 681) (N is
its spatial attention skip range; 2 unsuffixed, diffusers' default); the rest is diffusers' defaults (the
unconditional batch computed every 5th step within (-1, 641)), with ``tensor_format="BCHW"`` (images, not
video), the default attention weight 0.5 and ``is_guidance_distilled`` where the pipeline batches no
classifier-free guidance (Flux; ``--guidance-scale`` <= 1). SD3's ``pooled_projections`` is split with the
batch too. Guidance-distilled, FasterCache crashes at its first step if that step's timestep lies in its spatial
skip range (it would reuse an attention output it never stored); the first timestep (1000 on flow-matching
schedules, 999 on DDPM-type ones) lies above 681, and a schedule that starts inside stops with a clear error.

The block counts of :mod:`evaluation.block_calls` show what each cache skips: First Block Cache, MagCache and
TaylorSeer's lite mode skip whole blocks; PAB, FasterCache and TaylorSeer's full mode skip attentions (and
FasterCache the unconditional half of a batch at some steps).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from tofu_sd import TokenFusionConfig

from ..errors import EvaluationError
from ..families import transformer_and_family
from .base import Parameter, format_ratio
from .cache_hooks import CacheSupport, Setup, Traces, cache_enabled, text_passthrough
from .magcache_calibration import mag_ratios

#: Why the caches run on diffusion transformers only (:attr:`~.base.Method.transformer_only`).
TRANSFORMERS_ONLY = "diffusers' step caches hook the blocks or attentions of a diffusion transformer"
#: Why the bench refuses them (:attr:`~.base.Method.bench_refusal`).
BENCH_REFUSAL = (
    "a step cache skips work across the steps of a pipeline call, which one timed model call cannot show; compare "
    "it with tofu-sd generate (its seconds per image, and block_calls_per_image in manifest.json)"
)
#: FasterCache's weight of the approximated attention (diffusers' default when none is given).
FASTER_ATTENTION_WEIGHT = 0.5


# ---------------------------------------------------------------- the value after '@'


@dataclass(frozen=True)
class Threshold(Parameter):
    """A cache's threshold after ``@`` (``fbcache@0.05``): a number > 0; unsuffixed, diffusers' default. Not
    swept by ``--ratios`` (it is not a fraction of tokens). ``what`` says what it thresholds."""

    default: float
    what: str
    sweeps = False
    uses_run_ratio = False

    def parse(self, method: str, name: str, suffix: str) -> float:
        write = f"write {method}@<threshold>, a number > 0, e.g. {method}@{format_ratio(self.default)}"
        try:
            value = float(suffix)
        except ValueError:
            raise EvaluationError(f"bad method name {name!r}: {method}'s value after '@' is its threshold ({self.what}); {write}") from None
        if not math.isfinite(value) or value <= 0:
            raise EvaluationError(f"bad method name {name!r}: a threshold must be a number > 0 (at {suffix} it never skips anything); {write}")
        return value

    def check(self, name: str, value: float, options: TokenFusionConfig) -> None:
        if not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
            raise EvaluationError(f"{name!r}: the threshold must be a number > 0")

    def for_sweep(self, ratio: float) -> float | None:
        return None


@dataclass(frozen=True)
class Interval(Parameter):
    """A cache's interval after ``@`` (``pab@2``): an integer >= 2 (1 would compute at every step); unsuffixed,
    ``default``. Not swept by ``--ratios``. ``what`` says what it counts."""

    default: int
    what: str
    sweeps = False
    uses_run_ratio = False

    def parse(self, method: str, name: str, suffix: str) -> int:
        write = f"write {method}@<N>, an integer >= 2, e.g. {method}@{self.default}"
        try:
            value = int(suffix)
        except ValueError:
            raise EvaluationError(f"bad method name {name!r}: {method}'s value after '@' is {self.what}, not a ratio; {write}") from None
        if value < 2:
            raise EvaluationError(f"bad method name {name!r}: at {value} it would compute at every step and cache nothing ({self.what}); {write}")
        return value

    def check(self, name: str, value: float, options: TokenFusionConfig) -> None:
        if not isinstance(value, int) or isinstance(value, bool) or value < 2:
            raise EvaluationError(f"{name!r}: {self.what} must be an integer >= 2")

    def for_sweep(self, ratio: float) -> float | None:
        return None


# ---------------------------------------------------------------- the caches


@dataclass(frozen=True)
class Cache:
    """One of diffusers' caches: its name, a summary, the value after ``@`` (``parameter``; None: it takes none),
    the key its value has in the parameters, ``config(setup, value)`` its diffusers config, ``text_output``
    whether it needs SD3's last block to return its text (:class:`TextPassThrough`), ``takes`` the
    :class:`~.base.MethodOptions` it needs, and a sentence of the report on it."""

    name: str
    summary: str
    parameter: Parameter | None
    key: str | None
    config: Callable[[Setup, Any], Any]
    text_output: bool = False
    takes: tuple[str, ...] = ()
    note: str = ""

    @property
    def default(self):
        return None if self.parameter is None else self.parameter.default

    def params(self, value, options: TokenFusionConfig, **more) -> dict:
        """Its value (the name's, else the default) and the options it takes. ``keys_removed`` is None: a cache
        drops no key of an attention it runs; it skips whole blocks or attentions at some steps."""
        out = {} if self.key is None else {self.key: self.default if value is None else value}
        return {**out, **{key: more[key] for key in self.takes}, "keys_removed": None}


def _fbcache(setup: Setup, threshold: float):
    from diffusers.hooks import FirstBlockCacheConfig

    return FirstBlockCacheConfig(threshold=threshold)


def _taylorseer(lite: bool):
    def config(setup: Setup, interval: int):
        from diffusers.hooks import TaylorSeerCacheConfig

        return TaylorSeerCacheConfig(cache_interval=interval, use_lite_mode=lite)

    return config


def _pab(setup: Setup, skip_range: int):
    from diffusers.hooks import PyramidAttentionBroadcastConfig

    return PyramidAttentionBroadcastConfig(spatial_attention_block_skip_range=skip_range, current_timestep_callback=setup.clock)


def _fastercache(setup: Setup, skip_range: int):
    from diffusers.hooks import FasterCacheConfig
    from diffusers.hooks.faster_cache import _UNCOND_COND_INPUT_KWARGS_IDENTIFIERS

    distilled = setup.family.name == "Flux" or (setup.guidance_scale is not None and setup.guidance_scale <= 1)
    split = tuple(_UNCOND_COND_INPUT_KWARGS_IDENTIFIERS)
    if setup.family.name == "SD3":  # its pooled text embeddings are batched [uncond, cond] too
        split += ("pooled_projections",)
    config = FasterCacheConfig(
        spatial_attention_block_skip_range=skip_range, current_timestep_callback=setup.clock, tensor_format="BCHW",
        is_guidance_distilled=distilled,
        attention_weight_callback=lambda module: FASTER_ATTENTION_WEIGHT,
        _unconditional_conditional_input_kwargs_identifiers=list(split),
    )  # fmt: skip
    if distilled:
        setup.support.checks.append(_first_step_check(setup.support, config.spatial_attention_timestep_skip_range))
    return config


def _first_step_check(support: CacheSupport, skip_range: tuple[float, float]):
    """Guidance-distilled FasterCache would skip an attention at its first step, with nothing cached, if that
    step's timestep lies in ``skip_range``: stop first, saying why."""

    def check(time: float) -> None:
        from diffusers.hooks.faster_cache import FasterCacheBlockHook

        first = next((h for h in support.hooks if isinstance(h, FasterCacheBlockHook)), None)
        if first is not None and first.state.cache is None and skip_range[0] < time < skip_range[1]:
            raise EvaluationError(
                f"fastercache: the schedule's first timestep {time:g} lies in FasterCache's spatial attention skip "
                f"range {tuple(skip_range)}, so its first step would reuse an attention output it never stored "
                "(diffusers' FasterCache fails there); use a schedule that starts above it"
            )

    return check


def _magcache(setup: Setup, threshold: float):
    from diffusers.hooks import MagCacheConfig

    if setup.steps is None:
        raise EvaluationError("magcache needs the run's number of steps (MethodOptions(steps=...)): MagCache counts them")
    ratios = mag_ratios(setup)
    if ratios is None:  # no calibration here: the first call says so (entering and leaving alone are fine)
        setup.support.checks.append(_uncalibrated(setup.model))
        ratios = [1.0] * setup.steps
    return MagCacheConfig(threshold=threshold, num_inference_steps=setup.steps, mag_ratios=ratios)


def _uncalibrated(model: torch.nn.Module):
    def check(time: float) -> None:
        raise EvaluationError(
            f"magcache on a {type(model).__name__}: diffusers has no calibrated mag_ratios for it, and they are "
            "calibrated by a pipeline call at the run's options, which tofu-sd generate makes (outside it, wrap the "
            "calls in evaluation.methods.caches.calibrating)"
        )

    return check


CACHES = (
    Cache("fbcache", "First Block Cache (diffusers): the other blocks skipped while the first block's residual changes "
          "less than the threshold (fbcache@T; 0.05)", Threshold(0.05, "the relative change of the first block's "
          "residual under which the other blocks are skipped"), "threshold", _fbcache, text_output=True,
          note="`fbcache@T`: diffusers' First Block Cache: every block after the first is skipped (their cached "
          "residual added) while the first block's residual changes by less than T (relative)."),  # fmt: skip
    Cache("taylorseer", "TaylorSeer (diffusers), full mode: the attentions computed once every N steps and "
          "predicted by a Taylor series in between (taylorseer@N; 5)", Interval(5, "its cache interval (the "
          "attentions are computed once every N steps)"), "cache_interval", _taylorseer(False),
          note="`taylorseer@N`: diffusers' TaylorSeer: after 3 full steps, every attention is computed once every N "
          "steps and predicted (first-order Taylor series) at the others; `taylorseer-lite@N`: its lite mode, which "
          "skips whole blocks and predicts the output projection."),  # fmt: skip
    Cache("taylorseer-lite", "TaylorSeer (diffusers), lite mode: the blocks skipped and the output projection predicted "
          "at N-1 of N steps (taylorseer-lite@N; 5)", Interval(5, "its cache interval (the blocks are computed once "
          "every N steps)"), "cache_interval", _taylorseer(True), text_output=True),  # fmt: skip
    Cache("magcache", "MagCache (diffusers): steps skipped while the accumulated residual magnitude error stays under "
          "the threshold (magcache@T; 0.06)", Threshold(0.06, "the accumulated error of the residual magnitudes under "
          "which a step's blocks are skipped"), "threshold", _magcache, takes=("steps",),
          note="`magcache@T`: diffusers' MagCache: after the first 20% of the steps, a step's blocks are skipped (the "
          "last residual reused, at most 3 in a row) while the accumulated magnitude-ratio error stays under T; the "
          "ratios are diffusers' for Flux, else calibrated on one image at the run's options."),  # fmt: skip
    Cache("pab", "Pyramid Attention Broadcast (diffusers): the spatial attentions computed once every N steps within "
          "timesteps 100-800 (pab@N; 2)", Interval(2, "its spatial attention skip range (the attentions are computed "
          "once every N steps)"), "skip_range", _pab,
          note="`pab@N`: diffusers' Pyramid Attention Broadcast: within timesteps 100-800 each self-attention is "
          "computed once every N steps and its output reused at the others."),  # fmt: skip
    Cache("fastercache", "FasterCache (diffusers): the self-attentions computed once every N steps below timestep "
          "681 (extrapolated in between), the unconditional batch approximated 4 of 5 steps below 641 (fastercache@N; "
          "2, diffusers' default)", Interval(2, "its spatial attention skip range (the self-attentions are computed "
          "once every N steps below timestep 681)"), "skip_range", _fastercache, takes=("guidance_scale",),
          note="`fastercache@N`: diffusers' FasterCache, otherwise at its defaults: below timestep 681 the "
          "self-attentions are computed once every N steps (2 unsuffixed; extrapolated in between), and below 641 "
          "the unconditional half of the batch is approximated from the conditional one at 4 of 5 steps."),  # fmt: skip
)
CACHE_NAMES = tuple(cache.name for cache in CACHES)

# ---------------------------------------------------------------- applying a cache


@contextlib.contextmanager
def cache_applied(pipe, cache: Cache, value=None, steps: int | None = None, guidance_scale: float | None = None):
    """The cache ``cache`` at ``value`` (None: its default) on the transformer of ``pipe`` for the block (see the
    module docstring); afterwards the model is exactly as before. ValueError for a U-Net."""
    try:
        model, family = transformer_and_family(pipe)
    except ValueError as error:
        raise ValueError(f"{cache.name}: {TRANSFORMERS_ONLY}; {error}") from error
    value = cache.default if value is None else value
    traces = Traces(model)
    support = CacheSupport(model, family)
    try:
        setup = Setup(model, family, support.clock, steps, guidance_scale, support)
        try:
            config = cache.config(setup, value)
        except ImportError as error:
            import diffusers

            raise EvaluationError(
                f"{cache.name} needs a diffusers release that has it (diffusers {diffusers.__version__} here: {error}); "
                "pip install -U diffusers"
            ) from error
        with text_passthrough(model, family) if cache.text_output else contextlib.nullcontext():
            with cache_enabled(model, config, support):
                yield
    finally:
        support.remove()
        traces.restore()


# ---------------------------------------------------------------- the registry's view


def cache_patch(cache: Cache):
    """The patch of ``<cache>@<value>``: the cache at the parameters' value, with the run's steps and guidance
    where it takes them (the run's token-reduction options play no part)."""

    def patch(pipe, options: TokenFusionConfig, params: dict):
        value = params.get(cache.key) if cache.key is not None else None
        return cache_applied(pipe, cache, value, params.get("steps"), params.get("guidance_scale"))

    return patch


def cache_params(cache: Cache):
    def params(value, options: TokenFusionConfig, **more) -> dict:
        return cache.params(value, options, **more)

    return params


def stacked_patch(cache: Cache, tofu, tofu_first: bool = False):
    """The patch of ``<cache>[@<value>]+<variant>@r``: the cache (at the parameters' value: the name's, else its
    default) and ``tofu`` (a tofu variant's patch, at the name's ratio) on the same transformer, the cache applied
    first unless ``tofu_first``. tofu_sd keeps
    its hooks innermost, so the order does not change the images, except MagCache's calibration, which sees
    Token Fusion when it is applied first (the registry applies the cache first: it calibrates the model as
    ``magcache`` alone does)."""

    @contextlib.contextmanager
    def patch(pipe, options: TokenFusionConfig, params: dict):
        value = params.get(cache.key) if cache.key is not None else None
        applied = cache_applied(pipe, cache, value, params.get("steps"), params.get("guidance_scale"))
        first, second = (tofu(pipe, options, params), applied) if tofu_first else (applied, tofu(pipe, options, params))
        with first, second:
            yield

    return patch


def stacked_params(cache: Cache, tofu_params):
    """The parameters of ``<cache>+<variant>@r``: the variant's (``tofu_params``: ratio, keys removed) and the
    cache's value (its default: a name that gives its own sets it, :class:`~.names.Name`) and options."""

    def params(value, options: TokenFusionConfig, **more) -> dict:
        own = cache.params(None, options, **more)
        own.pop("keys_removed")
        return {**tofu_params(value, options), **own}

    return params
