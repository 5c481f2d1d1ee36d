"""Token Fusion with diffusers' step caches on one transformer (a tiny Flux, run as FluxPipeline runs it: each step
in a ``cache_context``, the caches' state reset after the call). Against the cache alone and Token Fusion alone:
either order of application gives the same outputs; ``tofu_sd.remove`` leaves exactly the cache (outputs and
hooks), and the cache's removal leaves exactly Token Fusion; what a cache stores is the module's full-token output;
a deep copy of a model carrying both is refused with a clear message."""

import copy

import pytest
import torch

# The module-level references build every cache: MagCacheConfig is new in diffusers 0.37, TaylorSeerCacheConfig in
# 0.36 (pyproject.toml's floor is 0.35, which .ci/min-versions tests).
pytest.importorskip("diffusers", minversion="0.37", reason="diffusers' MagCache is new in 0.37")

from diffusers.hooks import (  # noqa: E402
    FasterCacheConfig,
    FirstBlockCacheConfig,
    HookRegistry,
    MagCacheConfig,
    PyramidAttentionBroadcastConfig,
    TaylorSeerCacheConfig,
    apply_pyramid_attention_broadcast,
)

import tofu_sd
from tests.test_dit_common import flux_inputs, pixart_inputs, sd3_inputs, tiny_flux, tiny_pixart, tiny_sd3

STEPS = 6
CLOCK = {"t": 1000.0}  # the pipeline's current timestep, read by PAB and FasterCache


def _timestep() -> float:
    return CLOCK["t"]


def config(name):
    """A fresh config of each cache, set so that it skips work within 6 steps of a tiny random model."""
    return {
        "fbc": lambda: FirstBlockCacheConfig(threshold=0.6),
        "taylorseer": lambda: TaylorSeerCacheConfig(cache_interval=2, disable_cache_before_step=1, taylor_factors_dtype=torch.float32),
        "taylorseer-lite": lambda: TaylorSeerCacheConfig(
            cache_interval=2, disable_cache_before_step=1, use_lite_mode=True, taylor_factors_dtype=torch.float32
        ),
        "magcache": lambda: MagCacheConfig(threshold=0.5, num_inference_steps=STEPS, mag_ratios=[1.0] * STEPS, retention_ratio=0.0),
        "pab": lambda: PyramidAttentionBroadcastConfig(
            spatial_attention_block_skip_range=2, spatial_attention_timestep_skip_range=(-1, 1001),
            current_timestep_callback=_timestep,
        ),
        "fastercache": lambda: FasterCacheConfig(
            spatial_attention_block_skip_range=2, spatial_attention_timestep_skip_range=(-1, 901),
            current_timestep_callback=_timestep, is_guidance_distilled=True, attention_weight_callback=lambda _: 0.5,
        ),
    }[name]()


CACHES = ["fbc", "taylorseer", "taylorseer-lite", "magcache", "pab", "fastercache"]


def denoise(model, inputs=flux_inputs, scale=1.0):
    """``STEPS`` Euler steps of ``model`` on fixed inputs; the stacked outputs."""
    x = inputs(model)
    latents, outputs = x["hidden_states"], []
    for i in range(STEPS):
        t = 1.0 - i / STEPS
        CLOCK["t"] = t * 1000
        with torch.no_grad(), model.cache_context("cond") if hasattr(model, "cache_context") else _nothing():
            v = model(**dict(x, hidden_states=latents, timestep=torch.full((latents.shape[0],), t * scale))).sample
        v = v[:, : latents.shape[1]]  # PixArt also predicts a variance
        outputs.append(v)
        latents = latents - v / STEPS
    if hasattr(model, "_reset_stateful_cache"):
        model._reset_stateful_cache()  # as the pipeline does at the end of a call (maybe_free_model_hooks)
    return torch.stack(outputs)


class _nothing:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return False


def registries(model):
    """Each module's registry hooks, by name, in order (what a patch could leave behind or reorder)."""
    return {
        name: list(module._diffusers_hook._hook_order)
        for name, module in model.named_modules()
        if getattr(module, "_diffusers_hook", None) is not None and module._diffusers_hook._hook_order
    }


