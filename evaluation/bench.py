"""Speed of one denoising step: full vs tomesd vs tofu_sd (each schedule) vs an oracle that bounds any 50% reduction.

The U-Net is built from the real architecture's config with random weights (speed does not depend on weight
values, so nothing is downloaded). Variants are timed in interleaved rounds after a warm-up, so slow drifts of
the machine hit all of them alike; ratios are computed within the one run. The oracle runs the same blocks'
self-attention on a fixed strided subset of the tokens and copies each kept token's output to its neighbours:
no similarity, no matching, no gather by index.
"""

from __future__ import annotations

import contextlib
import json
import platform
import statistics
import time
from dataclasses import dataclass, field

import torch
from diffusers import UNet2DConditionModel
from diffusers.hooks import ModelHook

import tofu_sd
from tofu_sd import hooks
from tofu_sd.blocks import select_sites, transformer_block_sites
from tofu_sd.merge import bipartite_soft_matching, random_partition, reduce_tokens, restore_tokens, timestep_key

from .memory import PeakMemory
from .models import resolve_device, resolve_dtype

VARIANTS = ("full", "tome", "tofu", "tofu-P", "tofu-A", "tofu-M", "oracle")

SD15 = dict(
    sample_size=64,
    block_out_channels=(320, 640, 1280, 1280),
    layers_per_block=2,
    cross_attention_dim=768,
    attention_head_dim=8,
    down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
    up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
)
SDXL = dict(
    sample_size=128,
    block_out_channels=(320, 640, 1280),
    layers_per_block=2,
    cross_attention_dim=2048,
    attention_head_dim=(5, 10, 20),
    transformer_layers_per_block=(1, 2, 10),
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    use_linear_projection=True,
    addition_embed_type="text_time",
    addition_time_embed_dim=256,
    projection_class_embeddings_input_dim=2816,
)


def build_unet(arch: str, device: torch.device, dtype: torch.dtype) -> UNet2DConditionModel:
    """``sd15`` / ``sdxl``: the real architectures with random weights; ``tiny``: the test-sized SD 1.5 shape."""
    if arch == "tiny":
        from .tiny import tiny_unet

        unet = tiny_unet("sd15")
    else:
        torch.manual_seed(0)
        unet = UNet2DConditionModel(**{"sd15": SD15, "sdxl": SDXL}[arch])
    unet = unet.to(device) if dtype == torch.float32 else unet.to(device=device, dtype=dtype)
    return unet.eval().requires_grad_(False)


def _step(model, inputs: dict):
    """One U-Net call; the latents go positionally, where tomesd's size hook looks for them."""
    rest = {k: v for k, v in inputs.items() if k != "sample"}
    return model(inputs["sample"], **rest)


def step_inputs(unet, batch: int, latent: int, device, dtype) -> dict:
    """Inputs of one denoising step: random latents, a timestep, random text embeddings (77 tokens)."""
    g = torch.Generator().manual_seed(0)
    config = unet.config
    inputs = {
        "sample": torch.randn(batch, config.in_channels, latent, latent, generator=g).to(device, dtype),
        "timestep": torch.tensor(500, device=device),
        "encoder_hidden_states": torch.randn(batch, 77, config.cross_attention_dim, generator=g).to(device, dtype),
    }
    if config.addition_embed_type == "text_time":
        text_dim = config.projection_class_embeddings_input_dim - 6 * config.addition_time_embed_dim
        inputs["added_cond_kwargs"] = {
            "text_embeds": torch.randn(batch, text_dim, generator=g).to(device, dtype),
            "time_ids": torch.tensor([[latent * 8, latent * 8, 0, 0, latent * 8, latent * 8]] * batch).to(device, dtype),
        }
    return inputs


class OracleHook(ModelHook):
    """Self-attention on every k-th token; each kept token's output is copied to the k - 1 tokens after it."""

    def __init__(self, ratio: float) -> None:
        super().__init__()
        self.stride = max(1, round(1 / (1 - ratio)))
        self.n: int | None = None

    def pre_forward(self, module, hidden_states, *args, **kwargs):
        self.n = hidden_states.shape[1]
        return (hidden_states[:, :: self.stride], *args), kwargs

    def post_forward(self, module, output):
        b, m, c = output.shape
        full = output.unsqueeze(2).expand(b, m, self.stride, c).reshape(b, m * self.stride, c)
        return full[:, : self.n]


