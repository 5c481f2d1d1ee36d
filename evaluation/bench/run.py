"""``tofu-sd bench``: builds the model (a U-Net or a diffusion transformer) and runs each measurement (:func:`run_bench`)."""

from __future__ import annotations

import platform
from datetime import datetime, timezone

import torch

from ..archs import DIT_ARCHS
from ..methods.base import DEFAULT_CACHE_INTERVAL, MethodOptions
from ..models import resolve_device, resolve_dtype
from .archs import (
    build_model, check_fits, check_sizes, default_batch, inputs_of, is_transformer, resolve_arch,
    token_channels, transformer_variants_checked,
)  # fmt: skip
from .machinery import block_overhead
from .steps import step_ratios, time_steps
from .targets import TARGETS, dit_targets
from .tiny_calls import call_memory, ops_per_block
from .variants import bench_options, default_variants, parse_variants


def machine() -> str:
    if torch.cuda.is_available():
        return torch.cuda.get_device_name()
    return f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} torch threads"


def run_bench(
    arch: str = "sd15", latents: tuple[int, ...] = (64, 128), variants: tuple[str, ...] | None = None, ratio: float = 0.5,
    reps: int = 5, warmup: int = 1, batch: int | None = None, device: str = "auto", dtype: str = "auto",
    compile_: bool = False, overhead_tokens: tuple[int, ...] = (4096, 16384, 65536), overhead_reps: int = 10,
    ops: bool = True, call_memory_latent: int = 0, rematch_every: int = 1,
    cache_interval: int = DEFAULT_CACHE_INTERVAL, max_downsample: int = 1, log=print,
) -> dict:  # fmt: skip
    """Run the benchmark and return its results (what ``tofu-sd bench`` prints and writes as JSON).

    ``batch`` None is the arch's default (:func:`~.archs.default_batch`). ``rematch_every`` is ToFu's for every
    tofu variant; ``cache_interval`` DeepCache's in the ``deepcache+<tofu>`` variants (``deepcache@N`` has its
    own). ``max_downsample`` is the U-Net levels every method patches (tofu_sd's option; 1, the highest
    resolution only, is the default; diffusion transformers refuse other values). On a diffusion transformer the variants default to those of the default set that run on it; every
    variant and size is checked before the model is built, and each size also gets :func:`~.targets.dit_targets`."""
    arch = resolve_arch(arch)
    options = bench_options(rematch_every, max_downsample)
    more = MethodOptions(cache_interval=cache_interval)
    transformer = is_transformer(arch)
    if transformer and max_downsample != 1:
        raise ValueError(
            f"--max-downsample {max_downsample} chooses a U-Net's levels; {arch} is a diffusion transformer, whose "
            "blocks all see the full token grid: leave --max-downsample at 1"
        )
    if transformer:
        names = transformer_variants_checked(arch, None if variants is None else list(variants), ratio, options, more)
        check_sizes(arch, latents)
    else:
        names = parse_variants(default_variants() if variants is None else variants, ratio, options, more)
    dev = resolve_device(device)
    dt = resolve_dtype(dtype, dev)
    if transformer:
        check_fits(arch, dev, dt)
    batch = default_batch(arch) if batch is None else batch
    model = build_model(arch, dev, dt)
    out = {
        "machine": machine(), "device": dev.type, "dtype": str(dt).removeprefix("torch."), "arch": arch,
        "batch": batch, "ratio": ratio, "rematch_every": rematch_every, "max_downsample": max_downsample,
        "cache_interval": cache_interval, "reps": reps, "compiled": compile_, "torch": torch.__version__,
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "steps": {}, "block_overhead": {},
    }  # fmt: skip
    if transformer:
        out["transformer"] = {"class": type(model).__name__, "params": sum(p.numel() for p in model.parameters()),
                              "text_tokens": DIT_ARCHS[arch].text_tokens, "config": dict(DIT_ARCHS[arch].config)}  # fmt: skip
        out["targets"] = dict(TARGETS)
    if ops:
        log("counting ops per patched block (tiny U-Net, eager) ...")
        out["ops_per_block"] = ops_per_block(ratio=ratio)
    for latent in latents:
        log(f"timing {arch} step, batch {batch}, latent {latent}x{latent} ({latent * 8}px), {reps} rounds ...")
        inputs = inputs_of(arch, model, batch, latent, dev, dt)
        results, kind = time_steps(model, inputs, names, ratio, reps, warmup, dev, compile_, options, more)
        data = {"variants": results, "ratios": step_ratios(results, ratio), "peak_mem_kind": kind}
        if transformer:
            data["targets"] = dit_targets(results, ratio)
        out["steps"][str(latent * 8)] = data
    channels = token_channels(arch, model)
    for tokens in overhead_tokens:
        log(f"timing the reduction machinery per block call at N={tokens} ...")
        block_reps = overhead_reps if tokens <= 16384 else max(2, overhead_reps // 5)
        out["block_overhead"][str(tokens)] = block_overhead(tokens, channels, batch, ratio, block_reps, dev, dt)
    if call_memory_latent:
        log(f"peak memory of a tiny U-Net call at latent {call_memory_latent} ...")
        out["call_memory_mb"] = {"latent": call_memory_latent, "tokens": call_memory_latent**2, "batch": batch,
                                 "peak_mb": call_memory(call_memory_latent, ratio=ratio, batch=batch)}  # fmt: skip
    return out
