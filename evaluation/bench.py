"""Speed of one denoising step: full vs tomesd vs tofu_sd (each schedule) vs an oracle that bounds any 50% reduction.

The U-Net is built from the real architecture's config with random weights (speed does not depend on weight
values, so nothing is downloaded). Variants are timed in interleaved rounds after a warm-up, so slow drifts of
the machine hit all of them alike; ratios are computed within the one run. The oracle runs the same blocks'
self-attention on a fixed strided subset of the tokens and copies each kept token's output to its neighbours:
no similarity, no matching, no gather by index.

It also measures the reduction machinery of one block call alone (time and peak allocated memory, at several N,
for tomesd, tofu and tofu-local), counts the ops each patch adds per block to a U-Net call (``torch.profiler``,
top-level aten ops, views excluded), and optionally the peak memory of a tiny U-Net call at a large latent.
"""

from __future__ import annotations

import collections
import contextlib
import importlib.util
import json
import platform
import statistics
import time
from dataclasses import dataclass, field

import torch
from diffusers import UNet2DConditionModel
from diffusers.hooks import ModelHook

from tofu_sd import TokenFusionConfig, hooks
from tofu_sd.blocks import select_sites, transformer_block_sites
from tofu_sd.merge import MODES, block_offsets, match, plan_blocks, reduce_tokens, restore_tokens, timestep_key

from .memory import PeakMemory
from .methods import CATOME_BARE_STEPS, CATOME_CACHE, CATOME_INSTALL, method_applied
from .models import resolve_device, resolve_dtype

VARIANTS = ("full", "tome", "tofu", "tofu-P", "tofu-A", "tofu-M", "tofu-local", "todo", "catome", "oracle")
#: Machinery candidates of the per-block measurement.
OVERHEAD = ("tome", "tofu-P", "tofu-M", "tofu-local-P", "tofu-local-M", "oracle")

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


# The highest-resolution level of SD 1.5 alone: 320 channels, 8 heads, 2 + 3 transformer blocks with their
# ResNets, no down- or upsampling and no mid block. Its step is dominated by the blocks that Token Fusion patches.
SD15_LEVEL = dict(
    SD15,
    block_out_channels=(320,),
    down_block_types=("CrossAttnDownBlock2D",),
    up_block_types=("CrossAttnUpBlock2D",),
    mid_block_type=None,
)
ARCHS = {"sd15": SD15, "sdxl": SDXL, "sd15-level": SD15_LEVEL}


def default_variants() -> tuple[str, ...]:
    """Every variant whose package is installed (``catome`` needs the optional ``ca-tome``)."""
    return tuple(v for v in VARIANTS if v != "catome" or importlib.util.find_spec("ca_tome") is not None)


def catome_compute_fraction(steps: int = CATOME_BARE_STEPS) -> float:
    """Fraction of the steps of a ``steps``-step schedule at which CA-ToMe computes its matchings (the first, and
    those of its cache schedule); at the others it reuses the cached ones."""
    from ca_tome import CacheConf

    return (1 + len({s for s in getattr(CacheConf, CATOME_CACHE) if 2 <= s <= steps})) / steps