@contextlib.contextmanager
def variant_applied(unet, variant: str, ratio: float):
    """Patch ``unet`` as ``variant`` says for the duration of the block."""
    if variant == "full":
        yield
    elif variant == "tome":
        import tomesd

        finest = min(s.downsample for s in transformer_block_sites(unet))
        tomesd.apply_patch(unet, ratio=ratio, max_downsample=finest)  # same blocks as tofu_sd's default
        try:
            yield
        finally:
            tomesd.remove_patch(unet)
    elif variant.startswith("tofu"):
        schedule = variant.partition("-")[2] or None
        tofu_sd.apply(unet, ratio=ratio, schedule=schedule)
        try:
            yield
        finally:
            tofu_sd.remove(unet)
    elif variant == "oracle":
        attns = [site.block.attn1 for site in select_sites(transformer_block_sites(unet), 1)]
        for attn in attns:
            hooks.register(attn, OracleHook(ratio), "tofu_sd.oracle")
        try:
            yield
        finally:
            for attn in attns:
                attn._diffusers_hook.remove_hook("tofu_sd.oracle", recurse=False)
    else:
        raise ValueError(f"unknown variant {variant!r}; choose from {', '.join(VARIANTS)}")


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@dataclass
class StepTimes:
    seconds: list[float] = field(default_factory=list)
    peak_mem_bytes: int = 0

    def summary(self) -> dict:
        return {
            "median_s": statistics.median(self.seconds),
            "min_s": min(self.seconds),
            "reps": len(self.seconds),
            "peak_mem_gb": self.peak_mem_bytes / 2**30,
            "seconds": self.seconds,
        }


def peak_step_bytes(unet, fn, device: torch.device) -> tuple[int, str]:
    """Peak memory of ``fn()``: CUDA's peak allocated; on the CPU the peak of live tensors (weights included).

    On the CPU the peak comes from the profiler's allocation trace (each op's net allocation, frees in time
    order), so, unlike peak RSS, it does not depend on which variant ran before.
    """
    if device.type == "cuda":
        with PeakMemory(device).measure() as peak:
            fn()
        return peak.bytes, "cuda_peak_allocated"
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    live = top = 0
    for event in sorted(prof.events(), key=lambda e: e.time_range.start):
        live += event.self_cpu_memory_usage
        top = max(top, live)
    weights = sum(t.numel() * t.element_size() for t in (*unet.parameters(), *unet.buffers()))
    return weights + top, "peak_live_tensors"


@torch.no_grad()
def time_steps(unet, inputs: dict, variants: list[str], ratio: float, reps: int, warmup: int, device, compile_: bool):
    """Per variant: peak memory of one step, then ``reps`` timed steps in interleaved rounds."""
    kind = ""
    model = torch.compile(unet) if compile_ else unet
    times = {v: StepTimes() for v in variants}
    for variant in variants:
        with variant_applied(unet, variant, ratio):
            for _ in range(warmup):
                _step(model, inputs)
            times[variant].peak_mem_bytes, kind = peak_step_bytes(unet, lambda: _step(model, inputs), device)
    for _ in range(reps):
        for variant in variants:
            with variant_applied(unet, variant, ratio):
                if compile_:
                    _step(model, inputs)  # the patch changed: let the compiler retrace outside the timing
                _sync(device)
                t0 = time.perf_counter()
                _step(model, inputs)
                _sync(device)
                times[variant].seconds.append(time.perf_counter() - t0)
    return {v: t.summary() for v, t in times.items()}, kind


def paired_ratio(a: list[float], b: list[float]) -> float:
    """Median over rounds of ``a[i] / b[i]``: both ran in the same round, so slow drifts of the machine cancel."""
    return statistics.median(x / y for x, y in zip(a, b))


def _ratios(results: dict) -> dict:
    """Paired (per-round) median ratios, and the same from the minimum times as a cross-check."""
    secs = {v: r["seconds"] for v, r in results.items()}
    pairs = [(v, "full") for v in secs if v != "full" and "full" in secs]
    pairs += [("tofu", other) for other in ("tome", "oracle") if "tofu" in secs and other in secs]
    ratios = {}
    for a, b in pairs:
        ratios[f"{a}/{b}"] = paired_ratio(secs[a], secs[b])
        ratios[f"{a}/{b} (min)"] = min(secs[a]) / min(secs[b])
    for other in ("tome", "oracle"):
        if "tofu" in results and other in results:
            ratios[f"tofu/{other} memory"] = results["tofu"]["peak_mem_gb"] / results[other]["peak_mem_gb"]
    return ratios


