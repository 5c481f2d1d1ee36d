"""Which patched blocks a step cache on the same model tests, so that Token Fusion leaves them unreduced.

diffusers' First Block Cache decides at every step whether to skip all blocks but the first by comparing the
first block's residual (output minus input) with the one of the last step it computed. Reduced tokens would add
Token Fusion's own step-to-step change to that residual (its random partition changes with the timestep), so the
cache would skip less than alone, or never. Measured on the built-in ``tiny-sd3`` (8 prompts, 20 steps,
FirstBlockCache at 0.2, ``tofu@0.5``): the cache alone ran the other blocks at 50% of the steps, with Token
Fusion in every block at 62%; with the first block left unreduced at 49% (MS-SSIM against full on those 8
images: 0.695 and 0.669). Holding the partition fixed across steps instead let the cache skip, 52%, but lost
far more fidelity (0.560).

So at every model call, the blocks carrying a cache's test hook are looked up (on the host, outside compiled
graphs) and left unreduced for that call: the cache's test then sees exactly what it sees alone. Caches that
decide by a fixed schedule or calibrated ratios (TaylorSeer, MagCache, PyramidAttentionBroadcast, FasterCache)
have no such block.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

try:  # diffusers >= 0.33
    from diffusers.hooks.first_block_cache import FBCHeadBlockHook

    TEST_HOOKS: tuple[type, ...] = (FBCHeadBlockHook,)
except ImportError:  # a release without First Block Cache: no block is tested
    TEST_HOOKS = ()


def tested_blocks(blocks: Sequence[torch.nn.Module]) -> frozenset[int]:
    """The indices of ``blocks`` whose output a step cache compares from step to step (First Block Cache's head
    block), found by the hooks in each block's diffusers registry."""
    found = set()
    for index, block in enumerate(blocks):
        registry = getattr(block, "_diffusers_hook", None)
        if registry is not None and any(isinstance(hook, TEST_HOOKS) for hook in registry.hooks.values()):
            found.add(index)
    return frozenset(found)