def both(base, name, tofu_first):
    """A copy of ``base`` with Token Fusion and the cache ``name``, applied in the order given."""
    model = copy.deepcopy(base)
    if tofu_first:
        tofu_sd.apply(model, ratio=0.5)
    model.enable_cache(config(name))
    if not tofu_first:
        tofu_sd.apply(model, ratio=0.5)
    return model


@pytest.fixture(scope="module")
def references():
    base = tiny_flux()
    cached = {}
    for name in CACHES:
        model = copy.deepcopy(base)
        model.enable_cache(config(name))
        cached[name] = (denoise(model), registries(model))
    tofu = denoise(tofu_sd.apply(copy.deepcopy(base), ratio=0.5))
    return base, denoise(base), tofu, cached


@pytest.mark.parametrize("name", CACHES)
def test_either_order_gives_the_same_outputs(references, name):
    base, full, tofu, cached = references
    together = denoise(both(base, name, tofu_first=True))
    assert torch.equal(together, denoise(both(base, name, tofu_first=False)))
    assert not torch.equal(cached[name][0], full), "the cache skips nothing: the test would prove nothing"
    assert not torch.equal(together, cached[name][0]) and not torch.equal(together, tofu)  # both are active


@pytest.mark.parametrize("tofu_first", [True, False], ids=["tofu-then-cache", "cache-then-tofu"])
@pytest.mark.parametrize("name", CACHES)
def test_removing_token_fusion_leaves_exactly_the_cache(references, name, tofu_first):
    base, _, _, cached = references
    model = both(base, name, tofu_first)
    denoise(model)
    tofu_sd.remove(model)
    assert registries(model) == cached[name][1]
    assert torch.equal(denoise(model), cached[name][0])  # bit for bit, with the cache still skipping


@pytest.mark.parametrize("tofu_first", [True, False], ids=["tofu-then-cache", "cache-then-tofu"])
@pytest.mark.parametrize("name", CACHES)
def test_removing_the_cache_leaves_exactly_token_fusion(references, name, tofu_first):
    base, _, tofu, _ = references
    model = both(base, name, tofu_first)
    denoise(model)
    model.disable_cache()
    assert torch.equal(denoise(model), tofu)
    tofu_sd.remove(model)
    assert registries(model) == {}


@pytest.mark.parametrize("name", ["pab", "fastercache", "taylorseer"])
def test_a_cache_stores_the_attention_output_its_neighbours_see(references, name):
    """Applied before Token Fusion, an attention cache still wraps the whole attention: what it stores at a computing
    step is the attention's full-token output, the one the block receives (not the reduced one)."""
    base = references[0]
    model = copy.deepcopy(base)
    model.enable_cache(config(name))
    tofu_sd.apply(model, ratio=0.5)
    attn = model.transformer_blocks[0].attn
    seen = []
    handle = attn.register_forward_hook(lambda m, a, out: seen.append(out[0] if isinstance(out, tuple) else out))
    hook = next(h for h in attn._diffusers_hook.hooks.values() if not type(h).__module__.startswith("tofu_sd"))
    x = flux_inputs(model)
    with torch.no_grad(), model.cache_context("cond"):
        CLOCK["t"] = 1000.0
        model(**dict(x, timestep=torch.full((2,), 1.0)))
        state = hook.state_manager.get_state() if hasattr(hook, "state_manager") else hook.state
    handle.remove()
    stored = {
        "pab": lambda: state.cache,
        "fastercache": lambda: state.cache[-1],
        "taylorseer": lambda: state.taylor_factors[0][0],
    }[name]()
    stored = stored[0] if isinstance(stored, (tuple, list)) else stored
    assert stored.shape[1] == x["hidden_states"].shape[1]  # every image token, not N - r
    torch.testing.assert_close(stored.to(seen[0].dtype), seen[0], rtol=0, atol=0)
    model._reset_stateful_cache()


def test_a_deep_copy_of_a_model_with_both_is_refused_clearly(references):
    model = copy.deepcopy(references[0])
    model.enable_cache(config("fbc"))
    tofu_sd.apply(model, ratio=0.5)
    with pytest.raises(TypeError, match="cannot deep-copy.*diffusers hooks besides Token Fusion's"):
        copy.deepcopy(model)


