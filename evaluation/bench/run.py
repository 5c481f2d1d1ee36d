"""``tofu-sd bench``: builds the U-Net and runs each measurement (:func:`run_bench`)."""

from __future__ import annotations

import platform
from datetime import datetime, timezone

import torch
from diffusers import UNet2DConditionModel

from ..archs import BENCH_ARCHS, CLIP_TOKENS, build_unet as build_from_config, step_inputs
from ..methods.base import DEFAULT_CACHE_INTERVAL, MethodOptions
from ..models import resolve_device, resolve_dtype
from .machinery import block_overhead
from .steps import step_ratios, time_steps
from .tiny_calls import call_memory, ops_per_block
from .variants import bench_options, default_variants, parse_variants

ARCH_ALIASES = {"tiny": "tiny-random"}  #: the earlier name of ``tiny-random`` (random weights, not ``--model tiny``)


def build_unet(arch: str, device: torch.device, dtype: torch.dtype) -> UNet2DConditionModel:
    """``sd15`` / ``sdxl``: the real architectures with random weights; ``sd15-level``: SD 1.5's highest-resolution
    level alone; ``tiny-random``: the test-sized SD 1.5 shape (:mod:`evaluation.archs`)."""
    unet = build_from_config(BENCH_ARCHS[ARCH_ALIASES.get(arch, arch)], seed=0)
    unet = unet.to(device) if dtype == torch.float32 else unet.to(device=device, dtype=dtype)
    return unet.eval().requires_grad_(False)


def machine() -> str:
    if torch.cuda.is_available():
        return torch.cuda.get_device_name()
    return f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} torch threads"


def run_bench(
    arch: str = "sd15", latents: tuple[int, ...] = (64, 128), variants: tuple[str, ...] | None = None, ratio: float = 0.5,
    reps: int = 5, warmup: int = 1, batch: int = 2, device: str = "auto", dtype: str = "auto",
    compile_: bool = False, overhead_tokens: tuple[int, ...] = (4096, 16384, 65536), overhead_reps: int = 10,
    ops: bool = True, call_memory_latent: int = 0, rematch_every: int = 1,
    cache_interval: int = DEFAULT_CACHE_INTERVAL, log=print,
) -> dict:  # fmt: skip
    """Run the benchmark and return its results (what ``tofu-sd bench`` prints and writes as JSON).

    ``rematch_every`` is ToFu's for every tofu variant; ``cache_interval`` DeepCache's in the ``deepcache+<tofu>``
    variants (``deepcache@N`` has its own)."""
    arch = ARCH_ALIASES.get(arch, arch)
    if arch not in BENCH_ARCHS:
        raise ValueError(f"unknown arch {arch!r}; choose from {', '.join(BENCH_ARCHS)}")
    options = bench_options(rematch_every)
    more = MethodOptions(cache_interval=cache_interval)
    names = parse_variants(default_variants() if variants is None else variants, ratio, options, more)
    dev = resolve_device(device)
    dt = resolve_dtype(dtype, dev)
    unet = build_unet(arch, dev, dt)
    out = {
        "machine": machine(), "device": dev.type, "dtype": str(dt).removeprefix("torch."), "arch": arch,
        "batch": batch, "ratio": ratio, "rematch_every": rematch_every,
        "cache_interval": cache_interval, "reps": reps, "compiled": compile_, "torch": torch.__version__,
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "steps": {}, "block_overhead": {},
    }  # fmt: skip
    if ops:
        log("counting ops per patched block (tiny U-Net, eager) ...")
        out["ops_per_block"] = ops_per_block(ratio=ratio)
    for latent in latents:
        log(f"timing {arch} step, batch {batch}, latent {latent}x{latent} ({latent * 8}px), {reps} rounds ...")
        inputs = step_inputs(unet, batch, latent, text_tokens=CLIP_TOKENS, device=dev, dtype=dt)
        results, kind = time_steps(unet, inputs, names, ratio, reps, warmup, dev, compile_, options, more)
        out["steps"][str(latent * 8)] = {"variants": results, "ratios": step_ratios(results, ratio), "peak_mem_kind": kind}
    channels = unet.config.block_out_channels[0 if arch != "sdxl" else 1]
    for tokens in overhead_tokens:
        log(f"timing the reduction machinery per block call at N={tokens} ...")
        block_reps = overhead_reps if tokens <= 16384 else max(2, overhead_reps // 5)
        out["block_overhead"][str(tokens)] = block_overhead(tokens, channels, batch, ratio, block_reps, dev, dt)
    if call_memory_latent:
        log(f"peak memory of a tiny U-Net call at latent {call_memory_latent} ...")
        out["call_memory_mb"] = {"latent": call_memory_latent, "tokens": call_memory_latent**2, "batch": batch,
                                 "peak_mb": call_memory(call_memory_latent, ratio=ratio, batch=batch)}  # fmt: skip
    return out
