"""Timing one denoising step per variant: peak memory of one step, then interleaved timed rounds, and the paired
ratios between variants."""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass, field

import torch

from tofu_sd import TokenFusionConfig

from ..archs import at_timestep
from ..memory import PeakMemory
from ..methods.base import MethodOptions
from ..methods.registry import REFERENCE, REGISTRY
from .profiling import peak_alloc_bytes
from .variants import BENCH_OPTIONS, variant_applied, variant_mix, variant_params


def unet_step(model, inputs: dict):
    """One U-Net call; the latents go positionally, where tomesd's size hook looks for them."""
    rest = {k: v for k, v in inputs.items() if k != "sample"}
    return model(inputs["sample"], **rest)


def model_step(model, inputs: dict):
    """One call of a U-Net (:func:`unet_step`: its inputs have a ``sample``) or of a transformer, as its pipeline
    calls it (keyword arguments, no output dataclass)."""
    if "sample" in inputs:
        return unet_step(model, inputs)
    return model(**inputs, return_dict=False)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@dataclass
class StepTimes:
    seconds: list[float] = field(default_factory=list)
    peak_mem_bytes: int = 0
    phases: dict[str, list[float]] = field(default_factory=dict)  #: a StepMix's seconds per phase

    def summary(self) -> dict:
        return {
            "median_s": statistics.median(self.seconds),
            "min_s": min(self.seconds),
            "reps": len(self.seconds),
            "peak_mem_gb": self.peak_mem_bytes / 2**30,
            "seconds": self.seconds,
            **{f"{phase}_s": s for phase, s in self.phases.items()},
        }


def peak_step_bytes(model, fn, device: torch.device) -> tuple[int, str]:
    """Peak memory of ``fn()``: CUDA's peak allocated; on the CPU the peak of live tensors (weights included).

    On the CPU the peak comes from the profiler's allocation trace (each op's net allocation, frees in time
    order), so, unlike peak RSS, it does not depend on which variant ran before.
    """
    if device.type == "cuda":
        with PeakMemory(device).measure() as peak:
            fn()
        return peak.bytes, "cuda_peak_allocated"
    weights = sum(t.numel() * t.element_size() for t in (*model.parameters(), *model.buffers()))
    return weights + peak_alloc_bytes(fn), "peak_live_tensors"


@torch.no_grad()
def time_steps(
    model, inputs: dict, variants: list[str], ratio: float, reps: int, warmup: int, device, compile_: bool,
    options: TokenFusionConfig = BENCH_OPTIONS, more: MethodOptions | None = None,
):  # fmt: skip
    """Per variant: peak memory of one step of ``model`` (a U-Net or a transformer, on ``inputs``), then ``reps``
    timed steps in interleaved rounds.

    A variant with a :class:`~evaluation.methods.base.StepMix` (CA-ToMe, or ToFu with ``rematch_every > 1``: they
    match at some steps and reuse the matchings at the rest; DeepCache: it computes the deep blocks at some
    steps and reuses them at the rest) is timed at each phase of a fresh application in every round, each
    phase's call at its own timestep if the mix gives one, and its step time is their mean over a whole
    schedule. The warm-up and peak-memory calls all run at the bench's timestep, which ToFu's ``rematch_every`` and
    DeepCache take for a first step each time (matching, uncached). DeepCache at several intervals is timed once
    (:func:`shared_calls`). ``more``: the bench's :class:`~evaluation.methods.base.MethodOptions`.
    """
    kind = ""
    called = torch.compile(model) if compile_ else model
    times = {v: StepTimes() for v in variants}
    mixes = {v: variant_mix(v, ratio, options, more) for v in variants}
    leaders = shared_calls(variants, {v: variant_params(v, ratio, options, more) for v in variants}, mixes)
    for variant in dict.fromkeys(leaders.values()):
        with variant_applied(model, variant, ratio, options, more):
            for _ in range(warmup):
                model_step(called, inputs)
            times[variant].peak_mem_bytes, kind = peak_step_bytes(model, lambda: model_step(called, inputs), device)
    for variant, leader in leaders.items():
        times[variant].peak_mem_bytes = times[leader].peak_mem_bytes

    def timed(timestep: int | None = None) -> float:
        call_inputs = inputs if timestep is None else at_timestep(inputs, timestep)
        sync(device)
        t0 = time.perf_counter()
        model_step(called, call_inputs)
        sync(device)
        return time.perf_counter() - t0

    for _ in range(reps):
        for variant in dict.fromkeys(leaders.values()):
            with variant_applied(model, variant, ratio, options, more):
                if compile_:
                    model_step(called, inputs)  # the patch changed: let the compiler retrace outside the timing
                mix = mixes[variant]
                if mix is None:
                    times[variant].seconds.append(timed())
                    continue
                phase_seconds = [timed(step) for step in (mix.timesteps or (None,) * len(mix.phases))]
            for follower in (v for v, leader in leaders.items() if leader == variant):
                t, weights = times[follower], mixes[follower].weights
                for phase, seconds in zip(mix.phases, phase_seconds):
                    t.phases.setdefault(phase, []).append(seconds)
                t.seconds.append(sum(w * s for w, s in zip(weights, phase_seconds)))
    summaries = {v: t.summary() for v, t in times.items()}
    for variant, mix in mixes.items():
        if mix is not None:
            summaries[variant].update(mix.summary)
            summaries[variant]["step_mix"] = mix.note(variant, summaries[variant])
    return summaries, kind


