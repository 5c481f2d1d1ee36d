"""DeepCache (Ma et al. 2024, "DeepCache: Accelerating Diffusion Models for Free") as a compared method, through
the ``DeepCache`` package's ``DeepCacheSDHelper``, alone (``deepcache@N``) and around Token Fusion
(``deepcache+tofu``, ``deepcache+tofu-kv``, ``deepcache+tofu+ff``).

DeepCache computes the whole U-Net once every ``N`` steps (the cache interval) and, at the other steps, only its
shallow branch (with ``cache_branch_id=0``: the first down block's input and the last up block's last layer),
reusing the deep blocks' outputs cached at the last full step. Its helper wraps modules by assigning
``module.forward`` (the U-Net, its down / mid / up blocks and their transformers, resnets and samplers) and reads
the step from the U-Net's positional timestep (``args[1]``) looked up in ``pipe.scheduler.timesteps``.

Here (:func:`deepcache_applied`):

- a U-Net forward pre-hook passes the timestep positionally (a bare U-Net may be called with ``timestep=``);
- a bare U-Net (the bench's) has no scheduler: it gets one whose ``timesteps`` are what its calls reveal, read as
  a pipeline's (a call at a higher timestep than the last one starts a new schedule, a lower one is the next
  step, the same one another call of the step), so any falling sequence of calls is a schedule;
- afterwards every module's instance ``forward`` attribute is put back as it was (the helper's ``disable`` leaves
  bound methods as instance attributes where there were none), and the pre-hook is removed: the model is exactly
  as before.

With Token Fusion, DeepCache is enabled around it: tofu_sd is applied first and DeepCache enabled on the patched
U-Net; DeepCache is disabled first and tofu_sd removed last (the tofu_sd plugin stacks with DeepCache in both
orders; this one nests them, so each is undone in the state it was applied to). At a cached step the deep
blocks, patched or not, do not run; the shallow branch's patched block (SD 1.5: ``up_blocks.3.attentions.2``)
still reduces its tokens.

The bench times a DeepCache step as a :class:`~.base.StepMix`: a fresh application's first call (uncached, at
timestep 500) and its second (cached, at 480), weighed 1/N and (N-1)/N; with ToFu's ``rematch_every=k > 1`` a
whole period of ``lcm(N, k)`` steps, call by call (:func:`deepcache_mix`).
"""

from __future__ import annotations

import contextlib
import math
import statistics

import torch

from tofu_sd import TokenFusionConfig

from ..families import unet_of

from ..errors import EvaluationError
from .base import DEFAULT_CACHE_INTERVAL, Parameter, StepMix

DEEPCACHE_INSTALL = "pip install 'DeepCache>=0.1.1' (part of tofu-sd[eval])"
CACHE_BRANCH = 0  #: DeepCache's ``cache_branch_id``: the shallowest branch, its fastest setting (and its default)
#: The timesteps of the bench's calls of a schedule: falling from the first by this step.
BENCH_TIMESTEP, BENCH_TIMESTEP_STRIDE = 500, 20
MAX_BENCH_PERIOD = 12  #: the most calls the bench times per round for DeepCache with ToFu's ``rematch_every``


class CacheInterval(Parameter):
    """DeepCache's cache interval N after ``@`` (``deepcache@3``): an integer >= 2; unsuffixed, 3. Not swept by
    ``--ratios`` (it is not a fraction of tokens)."""

    sweeps = False
    uses_run_ratio = False

    def parse(self, method: str, name: str, suffix: str) -> int:
        write = f"write {method}@<interval>, an integer >= 2, e.g. {method}@{DEFAULT_CACHE_INTERVAL}"
        try:
            value = int(suffix)
        except ValueError:
            raise EvaluationError(
                f"bad method name {name!r}: {method}'s value after '@' is its cache interval (the deep blocks are "
                f"computed once every N steps), not a ratio; {write}"
            ) from None
        if value < 2:
            raise EvaluationError(
                f"bad method name {name!r}: a cache interval of {value} caches nothing (the deep blocks would run at "
                f"every step); {write}"
            )
        return value

    def check(self, name: str, value: float, options: TokenFusionConfig) -> None:
        if not isinstance(value, int) or value < 2:
            raise EvaluationError(f"{name!r}: the cache interval must be an integer >= 2")

    def for_sweep(self, ratio: float) -> float | None:
        return None


