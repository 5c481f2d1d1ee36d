"""The reduce-and-restore machinery of one patched-block call alone (attention excluded), per candidate: time and
the peak of the tensors it allocates."""

from __future__ import annotations

import statistics
import time

import torch

from tofu_sd.merge import match, reduce_tokens, restore_tokens
from tofu_sd.partition import block_offsets, timestep_key
from tofu_sd.plans import plan_blocks

from ..memory import PeakMemory
from ..methods.strided import oracle_keep, oracle_spread, oracle_stride
from .profiling import peak_alloc_bytes
from .steps import sync

#: Machinery candidates of the per-block measurement.
OVERHEAD = ("tome", "tofu-P", "tofu-M", "tofu-local-P", "tofu-local-M", "oracle")


def machinery(x: torch.Tensor, side: int, ratio: float, key: torch.Tensor) -> dict:
    """The reduce-and-restore machinery of one block call per candidate, as the hooks (or tomesd) run it, on a
    ``side x side`` grid of tokens ``x`` at ``ratio``."""
    import tomesd.merge

    r = int(x.shape[1] * ratio)

    def ours(mode, window=None):
        def run():
            offsets = block_offsets(side // 2, side // 2, 4, 0, (0,), key)
            plan = plan_blocks(side, side, 2, 2, x.shape[0], r, offsets, local_window=window, dtype=x.dtype)[0]
            m = match(x, plan)
            return restore_tokens(reduce_tokens(x, m, mode), m)

        return run

    def tome():
        gen = torch.Generator(device=x.device).manual_seed(0)
        merge, unmerge = tomesd.merge.bipartite_soft_matching_random2d(x, side, side, 2, 2, r, generator=gen)
        return unmerge(merge(x))

    stride = oracle_stride(ratio)  # as the step's oracle: every stride-th token kept, its copies for the rest

    def oracle():
        return oracle_spread(oracle_keep(x, stride), stride, x.shape[1])

    return {
        "tome": tome, "tofu-P": ours("prune"), "tofu-M": ours("mlerp"), "tofu-local-P": ours("prune", 3),
        "tofu-local-M": ours("mlerp", 3), "oracle": oracle,
    }  # fmt: skip


@torch.no_grad()
def block_overhead(
    tokens: int, channels: int, batch: int, ratio: float, reps: int, device, dtype, candidates=OVERHEAD, memory=True
) -> dict:
    """Per candidate, for one patched-block call of the reduction machinery alone (attention excluded): the median
    seconds over ``reps`` interleaved runs and the peak of the tensors it allocates (MB; on the CPU from the
    profiler's allocation trace, on CUDA the peak allocated above what was allocated before)."""
    side = int(round(tokens**0.5))
    x = torch.randn(batch, side * side, channels, device=device, dtype=dtype)
    fns = {k: v for k, v in machinery(x, side, ratio, timestep_key(500, device)).items() if k in candidates}
    out = {name: {} for name in fns}
    for name, fn in fns.items():
        fn()  # warm-up (and caches)
        if memory and device.type == "cpu":
            out[name]["peak_mb"] = peak_alloc_bytes(fn) / 2**20
        elif memory:
            with PeakMemory(device).measure() as peak:
                fn()
            out[name]["peak_mb"] = (peak.bytes - torch.cuda.memory_allocated(device)) / 2**20
    seconds = {name: [] for name in fns}
    for _ in range(reps):
        for name, fn in fns.items():
            sync(device)
            t0 = time.perf_counter()
            fn()
            sync(device)
            seconds[name].append(time.perf_counter() - t0)
    for name, s in seconds.items():
        out[name]["median_s"] = statistics.median(s)
    return out