def shared_calls(variants: list[str], params: dict[str, dict], mixes: dict) -> dict[str, str]:
    """Each variant and the variant whose timed calls it takes (itself, or an earlier one): DeepCache's step mixes
    that differ only in the cache interval (``deepcache@2`` and ``deepcache@5``; ``deepcache@2+tofu-kv@0.75`` and
    ``deepcache@4+tofu-kv@0.75``) time the same two calls, a fresh application's uncached and cached step, and
    differ only in the weights of those calls, so they are timed once per round and each weighs them its own way."""
    leaders, seen = {}, {}
    for v in variants:
        mix = mixes[v]
        if mix is None or mix.phases != ("uncached", "cached"):
            leaders[v] = v
            continue
        key = repr(sorted((k, repr(value)) for k, value in params[v].items() if k != "cache_interval"))
        leaders[v] = seen.setdefault(key, v)
    return leaders


def paired_ratio(a: list[float], b: list[float]) -> float:
    """Median over rounds of ``a[i] / b[i]``: both ran in the same round, so slow drifts of the machine cancel."""
    return statistics.median(x / y for x, y in zip(a, b))


def _pairs(variants: list[str], ratio: float) -> list[tuple[str, str]]:
    """(reducer variant, baseline variant) at the same ratio, in the order given: the methods' ``bench_pairs``
    (:class:`~evaluation.methods.base.Method`; tofu and tofu-local reducers, tome and the oracle baselines)."""
    params = {v: variant_params(v, ratio) for v in variants}
    role = {v: REGISTRY[p["method"]].bench_pairs for v, p in params.items()}
    return [
        (a, b) for a in variants if role[a] == "reducer"
        for b in variants if role[b] == "baseline" and params[b].get("ratio") == params[a].get("ratio")
    ]  # fmt: skip


def step_ratios(results: dict, ratio: float) -> dict:
    """Paired (per-round) median ratios to ``full`` and of tofu's variants to tome's and the oracle's at the same
    ratio (``tofu/tome``, ``tofu@0.3/tome@0.3``), the same from the minimum times as a cross-check, and the
    peak-memory ratios of those pairs."""
    secs = {v: r["seconds"] for v, r in results.items()}
    pairs = [(v, REFERENCE) for v in secs if v != REFERENCE and REFERENCE in secs]
    reducers = _pairs(list(results), ratio)
    ratios = {}
    for a, b in pairs + reducers:
        ratios[f"{a}/{b}"] = paired_ratio(secs[a], secs[b])
        ratios[f"{a}/{b} (min)"] = min(secs[a]) / min(secs[b])
    for a, b in reducers:
        ratios[f"{a}/{b} memory"] = results[a]["peak_mem_gb"] / results[b]["peak_mem_gb"]
    return ratios


def reducer_keys(results: dict, ratio: float) -> list[str]:
    """The keys of :func:`step_ratios` that compare tofu's variants with tome's and the oracle's."""
    return [f"{a}/{b}{suffix}" for a, b in _pairs(list(results), ratio) for suffix in ("", " (min)", " memory")]
