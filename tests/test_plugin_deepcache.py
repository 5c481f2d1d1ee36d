"""Token Fusion stacked with DeepCache, in both orders, on a tiny StableDiffusionPipeline.

DeepCache wraps modules by assigning ``module.forward`` (the U-Net, its down / mid / up blocks and their
transformers, resnets and samplers) and puts back what it saved when disabled. Token Fusion's outer hooks (the
U-Net's timestep, each ``Transformer2DModel``'s feature map) are torch's own module hooks, which run in
``Module.__call__`` whatever ``forward`` is, so neither package discards or keeps alive the other's wrappers:
each can be enabled first, and each can be disabled while the other stays exactly as it is alone.

With ``cache_interval=3`` and ``cache_branch_id=0``, DeepCache computes the whole U-Net at steps 0 and 3 of 4
and, at the other (cached) steps, only the shallow branch: of the transformers, the last one of the last up
block (``up_blocks.2.attentions.2``, patched), which Token Fusion still reduces.
"""

import numpy as np
import pytest
import torch

import tofu_sd
from evaluation.tiny_random import tiny_pipeline

DeepCacheSDHelper = pytest.importorskip("DeepCache").DeepCacheSDHelper

STEPS = 4
SHALLOW = "up_blocks.2.attentions.2.transformer_blocks.0"  # patched, runs at DeepCache's cached steps too
DEEP_PATCHED = "up_blocks.2.attentions.0.transformer_blocks.0"  # patched, cached
DEEP = "mid_block.attentions.0.transformer_blocks.0"  # not patched, cached
ORDERS = ["tofu-first", "deepcache-first"]


def generate(pipe):
    """The final latents of a 4-step call (classifier-free guidance: a batch of 2 per step, 16x16 latents)."""
    with torch.no_grad():
        return pipe(
            "A high-quality photograph of a goldfish.", num_inference_steps=STEPS, height=32, width=32,
            generator=torch.Generator().manual_seed(0), output_type="latent",
        ).images  # fmt: skip


def enable_deepcache(pipe, interval=3):
    helper = DeepCacheSDHelper(pipe=pipe)
    helper.set_params(cache_interval=interval, cache_branch_id=0)
    helper.enable()
    return helper


def tofu(pipe):
    return tofu_sd.apply(pipe, ratio=0.5, seed=1)


def both(order, interval=3):
    """A pipeline with Token Fusion and DeepCache enabled in ``order``, and DeepCache's helper."""
    pipe = tiny_pipeline()
    if order == "tofu-first":
        tofu(pipe)
        return pipe, enable_deepcache(pipe, interval)
    helper = enable_deepcache(pipe, interval)
    tofu(pipe)
    return pipe, helper


def forwards(pipe):
    """Every module's instance ``forward`` attribute (None where it has none), by name."""
    return {name: module.__dict__.get("forward") for name, module in pipe.unet.named_modules()}


def no_torch_hooks(pipe):
    return not any(m._forward_pre_hooks or m._forward_hooks for m in pipe.unet.modules())


def token_counts(pipe, names):
    """The images, and for each block name the token counts reaching its attn1's queries, call by call."""
    counts, handles = {name: [] for name in names}, []
    for name in names:
        to_q = pipe.unet.get_submodule(f"{name}.attn1.to_q")
        handles.append(to_q.register_forward_pre_hook(lambda _, args, name=name: counts[name].append(args[0].shape[1])))
    try:
        return generate(pipe), counts
    finally:
        for handle in handles:
            handle.remove()


@pytest.fixture(scope="module")
def outputs():
    """Reference outputs of fresh pipelines: plain, Token Fusion alone, DeepCache alone."""
    return {
        "full": generate(tiny_pipeline()),
        "tofu": generate(tofu(tiny_pipeline())),
        "deepcache": generate(enable_deepcache(tiny_pipeline()).pipe),
    }


def test_the_references_differ(outputs):
    assert not np.array_equal(outputs["full"], outputs["tofu"])
    assert not np.array_equal(outputs["full"], outputs["deepcache"])


@pytest.mark.parametrize("order", ORDERS)
def test_with_cache_interval_1_deepcache_changes_nothing(order, outputs):
    pipe, _ = both(order, interval=1)
    assert np.array_equal(generate(pipe), outputs["tofu"])


@pytest.mark.parametrize("order", ORDERS)
def test_cached_steps_skip_the_deep_blocks_and_tofu_still_reduces(order, outputs):
    pipe, _ = both(order)
    images, counts = token_counts(pipe, [SHALLOW, DEEP_PATCHED, DEEP])
    assert counts[SHALLOW] == [128] * STEPS  # every step, reduced from 256
    assert counts[DEEP_PATCHED] == [128] * 2  # steps 0 and 3 only, reduced
    assert counts[DEEP] == [16] * 2  # steps 0 and 3 only, a 4x4 map, not patched
    assert not np.array_equal(images, outputs["deepcache"]) and not np.array_equal(images, outputs["tofu"])
    other, _ = both(ORDERS[1 - ORDERS.index(order)])
    assert np.array_equal(generate(other), images)  # the order of enabling does not matter


@pytest.mark.parametrize("order", ORDERS)
def test_disabling_deepcache_leaves_token_fusion_alone(order, outputs):
    pipe, helper = both(order)
    generate(pipe)
    helper.disable()
    images, counts = token_counts(pipe, [SHALLOW, DEEP_PATCHED])
    assert counts == {SHALLOW: [128] * STEPS, DEEP_PATCHED: [128] * STEPS}
    assert np.array_equal(images, outputs["tofu"])


@pytest.mark.parametrize("order", ORDERS)
def test_remove_leaves_deepcache_alone_exactly(order, outputs):
    pipe = tiny_pipeline()
    if order == "deepcache-first":
        helper = enable_deepcache(pipe)
        expected = forwards(pipe)  # as before Token Fusion was applied
        tofu(pipe)
    else:
        before = forwards(tofu(pipe))
        helper = enable_deepcache(pipe)
        after = forwards(pipe)
        # DeepCache's wrappers stay; what Token Fusion installed goes.
        expected = {name: f if f is not before[name] else None for name, f in after.items()}
        assert expected[""] is not None and expected["down_blocks.0.attentions.0"] is not None
    generate(pipe)
    tofu_sd.remove(pipe)
    assert forwards(pipe) == expected and no_torch_hooks(pipe)
    images, counts = token_counts(pipe, [SHALLOW, DEEP_PATCHED])
    assert counts == {SHALLOW: [256] * STEPS, DEEP_PATCHED: [256] * 2}
    assert np.array_equal(images, outputs["deepcache"])
    helper.disable()
    assert np.array_equal(generate(pipe), outputs["full"])


@pytest.mark.parametrize("order", ORDERS)
def test_reapplying_and_removing_both(order, outputs):
    """Token Fusion applied again under DeepCache replaces its patch; then both go, in either order."""
    pipe, helper = both(order)
    tofu_sd.apply(pipe, ratio=0.25)
    tofu(pipe)
    first = generate(pipe)
    fresh, _ = both(order)
    assert np.array_equal(first, generate(fresh))
    if order == "tofu-first":
        helper.disable()
        tofu_sd.remove(pipe)
    else:
        tofu_sd.remove(pipe)
        helper.disable()
    assert np.array_equal(generate(pipe), outputs["full"]) and no_torch_hooks(pipe)
