"""What an entry of the registry is: :class:`Method`; the kinds of value a name can carry after ``@``
(:class:`Parameter`, a fraction; :class:`Ratio`, one that tofu_sd accepts; :class:`NoParameter`; ToDo's
:class:`~.todo.Pooling`; DeepCache's :class:`~.deepcache.CacheInterval`); :class:`StepMix`, for methods whose step
cost depends on the step; :class:`Requirement`; :class:`MethodOptions`, the run's options besides tofu_sd's."""

from __future__ import annotations

import importlib.util
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass, field, replace
from typing import Any

from tofu_sd import TokenFusionConfig

from ..errors import EvaluationError


def format_ratio(ratio: float) -> str:
    return format(ratio, "g")


DEFAULT_CACHE_INTERVAL = 3  #: DeepCache's interval: the deep blocks are computed at 1 of this many steps


@dataclass(frozen=True)
class MethodOptions:
    """The run's options that some methods take besides tofu_sd's (a :class:`tofu_sd.TokenFusionConfig`):
    ``cache_interval`` (``--cache-interval``), DeepCache's interval in the ``deepcache+<tofu>`` combinations, an
    integer >= 2; ``steps`` and ``guidance_scale``, the run's sampling options, which diffusers' MagCache (its
    ``num_inference_steps``) and FasterCache (whether the pipeline batches classifier-free guidance) need (None:
    not known, outside a run). A method names the fields it takes in :attr:`Method.takes`; its parameters record
    them."""

    cache_interval: int = DEFAULT_CACHE_INTERVAL
    steps: int | None = None
    guidance_scale: float | None = None

    def __post_init__(self) -> None:
        value = self.cache_interval
        if not isinstance(value, int) or isinstance(value, bool) or value < 2:
            raise EvaluationError(
                f"--cache-interval must be an integer >= 2 (DeepCache computes the deep blocks once every N steps and "
                f"reuses them at the others; 1 would cache nothing), got {value!r}; e.g. --cache-interval 3"
            )


class Parameter:
    """What follows ``@`` in a method's name (``oracle@0.5``), how it is checked and how ``--ratios`` sets it.

    This base class is a fraction of tokens in (0, 1) with no further check; an unsuffixed name takes the run's
    ``--ratio``.
    """

    sweeps = True  #: ``--ratios`` runs the method once per ratio (else once, unsuffixed)
    uses_run_ratio = True  #: an unsuffixed name runs at the run's ``--ratio`` (else at its own default)

    def parse(self, method: str, name: str, suffix: str) -> float:
        """The value of ``suffix`` in ``name``; EvaluationError saying what to write instead."""
        try:
            value = float(suffix)
        except ValueError:
            raise EvaluationError(f"bad method name {name!r}: write <method>@<ratio>, e.g. {method}@0.5") from None
        if not 0 < value < 1:
            raise EvaluationError(f"bad method name {name!r}: the ratio after '@' must lie in (0, 1)")
        return value

    def check(self, name: str, value: float, options: TokenFusionConfig) -> None:
        """EvaluationError if ``value`` does not fit the run's ``options``."""

    def for_sweep(self, ratio: float) -> float | None:
        """The value that the ``--ratios`` ratio ``ratio`` gives; None: the method skips that ratio."""
        return ratio


class Ratio(Parameter):
    """The fraction of tokens reduced in each patched block, valid for :class:`tofu_sd.TokenFusionConfig`."""

    def check(self, name: str, value: float, options: TokenFusionConfig) -> None:
        try:
            replace(options, ratio=value)
        except ValueError as error:
            raise EvaluationError(f"{name!r}: {error}") from error


@dataclass(frozen=True)
class NoParameter(Parameter):
    """The method takes nothing after ``@`` (``why`` says so) and runs once in a sweep."""

    why: str
    sweeps = False
    uses_run_ratio = False

    def parse(self, method: str, name: str, suffix: str) -> float:
        raise EvaluationError(f"{name!r}: {method} takes no ratio ({self.why}); write {method}")


@dataclass(frozen=True)
class StepMix:
    """How the bench times a method whose step cost depends on the step (it matches, or computes, at some steps
    and reuses at the others): the first ``len(phases)`` U-Net calls after the method is applied, one of each
    kind, are timed, and their mean over a whole schedule, ``sum(weight * seconds)``, is the method's step time.

    ``weights`` has one weight per phase (summing to 1); ``timesteps``, if given, the timestep of each phase's
    call (a method that counts steps from timesteps needs them to fall), else every call takes the bench's;
    ``summary`` is what the bench records besides each phase's seconds (``<phase>_s``); ``note(name, summary)``
    is the bench table's line about it.
    """

    phases: tuple[str, ...]
    weights: tuple[float, ...]
    summary: dict
    note: Callable[[str, dict], str]
    timesteps: tuple[int, ...] | None = None

    def __post_init__(self) -> None:
        if len(self.weights) != len(self.phases) or abs(sum(self.weights) - 1) > 1e-9:
            raise ValueError(f"a StepMix needs one weight per phase, summing to 1; got {self.weights} for {self.phases}")
        if self.timesteps is not None and len(self.timesteps) != len(self.phases):
            raise ValueError(f"a StepMix needs one timestep per phase; got {self.timesteps} for {self.phases}")


