"""Speed of one denoising step: each method of the registry (full, tomesd, tofu_sd with each schedule, the peers)
and an oracle that bounds any reduction at the ratio (``tofu-sd bench``).

The model, a U-Net or a diffusion transformer (SD3 medium, FLUX.1-dev, whole or as a slice of a few blocks), is
built from the real architecture's config with random weights (speed does not depend on weight values, so
nothing is downloaded). Variants are timed in interleaved rounds after a warm-up, so slow drifts of the machine
hit all of them alike; ratios are computed within the one run. On a transformer the bench also reports the
issue's targets: each variant's peak memory above full's, and tofu's step time against the oracle's.

It also measures the reduction machinery of one block call alone (time and peak allocated memory, at several N,
for tomesd, tofu and tofu-local), counts the ops each patch adds per block to a U-Net call (``torch.profiler``,
top-level aten ops, views excluded), and optionally the peak memory of a tiny U-Net call at a large latent.

- :mod:`.archs`: the models ``--arch`` names, their inputs, and the checks made before a transformer is built;
- :mod:`.variants`: the variants, i.e. the registry's method names (:mod:`evaluation.methods`);
- :mod:`.steps`: timing the steps and their paired ratios; :mod:`.machinery`: the per-block machinery;
- :mod:`.targets`: the targets on transformers (memory above full's, time against the oracle's);
- :mod:`.tiny_calls`: ops per patched block and call memory on the tiny U-Net;
- :mod:`.profiling`: what ``torch.profiler`` measures on the CPU, without kineto's lines on the terminal;
- :mod:`.run`: :func:`run_bench`; :mod:`.table`: the printed table and the JSON.
"""


from .archs import ARCH_ALIASES, ARCHS, build_model, build_unet
from .machinery import OVERHEAD, block_overhead
from .profiling import count_ops, peak_alloc_bytes
from .run import run_bench
from .steps import model_step, time_steps, unet_step
from .table import format_table, write_json
from .variants import VARIANTS, default_variants, parse_variants, variant_applied

__all__ = [
    "ARCH_ALIASES", "ARCHS", "OVERHEAD", "VARIANTS", "block_overhead", "build_model", "build_unet", "count_ops",
    "default_variants", "format_table", "model_step", "parse_variants", "peak_alloc_bytes", "run_bench",
    "time_steps", "unet_step", "variant_applied", "write_json",
]  # fmt: skip