@torch.no_grad()
def block_overhead(tokens: int, channels: int, batch: int, ratio: float, reps: int, device, dtype) -> dict:
    """Seconds per patched-block call of the reduction machinery alone (attention excluded), by method."""
    import tomesd.merge

    side = int(round(tokens**0.5))
    x = torch.randn(batch, side * side, channels, device=device, dtype=dtype)
    r = int(x.shape[1] * ratio)
    key = timestep_key(torch.tensor(500, device=device), device)

    def ours(mode):
        def run():
            m = bipartite_soft_matching(x, *random_partition(side, side, 2, 2, 0, 0, key), r)  # the hooks' path
            return restore_tokens(reduce_tokens(x, m, mode), m)

        return run

    def tome():
        gen = torch.Generator(device=device).manual_seed(0)
        merge, unmerge = tomesd.merge.bipartite_soft_matching_random2d(x, side, side, 2, 2, r, generator=gen)
        return unmerge(merge(x))

    def oracle():
        kept = x[:, ::2]
        return kept.unsqueeze(2).expand(-1, -1, 2, -1).reshape(x.shape)

    candidates = {"tofu-P": ours("prune"), "tofu-A": ours("mean"), "tofu-M": ours("mlerp"), "tome": tome, "oracle": oracle}
    seconds = {name: [] for name in candidates}
    for fn in candidates.values():
        fn()
    for _ in range(reps):
        for name, fn in candidates.items():
            _sync(device)
            t0 = time.perf_counter()
            fn()
            _sync(device)
            seconds[name].append(time.perf_counter() - t0)
    return {name: statistics.median(s) for name, s in seconds.items()}


def machine() -> str:
    if torch.cuda.is_available():
        return torch.cuda.get_device_name()
    return f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} torch threads"


def run_bench(
    arch: str = "sd15", latents: tuple[int, ...] = (64, 128), variants: tuple[str, ...] = VARIANTS, ratio: float = 0.5,
    reps: int = 5, warmup: int = 1, batch: int = 2, device: str = "auto", dtype: str = "auto",
    compile_: bool = False, overhead_tokens: tuple[int, ...] = (4096, 16384), overhead_reps: int = 10,
    log=print,
) -> dict:  # fmt: skip
    """Run the benchmark and return its results (what ``tofu-sd bench`` prints and writes as JSON)."""
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown:
        raise ValueError(f"unknown variant(s) {', '.join(unknown)}; choose from {', '.join(VARIANTS)}")
    dev = resolve_device(device)
    dt = resolve_dtype(dtype, dev)
    unet = build_unet(arch, dev, dt)
    out = {
        "machine": machine(), "device": dev.type, "dtype": str(dt).removeprefix("torch."), "arch": arch,
        "batch": batch, "ratio": ratio, "reps": reps, "compiled": compile_, "torch": torch.__version__,
        "steps": {}, "block_overhead_s": {},
    }  # fmt: skip
    for latent in latents:
        log(f"timing {arch} step, batch {batch}, latent {latent}x{latent} ({latent * 8}px), {reps} rounds ...")
        inputs = step_inputs(unet, batch, latent, dev, dt)
        results, kind = time_steps(unet, inputs, list(variants), ratio, reps, warmup, dev, compile_)
        out["steps"][str(latent * 8)] = {"variants": results, "ratios": _ratios(results), "peak_mem_kind": kind}
    channels = unet.config.block_out_channels[0 if arch != "sdxl" else 1]
    for tokens in overhead_tokens:
        out["block_overhead_s"][str(tokens)] = block_overhead(tokens, channels, batch, ratio, overhead_reps, dev, dt)
    return out


def format_table(result: dict) -> str:
    lines = [f"{result['arch']} U-Net step on {result['machine']} ({result['device']}, {result['dtype']}, "
             f"batch {result['batch']}, ratio {result['ratio']}, compiled={result['compiled']})"]  # fmt: skip
    for size, data in result["steps"].items():
        full = data["variants"].get("full", {}).get("median_s")
        lines += ["", f"{size}x{size}: variant   median s    min s   vs full (paired)   peak mem MB ({data['peak_mem_kind']})"]
        for name, r in data["variants"].items():
            rel = f"{data['ratios'].get(f'{name}/full', 1.0):7.3f}" if full else "    n/a"
            lines.append(f"  {name:<10} {r['median_s']:9.4f} {r['min_s']:8.4f} {rel:>12}   {r['peak_mem_gb'] * 1024:14.1f}")
        key = [k for k in data["ratios"] if k.startswith("tofu/t") or k.startswith("tofu/o")]
        lines.append("  " + ", ".join(f"{k} = {data['ratios'][k]:.3f}" for k in key))
    if result["block_overhead_s"]:
        lines += ["", "reduce + restore machinery per block call (ms, attention excluded):"]
        for tokens, data in result["block_overhead_s"].items():
            lines.append(f"  N={tokens}: " + ", ".join(f"{k} {1000 * v:.2f}" for k, v in data.items()))
    return "\n".join(lines)


def write_json(path: str, result: dict) -> None:
    with open(path, "w") as f:
        json.dump(result, f, indent=2)