CACHE_INTERVAL = CacheInterval()


def deepcache_params(value: int | None, options: TokenFusionConfig) -> dict:
    """The interval (the name's, else 3). ``keys_removed`` is None: DeepCache drops no key of any attention it
    runs, it skips whole blocks at N-1 of N steps, which no fraction of keys expresses; 0 would place it with
    ``full`` (nothing saved), and its place on the Pareto plot is its cost (the x axis) alone."""
    return {"cache_interval": DEFAULT_CACHE_INTERVAL if value is None else int(value), "keys_removed": None}


# ---------------------------------------------------------------- the patch


class _RevealedSchedule:
    """The scheduler of a bare U-Net: ``timesteps`` are those its calls revealed, read as a pipeline's."""

    def __init__(self) -> None:
        self.timesteps: list[float] = []

    def see(self, value: float) -> None:
        if not self.timesteps or value > self.timesteps[-1]:  # a new schedule (a new pipeline call)
            self.timesteps = [value]
        elif value < self.timesteps[-1]:  # the next step
            self.timesteps.append(value)
        # the same timestep: another call of the same step


class _Host:
    """What ``DeepCacheSDHelper`` needs of a pipeline: ``unet`` and ``scheduler`` (the pipeline's, read when a
    U-Net call asks, else a :class:`_RevealedSchedule`)."""

    def __init__(self, pipe, unet: torch.nn.Module) -> None:
        self.unet = unet
        self._pipe = pipe
        self.revealed = None if getattr(pipe, "scheduler", None) is not None else _RevealedSchedule()

    @property
    def scheduler(self):
        return self.revealed if self.revealed is not None else self._pipe.scheduler


def _positional_timestep(host: _Host):
    """The U-Net forward pre-hook: the timestep goes positionally (DeepCache reads ``args[1]``), as one 0-d tensor
    (it calls ``.item()``); a bare U-Net's schedule sees it."""

    def hook(module, args, kwargs):
        if len(args) >= 2:
            timestep = args[1]
        elif "timestep" in kwargs:
            kwargs = dict(kwargs)
            timestep = kwargs.pop("timestep")
            if not args:
                args = (kwargs.pop("sample"),)
        else:
            return None
        if not torch.is_tensor(timestep):
            timestep = torch.tensor(timestep)
        if timestep.numel() != 1:
            first = timestep.flatten()[0]
            if not bool((timestep == first).all()):
                raise EvaluationError(f"deepcache: a U-Net call needs one timestep for its whole batch, got {timestep.tolist()}")
            timestep = first
        if host.revealed is not None:
            host.revealed.see(float(timestep))
        return (args[0], timestep, *args[2:]), kwargs

    return hook


@contextlib.contextmanager
def deepcache_applied(pipe, cache_interval: int = DEFAULT_CACHE_INTERVAL, cache_branch_id: int = CACHE_BRANCH):
    """DeepCache on ``pipe`` (a pipeline, or a bare U-Net) for the block (see the module docstring), through
    ``DeepCacheSDHelper``: ``set_params(cache_interval, cache_branch_id)``, ``enable()``; afterwards ``disable()``
    and every module as before."""
    try:
        from DeepCache import DeepCacheSDHelper
    except ImportError as error:
        raise EvaluationError(f"method deepcache needs the DeepCache package ({error}); install it: {DEEPCACHE_INSTALL}") from error
    unet = unet_of(pipe)
    if getattr(unet, "mid_block", None) is None:
        raise EvaluationError(f"deepcache needs a U-Net with a mid block (DeepCache caches it); {type(unet).__name__} has none")
    modules = list(unet.modules())
    missing = object()
    forwards = [module.__dict__.get("forward", missing) for module in modules]
    host = _Host(pipe, unet)
    helper = DeepCacheSDHelper(pipe=host)
    helper.set_params(cache_interval=cache_interval, cache_branch_id=cache_branch_id)
    handle = unet.register_forward_pre_hook(_positional_timestep(host), with_kwargs=True)
    enabled = False
    try:
        helper.enable()
        enabled = True
        yield helper
    finally:
        handle.remove()
        if enabled:
            helper.disable()
        helper.reset_states()  # its cached outputs
        for module, forward in zip(modules, forwards):  # disable() leaves bound methods where there were none
            if forward is missing:
                module.__dict__.pop("forward", None)
            else:
                module.__dict__["forward"] = forward


