"""How often First Block Cache runs the blocks after the first beside Token Fusion, and MS-SSIM against full, on
the built-in ``tiny-sd3`` (the evidence in ``tofu_sd/cache_tests.py`` and docs/composition.md):

    python benchmarks/fbc_head_block.py            # 8 prompts (classes 0, 6, ..., 42), seed 1, 20 steps, guidance 5

Variants: the cache alone; ``tofu@0.5`` with every block reduced (the cache's tested block too: what Token Fusion
did before it left that block alone); with the first block unreduced (what it does now); with the partition held
over the steps (its hash keyed by no timestep), alone and with the first block unreduced.
"""

import json
import sys

import numpy as np
import torch

import tofu_sd
import tofu_sd.hooks
import tofu_sd.state
from evaluation.methods.caches import CACHES, cache_applied
from evaluation.metrics import PairwiseMSSSIM
from evaluation.shapes.data import caption
from evaluation.shapes_sd3 import CALL_KWARGS, load_pipeline

VARIANTS = {  # name: (options, partition held, first block left unreduced under the cache)
    "every block reduced": (dict(ratio=0.5), False, False),
    "first block unreduced": (dict(ratio=0.5), False, True),
    "held partition, every block": (dict(ratio=0.5), True, False),
    "held partition, first unreduced": (dict(ratio=0.5), True, True),
}


def main(classes=tuple(range(0, 48, 6)), threshold=0.2) -> dict:
    torch.set_num_threads(1)
    pipe = load_pipeline("cpu")
    calls = {"n": 0}
    pipe.transformer.transformer_blocks[-1].attn.register_forward_hook(lambda *a: calls.__setitem__("n", calls["n"] + 1))
    key, tested = tofu_sd.state.timestep_key, tofu_sd.hooks.tested_blocks

    def generate():
        calls["n"] = 0
        images = [
            pipe([caption(c)], num_inference_steps=20, guidance_scale=5.0, generator=[torch.Generator().manual_seed(1 + 1000 * c)],
                 output_type="np", **CALL_KWARGS).images
            for c in classes
        ]  # fmt: skip
        return torch.from_numpy(np.concatenate(images)).permute(0, 3, 1, 2), calls["n"] / (len(classes) * 20)

    full, _ = generate()
    fbc = next(c for c in CACHES if c.name == "fbcache")
    results = {}
    with cache_applied(pipe, fbc, threshold, 20, 5.0):
        images, runs = generate()
        results["fbcache alone"] = (runs, float(PairwiseMSSSIM()._score(images, full).mean()))
        for name, (options, held, first_unreduced) in VARIANTS.items():
            tofu_sd.state.timestep_key = (lambda t, d: key(None, d)) if held else key
            tofu_sd.hooks.tested_blocks = tested if first_unreduced else (lambda blocks: frozenset())
            tofu_sd.apply(pipe, **options)
            images, runs = generate()
            tofu_sd.remove(pipe)
            results[f"fbcache + tofu@0.5, {name}"] = (runs, float(PairwiseMSSSIM()._score(images, full).mean()))
    tofu_sd.state.timestep_key, tofu_sd.hooks.tested_blocks = key, tested
    for name, (runs, score) in results.items():
        print(f"{name:50s} other blocks run at {runs:.2f} of the steps, MS-SSIM vs full {score:.3f}")
    return results


if __name__ == "__main__":
    json.dump(main(), sys.stdout, indent=1)