def build_unet(arch: str, device: torch.device, dtype: torch.dtype) -> UNet2DConditionModel:
    """``sd15`` / ``sdxl``: the real architectures with random weights; ``sd15-level``: SD 1.5's highest-resolution
    level alone; ``tiny``: the test-sized SD 1.5 shape."""
    if arch == "tiny":
        from .tiny import tiny_unet

        unet = tiny_unet("sd15")
    else:
        torch.manual_seed(0)
        unet = UNet2DConditionModel(**ARCHS[arch])
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
    elif variant == "oracle":
        attns = [site.block.attn1 for site in select_sites(transformer_block_sites(unet), 1)]
        for attn in attns:
            hooks.register(attn, OracleHook(ratio), "tofu_sd.oracle")
        try:
            yield
        finally:
            for attn in attns:
                attn._diffusers_hook.remove_hook("tofu_sd.oracle", recurse=False)
    elif variant in VARIANTS:
        # The same patches as `tofu-sd generate`'s methods (tome on tofu_sd's blocks; todo pools keys and values
        # 2x2, 75% of them removed, whatever the ratio; catome merges by a similarity threshold); tofu-P/-A/-M
        # are tofu with one letter for every block.
        method, _, letter = variant.partition("-")
        schedule = letter if method == "tofu" and letter in MODES else None
        name = "tofu" if schedule else variant
        with method_applied(unet, name, TokenFusionConfig(ratio=ratio, schedule=schedule)):
            yield
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
    weights = sum(t.numel() * t.element_size() for t in (*unet.parameters(), *unet.buffers()))
    return weights + _peak_alloc_bytes(fn), "peak_live_tensors"


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
    def timed() -> float:
        _sync(device)
        t0 = time.perf_counter()
        _step(model, inputs)
        _sync(device)
        return time.perf_counter() - t0

    catome = {"compute_s": [], "cached_s": []}
    share = catome_compute_fraction() if "catome" in variants else None
    for _ in range(reps):
        for variant in variants:
            with variant_applied(unet, variant, ratio):
                if compile_:
                    _step(model, inputs)  # the patch changed: let the compiler retrace outside the timing
                if variant != "catome":
                    times[variant].seconds.append(timed())
                    continue
                # CA-ToMe's cost depends on the step: it matches at a few steps and reuses the matchings at the
                # rest. Time the first step of a fresh schedule (matching) and the second (cached), and weigh
                # them as a CATOME_BARE_STEPS-step schedule does.
                compute, cached = timed(), timed()
                catome["compute_s"].append(compute)
                catome["cached_s"].append(cached)
                times[variant].seconds.append(share * compute + (1 - share) * cached)
    summaries = {v: t.summary() for v, t in times.items()}
    if "catome" in summaries:
        summaries["catome"].update(catome, compute_fraction=share, schedule_steps=CATOME_BARE_STEPS)
    return summaries, kind


def paired_ratio(a: list[float], b: list[float]) -> float:
    """Median over rounds of ``a[i] / b[i]``: both ran in the same round, so slow drifts of the machine cancel."""
    return statistics.median(x / y for x, y in zip(a, b))


def _ratios(results: dict) -> dict:
    """Paired (per-round) median ratios, and the same from the minimum times as a cross-check."""
    secs = {v: r["seconds"] for v, r in results.items()}
    pairs = [(v, "full") for v in secs if v != "full" and "full" in secs]
    pairs += [(a, b) for a in ("tofu", "tofu-local") for b in ("tome", "oracle") if a in secs and b in secs]
    ratios = {}
    for a, b in pairs:
        ratios[f"{a}/{b}"] = paired_ratio(secs[a], secs[b])
        ratios[f"{a}/{b} (min)"] = min(secs[a]) / min(secs[b])
    for a in ("tofu", "tofu-local"):
        for other in ("tome", "oracle"):
            if a in results and other in results:
                ratios[f"{a}/{other} memory"] = results[a]["peak_mem_gb"] / results[other]["peak_mem_gb"]
    return ratios