@pytest.mark.parametrize(
    "build,inputs,scale", [(tiny_sd3, sd3_inputs, 1000.0), (tiny_pixart, pixart_inputs, 1000.0)], ids=["sd3", "pixart"]
)
def test_pyramid_attention_broadcast_on_the_other_transformers(build, inputs, scale):
    """PAB needs no cache context, so it runs on SD3 and PixArt too (diffusers' other caches need the context
    that only CacheMixin models and their pipelines set)."""
    base = build()
    alone = copy.deepcopy(base)
    apply_pyramid_attention_broadcast(alone, config("pab"))
    expected = denoise(alone, inputs, scale)
    tofu = denoise(tofu_sd.apply(copy.deepcopy(base), ratio=0.5), inputs, scale)
    outputs = []
    for tofu_first in (True, False):
        model = copy.deepcopy(base)
        if tofu_first:
            tofu_sd.apply(model, ratio=0.5)
        apply_pyramid_attention_broadcast(model, config("pab"))
        if not tofu_first:
            tofu_sd.apply(model, ratio=0.5)
        outputs.append(denoise(model, inputs, scale))
        tofu_sd.remove(model)
        assert torch.equal(denoise(model, inputs, scale), expected)
    assert torch.equal(outputs[0], outputs[1]) and not torch.equal(outputs[0], tofu)


def test_token_fusion_goes_innermost_in_the_registry(references):
    """The registry fields that tofu_sd.hooking relies on, and where its hooks go."""
    model = copy.deepcopy(references[0])
    model.enable_cache(config("pab"))
    tofu_sd.apply(model)
    registry = model.transformer_blocks[0].attn._diffusers_hook
    assert isinstance(registry, HookRegistry) and len(registry._fn_refs) == len(registry._hook_order) == 2
    assert registry._hook_order[0] == "tofu_sd.reduce"


def tail_runs(model, steps=8):
    """``steps`` calls of ``model`` (each in a cache context) on inputs fixed in advance, not drawn from its outputs:
    per call, whether the blocks after the first ran (the last block's attention was called), and the numbers of
    image tokens that the first two double-stream blocks' attentions projected to queries."""
    x = flux_inputs(model)
    ran, seen = [], {0: set(), 1: set()}
    handles = [model.single_transformer_blocks[-1].attn.register_forward_hook(lambda *a: ran.append(True))]
    for i in seen:
        hook = lambda m, args, i=i: seen[i].add(args[0].shape[1])  # noqa: E731 (a closure per block)
        handles.append(model.transformer_blocks[i].attn.to_q.register_forward_pre_hook(hook))
    decisions = []
    for i in range(steps):
        before = len(ran)
        with torch.no_grad(), model.cache_context("cond"):
            model(**dict(x, hidden_states=x["hidden_states"] * (1 - 0.01 * i), timestep=torch.full((2,), 1 - i / steps)))
        decisions.append(len(ran) > before)
    for handle in handles:
        handle.remove()
    model._reset_stateful_cache()
    return decisions, seen


@pytest.mark.parametrize("tofu_first", [True, False], ids=["tofu-then-cache", "cache-then-tofu"])
def test_first_block_cache_decides_as_alone_its_first_block_unreduced(references, tofu_first, monkeypatch):
    """First Block Cache compares its first block's residual from step to step: Token Fusion leaves that block
    unreduced (every other block reduced), so the cache skips at exactly the steps it skips alone; reducing it
    too (its partition changes with the timestep) makes the cache compute at every step here."""
    base = references[0]
    alone = copy.deepcopy(base)
    alone.enable_cache(FirstBlockCacheConfig(threshold=0.3))
    expected, _ = tail_runs(alone)
    assert True in expected and False in expected, "the cache must both skip and compute for the test to say anything"
    model = copy.deepcopy(base)
    if tofu_first:
        tofu_sd.apply(model, ratio=0.5)
    model.enable_cache(FirstBlockCacheConfig(threshold=0.3))
    if not tofu_first:
        tofu_sd.apply(model, ratio=0.5)
    decisions, seen = tail_runs(model)
    assert decisions == expected
    assert seen == {0: {24}, 1: {12}}  # the head block on all 6 x 4 tokens, the next one on half
    monkeypatch.setattr("tofu_sd.hooks.tested_blocks", lambda blocks: frozenset())  # the head reduced too
    assert tail_runs(model)[0] == [True] * 8
    monkeypatch.undo()
    model.disable_cache()
    assert tail_runs(model)[1] == {0: {12}, 1: {12}}  # no cache: the head block is reduced again