@dataclass(frozen=True)
class Requirement:
    """A package a method needs that tofu-sd does not install: its import name, its name, how to install it."""

    module: str
    package: str
    install: str

    def available(self) -> bool:
        return importlib.util.find_spec(self.module) is not None


@dataclass(frozen=True)
class Method:
    """One entry of the registry: a compared method.

    ``params(value, options)`` gives what shapes the method's images beyond the run's ``options``, from the value
    after ``@`` in its name (None when unsuffixed): the manifest records it per name (a run refuses to change it)
    and ``keys_removed``, the fraction of keys its self-attention drops (None when not fixed, or when what it saves
    is not keys, as DeepCache's skipped blocks), places it on the report's Pareto plot. A method whose parameters
    depend on :class:`MethodOptions` names those fields in ``takes``: ``params`` then gets them as keyword
    arguments (``params(value, options, cache_interval=3)``), and the patch finds them in ``params``. ``patch(pipe, options, params)`` is a context manager that patches a pipeline (or a
    bare U-Net) for its block and restores it exactly afterwards. The bench times one U-Net call of it, or the
    :class:`StepMix` that ``step_mix`` gives; ``describe(params)`` is an optional line about it in the bench's table.
    ``unet_only`` says why the method runs on U-Nets only; None: on diffusion transformers too, where its patch
    accepts the model (``tofu_sd.apply`` refuses some of its options on some transformers: ``modules`` on every
    one, ``reduce="kv"`` on a family without it), so ``generate`` and ``bench`` refuse the others there, before any work.
    ``transformer_only`` says why it runs on diffusion transformers only (diffusers' step caches), so ``generate``
    refuses it on U-Nets; ``bench_refusal`` why the bench cannot time it (a step cache's saving lies across the
    steps of a pipeline call, which a timed model call does not show).

    What the bench and the report make of it: ``step_options``, the run's tofu_sd options that set its step time
    besides its name (a report's bench cost must have timed it with the run's); ``bench_pairs``, whether the bench
    reports the paired ratios of its step time and memory to the others' at the same ratio (``"reducer"``) or the
    reducers' to its (``"baseline"``); ``bound``, the bound that the transformer bench's targets hold the
    ``targeted`` methods' step time to; ``report_note``, a sentence of the report about it.
    """

    name: str
    summary: str
    patch: Callable[[Any, TokenFusionConfig, dict], AbstractContextManager]
    params: Callable[[float | None, TokenFusionConfig], dict]
    parameter: Parameter = field(default_factory=Ratio)
    requires: Requirement | None = None
    #: ``step_mix(params, options)``: how the bench times the step of the name with ``params`` under the bench's
    #: ``options``, or None (one call is the step)
    step_mix: Callable[[dict, TokenFusionConfig], StepMix | None] | None = None
    describe: Callable[[dict], str] | None = None
    in_bench_default: bool = True  #: part of ``tofu-sd bench``'s variants when none are given
    takes: tuple[str, ...] = ()  #: the fields of :class:`MethodOptions` that ``params`` takes
    unet_only: str | None = None  #: why it runs on U-Nets only (None: on diffusion transformers too)
    #: why it runs on diffusion transformers only (None: on U-Nets too); ``generate`` refuses it on U-Nets
    transformer_only: str | None = None
    #: why ``tofu-sd bench``, which times single model calls, cannot time it (None: the bench takes it)
    bench_refusal: str | None = None
    #: its images follow tofu_sd's default schedule when the run gives no ``--schedule`` (a run records its letters)
    default_schedule: bool = False
    #: the run's :class:`tofu_sd.TokenFusionConfig` fields that set its step time besides its name, which a bench
    #: cost must share: ``max_downsample`` where it patches the U-Net levels that option chooses, ``rematch_every``
    #: where it matches again only every k steps (the :class:`MethodOptions` of ``takes`` are recorded per name)
    step_options: tuple[str, ...] = ("max_downsample",)
    #: ``"reducer"``: the bench reports its step time and memory relative to each ``"baseline"`` at the same ratio
    bench_pairs: str | None = None
    bound: bool = False  #: the transformer bench's targets measure the ``targeted`` methods' step time against it
    #: the transformer bench holds it to its targets: memory above the unpatched step's, step time against the bound's
    targeted: bool = False
    #: a sentence of the report on what the name means; the report gives every entry's together when the run has any
    report_note: str | None = None

    def __post_init__(self) -> None:
        if self.bench_pairs not in (None, "reducer", "baseline"):
            raise ValueError(f"{self.name}: bench_pairs is 'reducer', 'baseline' or None, got {self.bench_pairs!r}")

    @property
    def runs_on_transformers(self) -> bool:
        return self.unet_only is None

    @property
    def runs_on_unets(self) -> bool:
        return self.transformer_only is None

    def parameters(self, value: float | None, options: TokenFusionConfig, more: MethodOptions | None = None) -> dict:
        """``{"method": name, ...}``: the name's parameters (see the class docstring), under the run's ``options``
        and ``more`` (:class:`MethodOptions`; None: the defaults)."""
        more = MethodOptions() if more is None else more
        return {"method": self.name, **self.params(value, options, **{key: getattr(more, key) for key in self.takes})}

    def mix(self, params: dict, options: TokenFusionConfig) -> StepMix | None:
        """The :class:`StepMix` of the name with ``params`` under ``options``, or None."""
        return None if self.step_mix is None else self.step_mix(params, options)