def _peak_alloc_bytes(fn) -> int:
    """Peak bytes of tensors allocated by ``fn()`` and alive at once, from the profiler's allocation trace."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    live = top = 0
    for event in sorted(prof.events(), key=lambda e: e.time_range.start):
        live += event.self_cpu_memory_usage
        top = max(top, live)
    return top


def _machinery(x: torch.Tensor, side: int, ratio: float, key: torch.Tensor) -> dict:
    """The reduce-and-restore machinery of one block call per candidate, as the hooks (or tomesd) run it."""
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

    def oracle():
        kept = x[:, ::2]
        return kept.unsqueeze(2).expand(-1, -1, 2, -1).reshape(x.shape)

    return {
        "tome": tome, "tofu-P": ours("prune"), "tofu-M": ours("mlerp"), "tofu-local-P": ours("prune", 3),
        "tofu-local-M": ours("mlerp", 3), "oracle": oracle,
    }  # fmt: skip


@torch.no_grad()
def block_overhead(
    tokens: int, channels: int, batch: int, ratio: float, reps: int, device, dtype, candidates=OVERHEAD, memory=True
) -> dict:
    """Per candidate, for one patched-block call of the reduction machinery alone (attention excluded): the median
    seconds over ``reps`` interleaved runs and, on the CPU, the peak of the tensors it allocates (MB)."""
    side = int(round(tokens**0.5))
    x = torch.randn(batch, side * side, channels, device=device, dtype=dtype)
    fns = {k: v for k, v in _machinery(x, side, ratio, timestep_key(500, device)).items() if k in candidates}
    out = {name: {} for name in fns}
    for name, fn in fns.items():
        fn()  # warm-up (and caches)
        if memory and device.type == "cpu":
            out[name]["peak_mb"] = _peak_alloc_bytes(fn) / 2**20
        elif memory:
            with PeakMemory(device).measure() as peak:
                fn()
            out[name]["peak_mb"] = (peak.bytes - torch.cuda.memory_allocated(device)) / 2**20
    seconds = {name: [] for name in fns}
    for _ in range(reps):
        for name, fn in fns.items():
            _sync(device)
            t0 = time.perf_counter()
            fn()
            _sync(device)
            seconds[name].append(time.perf_counter() - t0)
    for name, s in seconds.items():
        out[name]["median_s"] = statistics.median(s)
    return out


_VIEW_OPS = {
    "aten::view", "aten::_unsafe_view", "aten::slice", "aten::select", "aten::expand", "aten::transpose", "aten::t",
    "aten::permute", "aten::unsqueeze", "aten::squeeze", "aten::as_strided", "aten::alias", "aten::unbind",
    "aten::split", "aten::split_with_sizes", "aten::chunk", "aten::narrow", "aten::detach", "aten::_reshape_alias",
    "aten::view_as", "aten::expand_as", "aten::unflatten", "aten::diagonal", "aten::lift_fresh", "aten::movedim",
    "aten::result_type", "aten::promote_types", "aten::resolve_conj", "aten::resolve_neg",
}  # fmt: skip
#: Composite ops that launch work only when they copy (a non-viewable reshape, a real dtype change, ...).
_PASS_THROUGH = {"aten::reshape", "aten::flatten", "aten::to", "aten::contiguous", "aten::type_as"}


def count_ops(fn) -> collections.Counter:
    """Top-level aten ops of ``fn()`` by name, as ``torch.profiler`` records them, views and no-op casts excluded."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    counts = collections.Counter()
    for event in prof.events():
        if event.cpu_parent is not None or not event.name.startswith("aten::") or event.name in _VIEW_OPS:
            continue
        if event.name in _PASS_THROUGH and not any(
            child.name not in _VIEW_OPS and child.name not in _PASS_THROUGH for child in event.cpu_children
        ):
            continue
        counts[event.name] += 1
    return counts


@torch.no_grad()
def ops_per_block(variants=("tome", "tofu", "tofu-local"), ratio: float = 0.5) -> dict:
    """Ops that each variant adds per patched block to one call of the tiny SD-1.5-shaped U-Net (batch 2, 16x16
    latent, fp32, eager, CPU): (ops of the patched call - ops of the unpatched call) / patched blocks."""
    from .tiny import tiny_unet, tiny_unet_inputs

    unet = tiny_unet("sd15")
    inputs = tiny_unet_inputs(unet)
    blocks = len(select_sites(transformer_block_sites(unet), 1))

    def one_call():
        return _step(unet, inputs)

    one_call()
    base = count_ops(one_call)
    out = {}
    for variant in variants:
        with variant_applied(unet, variant, ratio):
            one_call()
            counts = count_ops(one_call)
        extra = counts.copy()
        extra.subtract(base)
        out[variant] = {
            "per_block": sum(extra.values()) / blocks,
            "by_op": {k: v for k, v in sorted(extra.items()) if v},
        }
    return out


@torch.no_grad()
def call_memory(latent: int, variants=("full", "tome", "tofu", "tofu-local"), ratio: float = 0.5, batch: int = 2) -> dict:
    """Peak of live tensors (MB, profiler allocation trace, weights excluded) of one call of the tiny SD-1.5-shaped
    U-Net at a ``latent x latent`` latent (N = latent**2 tokens at its highest resolution), per variant."""
    from .tiny import tiny_unet, tiny_unet_inputs

    unet = tiny_unet("sd15")
    inputs = tiny_unet_inputs(unet, batch=batch, height=latent, width=latent)
    out = {}
    for variant in variants:
        with variant_applied(unet, variant, ratio):
            _step(unet, inputs)
            out[variant] = _peak_alloc_bytes(lambda: _step(unet, inputs)) / 2**20
    return out


def machine() -> str:
    if torch.cuda.is_available():
        return torch.cuda.get_device_name()
    return f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} torch threads"