def deepcache_patch(pipe, options: TokenFusionConfig, params: dict):
    """``deepcache@N``: DeepCache alone at the name's interval (the run's token-reduction options play no part)."""
    return deepcache_applied(pipe, params["cache_interval"])


def around(inner):
    """The patch of DeepCache (at the parameters' ``cache_interval``) enabled around the patch ``inner`` (a tofu
    variant's): ``inner`` first, then DeepCache; undone in the reverse order."""

    @contextlib.contextmanager
    def patch(pipe, options: TokenFusionConfig, params: dict):
        with inner(pipe, options, params), deepcache_applied(pipe, params["cache_interval"]):
            yield

    return patch


def with_interval(inner_params):
    """The parameters of ``deepcache+<variant>``: the variant's (``inner_params``), and the run's cache interval."""

    def params(value: float | None, options: TokenFusionConfig, cache_interval: int = DEFAULT_CACHE_INTERVAL) -> dict:
        return {**inner_params(value, options), "cache_interval": cache_interval}

    return params


# ---------------------------------------------------------------- its step time in the bench


def bench_timesteps(count: int) -> tuple[int, ...]:
    """The timesteps of the bench's first ``count`` calls of a schedule: 500, 480, ..."""
    return tuple(BENCH_TIMESTEP - BENCH_TIMESTEP_STRIDE * step for step in range(count))


def _median(summary: dict, phase: str) -> str:
    return f"{statistics.median(summary[f'{phase}_s']):.4f} s"


def _two_phases(n: int) -> StepMix:
    return StepMix(
        phases=("uncached", "cached"), weights=(1 / n, 1 - 1 / n), summary={"cache_interval": n},
        note=lambda name, s: (
            f"DeepCache interval {n}: per-step mean of 1 uncached step (median {_median(s, 'uncached')}) and "
            f"{n - 1} cached (median {_median(s, 'cached')})"
        ),
        timesteps=bench_timesteps(2),
    )  # fmt: skip


def deepcache_mix(params: dict, options: TokenFusionConfig) -> StepMix:
    """``deepcache@N`` (and ``deepcache+<tofu>`` with ``rematch_every=1``): a fresh application's first call computes
    every block (uncached), its second, at the next timestep, only the shallow branch (cached); weighed 1/N and
    (N-1)/N, a whole schedule's mean."""
    return _two_phases(params["cache_interval"])


def combined_mix(params: dict, options: TokenFusionConfig) -> StepMix:
    """``deepcache+<tofu>``: as :func:`deepcache_mix` with ToFu matching at every step (``rematch_every=1``).

    With ``rematch_every=k > 1`` a step's cost depends on both whether it is cached (DeepCache, step % N) and
    whether ToFu matches (step % k), and on what was stored before it (a deep block that a cached matching step
    skipped matches anew at the next full step), so the bench times a fresh application's first ``lcm(N, k)``
    calls at falling timesteps, a whole period of both schedules, each weighed equally. EvaluationError when that
    period is over :data:`MAX_BENCH_PERIOD` steps.
    """
    n, k = params["cache_interval"], options.rematch_every
    if k == 1:
        return _two_phases(n)
    period = math.lcm(n, k)
    if period > MAX_BENCH_PERIOD:
        raise EvaluationError(
            f"{params['method']} with --cache-interval {n} and --rematch-every {k}: the bench would time a whole "
            f"period of lcm({n}, {k}) = {period} steps per round (at most {MAX_BENCH_PERIOD}); give a rematch "
            f"interval that divides {n} or that {n} divides (e.g. --rematch-every {n}), or --rematch-every 1"
        )
    kinds = [("uncached" if s % n == 0 else "cached") + ("+match" if s % k == 0 else "+reuse") for s in range(period)]
    phases = tuple(f"step{s}_{kind}" for s, kind in enumerate(kinds))

    def note(name: str, s: dict) -> str:
        calls = ", ".join(f"{kind} {_median(s, phase)}" for kind, phase in zip(kinds, phases))
        return (
            f"DeepCache interval {n} with rematch_every={k}: per-step mean of a whole period of {period} steps, "
            f"timed call by call (medians: {calls})"
        )

    return StepMix(
        phases=phases, weights=(1 / period,) * period,
        summary={"cache_interval": n, "rematch_every": k, "period": period}, note=note,
        timesteps=bench_timesteps(period),
    )  # fmt: skip