def run_bench(
    arch: str = "sd15", latents: tuple[int, ...] = (64, 128), variants: tuple[str, ...] | None = None, ratio: float = 0.5,
    reps: int = 5, warmup: int = 1, batch: int = 2, device: str = "auto", dtype: str = "auto",
    compile_: bool = False, overhead_tokens: tuple[int, ...] = (4096, 16384, 65536), overhead_reps: int = 10,
    ops: bool = True, call_memory_latent: int = 0, log=print,
) -> dict:  # fmt: skip
    """Run the benchmark and return its results (what ``tofu-sd bench`` prints and writes as JSON)."""
    variants = default_variants() if variants is None else variants
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown:
        raise ValueError(f"unknown variant(s) {', '.join(unknown)}; choose from {', '.join(VARIANTS)}")
    if "catome" in variants and importlib.util.find_spec("ca_tome") is None:
        raise ValueError(f"variant catome needs the ca-tome package: {CATOME_INSTALL}")
    dev = resolve_device(device)
    dt = resolve_dtype(dtype, dev)
    unet = build_unet(arch, dev, dt)
    out = {
        "machine": machine(), "device": dev.type, "dtype": str(dt).removeprefix("torch."), "arch": arch,
        "batch": batch, "ratio": ratio, "reps": reps, "compiled": compile_, "torch": torch.__version__,
        "steps": {}, "block_overhead": {},
    }  # fmt: skip
    if ops:
        log("counting ops per patched block (tiny U-Net, eager) ...")
        out["ops_per_block"] = ops_per_block(ratio=ratio)
    for latent in latents:
        log(f"timing {arch} step, batch {batch}, latent {latent}x{latent} ({latent * 8}px), {reps} rounds ...")
        inputs = step_inputs(unet, batch, latent, dev, dt)
        results, kind = time_steps(unet, inputs, list(variants), ratio, reps, warmup, dev, compile_)
        out["steps"][str(latent * 8)] = {"variants": results, "ratios": _ratios(results), "peak_mem_kind": kind}
    channels = unet.config.block_out_channels[0 if arch != "sdxl" else 1]
    for tokens in overhead_tokens:
        log(f"timing the reduction machinery per block call at N={tokens} ...")
        reps = overhead_reps if tokens <= 16384 else max(2, overhead_reps // 5)
        out["block_overhead"][str(tokens)] = block_overhead(tokens, channels, batch, ratio, reps, dev, dt)
    if call_memory_latent:
        log(f"peak memory of a tiny U-Net call at latent {call_memory_latent} ...")
        out["call_memory_mb"] = {"latent": call_memory_latent, "tokens": call_memory_latent**2, "batch": batch,
                                 "peak_mb": call_memory(call_memory_latent, ratio=ratio, batch=batch)}  # fmt: skip
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
        if "catome" in data["variants"]:
            c = data["variants"]["catome"]
            lines.append(
                f"  catome: per-step mean of a {c['schedule_steps']}-step schedule, {c['compute_fraction']:.0%} of steps "
                f"matching (median {statistics.median(c['compute_s']):.4f} s), the rest cached "
                f"({statistics.median(c['cached_s']):.4f} s); todo: keys and values pooled 2x2 (75% removed)"
            )
        key = [k for k in data["ratios"] if k.startswith(("tofu/t", "tofu/o", "tofu-local/"))]
        lines.append("  " + ", ".join(f"{k} = {data['ratios'][k]:.3f}" for k in key))
    if result.get("ops_per_block"):
        lines += ["", "ops added per patched block (tiny U-Net call, eager, top-level aten ops without views):"]
        lines.append("  " + ", ".join(f"{k} {v['per_block']:.1f}" for k, v in result["ops_per_block"].items()))
    if result["block_overhead"]:
        lines += ["", "reduce + restore machinery per block call (attention excluded): median ms / peak MB allocated"]
        for tokens, data in result["block_overhead"].items():
            cells = [f"{k} {1000 * v['median_s']:.1f} ms" + (f" / {v['peak_mb']:.0f} MB" if "peak_mb" in v else "") for k, v in data.items()]
            lines.append(f"  N={tokens}: " + ", ".join(cells))
    if result.get("call_memory_mb"):
        cm = result["call_memory_mb"]
        full = cm["peak_mb"].get("full")
        lines += ["", f"tiny U-Net call at {cm['tokens']} tokens, batch {cm['batch']}: peak MB of live tensors (weights excluded)"]
        lines.append("  " + ", ".join(f"{k} {v:.0f}" + (f" (+{v - full:.0f})" if full is not None and k != "full" else "") for k, v in cm["peak_mb"].items()))
    return "\n".join(lines)


def write_json(path: str, result: dict) -> None:
    with open(path, "w") as f:
        json.dump(result, f, indent=2)
