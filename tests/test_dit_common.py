"""Tiny diffusion transformers (SD3 / SD3.5, PixArt, Flux, Qwen-Image) for the diffusion-transformer tests,
recording helpers, and the tests that concern every architecture alike (the ``blocks`` option, dispatch, errors)."""

import contextlib
import functools
import types

import diffusers
import pytest
import torch
from packaging.version import Version
from diffusers import (
    FluxTransformer2DModel,
    PixArtTransformer2DModel,
    QwenImageTransformer2DModel,
    SD3Transformer2DModel,
)

import tofu_sd
from tofu_sd.families import family_of
from tofu_sd.reducing import REDUCE_HOOK
from tofu_sd.config import TokenFusionConfig, parse_blocks


class ShiftedPositions:
    """A matching whose kept tokens claim the first N - r positions (reduction and restore unchanged): the rotary
    rows a plausible bug would give, which the rotary tests' references must tell apart from the right ones."""

    def __init__(self, m):
        self.m = m

    def __getattr__(self, name):
        return getattr(self.m, name)

    @property
    def keep_idx(self):
        return torch.arange(self.m.num_tokens - self.m.r).expand(self.m.batch, -1)

# ---------------------------------------------------------------------------------------------------------
# Tiny models and their inputs.


#: The cases of the families (and of reduce="kv" on joint attentions) written and tested on diffusers 0.42.1: an
#: older diffusers is refused by their adapters (``Family.tested_diffusers``), so the minimum-versions run skips them.
NEWER_DIFFUSERS = pytest.mark.skipif(
    Version(diffusers.__version__) < Version("0.42.1"), reason="tested on diffusers >= 0.42.1; older ones are refused"
)


def tiny_sd3(num_layers=3, patch_size=2, dual_attention_layers=(), seed=0):
    """An SD3 (or, with ``dual_attention_layers``, SD3.5) transformer as diffusers' own tests size it."""
    torch.manual_seed(seed)
    return SD3Transformer2DModel(
        sample_size=16, patch_size=patch_size, in_channels=4, num_layers=num_layers, attention_head_dim=8,
        num_attention_heads=4, caption_projection_dim=32, joint_attention_dim=32, pooled_projection_dim=64,
        out_channels=4, dual_attention_layers=dual_attention_layers,
    ).eval()  # fmt: skip


def sd3_inputs(model, batch=2, height=16, width=12, text=5, timestep=500.0, seed=1):
    """Keyword arguments of an SD3 call on a ``height x width`` latent (the grid is that over the patch size)."""
    g = torch.Generator().manual_seed(seed)
    return {
        "hidden_states": torch.randn(batch, model.config.in_channels, height, width, generator=g),
        "encoder_hidden_states": torch.randn(batch, text, model.config.joint_attention_dim, generator=g),
        "pooled_projections": torch.randn(batch, model.config.pooled_projection_dim, generator=g),
        "timestep": torch.full((batch,), float(timestep)),
    }


def tiny_pixart(num_layers=3, seed=0):
    torch.manual_seed(seed)
    return PixArtTransformer2DModel(
        sample_size=8, num_layers=num_layers, patch_size=2, attention_head_dim=8, num_attention_heads=3,
        caption_channels=32, in_channels=4, cross_attention_dim=24, out_channels=8, attention_bias=True,
        activation_fn="gelu-approximate", num_embeds_ada_norm=1000, norm_type="ada_norm_single",
        norm_elementwise_affine=False, norm_eps=1e-6,
    ).eval()  # fmt: skip


def pixart_inputs(model, batch=2, height=12, width=8, text=6, timestep=500, seed=1):
    g = torch.Generator().manual_seed(seed)
    return {
        "hidden_states": torch.randn(batch, model.config.in_channels, height, width, generator=g),
        "encoder_hidden_states": torch.randn(batch, text, model.config.caption_channels, generator=g),
        "timestep": torch.full((batch,), timestep),
        "added_cond_kwargs": {"resolution": None, "aspect_ratio": None},
    }


def tiny_flux(num_layers=2, num_single_layers=2, seed=0):
    torch.manual_seed(seed)
    return FluxTransformer2DModel(
        patch_size=1, in_channels=4, num_layers=num_layers, num_single_layers=num_single_layers,
        attention_head_dim=16, num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=32,
        axes_dims_rope=[4, 4, 8],
    ).eval()  # fmt: skip


def grid_ids(h, w):
    """``img_ids`` of an ``h x w`` token grid, as FluxPipeline builds them: ``(0, row, col)`` row-major."""
    ids = torch.zeros(h * w, 3)
    ids[:, 1] = torch.arange(h * w) // w
    ids[:, 2] = torch.arange(h * w) % w
    return ids


def flux_inputs(model, batch=2, h=6, w=4, text=5, timestep=0.5, seed=1):
    """Keyword arguments of a Flux call on an ``h x w`` token grid (timesteps in [0, 1], as FluxPipeline's)."""
    g = torch.Generator().manual_seed(seed)
    return {
        "hidden_states": torch.randn(batch, h * w, model.config.in_channels, generator=g),
        "encoder_hidden_states": torch.randn(batch, text, model.config.joint_attention_dim, generator=g),
        "pooled_projections": torch.randn(batch, model.config.pooled_projection_dim, generator=g),
        "timestep": torch.full((batch,), float(timestep)),
        "img_ids": grid_ids(h, w),
        "txt_ids": torch.zeros(text, 3),
    }


def tiny_qwenimage(num_layers=2, seed=0):
    """A Qwen-Image transformer: 2 heads of 16 (rotary axes 4 + 6 + 6), 16 channels (4 packed 2 x 2)."""
    torch.manual_seed(seed)
    return QwenImageTransformer2DModel(
        patch_size=2, in_channels=16, out_channels=4, num_layers=num_layers, attention_head_dim=16,
        num_attention_heads=2, joint_attention_dim=16, axes_dims_rope=(4, 6, 6),
    ).eval()  # fmt: skip


def qwenimage_inputs(model, batch=2, h=6, w=4, text=5, timestep=0.5, seed=1, mask=None):
    """Keyword arguments of a Qwen-Image call on an ``h x w`` token grid, as QwenImagePipeline passes them
    (``img_shapes`` one ``(1, h, w)`` per batch element, timesteps in [0, 1]); ``mask``: the text's padding mask."""
    g = torch.Generator().manual_seed(seed)
    return {
        "hidden_states": torch.randn(batch, h * w, model.config.in_channels, generator=g),
        "encoder_hidden_states": torch.randn(batch, text, model.config.joint_attention_dim, generator=g),
        "encoder_hidden_states_mask": mask,
        "timestep": torch.full((batch,), float(timestep)),
        "img_shapes": [[(1, h, w)]] * batch,
    }


def run(model, inputs):
    with torch.no_grad():
        return model(**inputs).sample


def calls_in_threads(model, calls, repeats=3):
    """Each call of ``calls`` (keyword arguments) made alone, then ``repeats`` times in a thread of its own, all
    threads at once: ``(alone, results)``, ``results[i]`` the outputs of thread ``i``."""
    import threading

    alone = [run(model, c) for c in calls]
    results = {i: [] for i in range(len(calls))}

    def work(i):
        for _ in range(repeats):
            results[i].append(run(model, calls[i]))

    threads = [threading.Thread(target=work, args=(i,)) for i in range(len(calls))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return alone, results


def compiled_like_eager(model, inputs, **options):
    """Apply ``options`` to ``model`` and check that the patched model compiles with no graph break (fullgraph) and
    gives its eager output; returns the compiled model and the eager output."""
    tofu_sd.apply(model, **options)
    eager = run(model, inputs)
    explanation = torch._dynamo.explain(model)(**inputs)
    assert explanation.graph_break_count == 0, explanation.break_reasons
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    torch.testing.assert_close(run(compiled, inputs), eager, rtol=1e-4, atol=1e-5)
    return compiled, eager


def check_ratio_zero_then_compiled(model, inputs):
    """Ratio 0 is a no-op; ratio 0.5 changes the output and compiles (:func:`compiled_like_eager`). Returns the
    compiled model and the unpatched output."""
    full = run(model, inputs)
    tofu_sd.apply(model, ratio=0)
    assert torch.equal(run(model, inputs), full)
    compiled, eager = compiled_like_eager(model, inputs, ratio=0.5)
    assert not torch.allclose(eager, full, atol=1e-6)
    return compiled, full


# ---------------------------------------------------------------------------------------------------------
# Recording what reaches modules.


def hidden_states_arg(args, kwargs):
    return kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]


@contextlib.contextmanager
def recording(modules: dict, kind="pre"):
    """Record, per name, what each module receives (``pre``: ``(args, kwargs)``) or returns (``post``), once per
    call, with torch's own hooks (which run outside any diffusers hook on the module)."""
    seen = {name: [] for name in modules}
    handles = []
    for name, module in modules.items():
        if kind == "pre":
            fn = lambda mod, args, kwargs, name=name: seen[name].append((args, kwargs))
            handles.append(module.register_forward_pre_hook(fn, with_kwargs=True))
        else:
            fn = lambda mod, args, output, name=name: seen[name].append(output)
            handles.append(module.register_forward_hook(fn))
    try:
        yield seen
    finally:
        for h in handles:
            h.remove()


def first_dim1(args, kwargs):
    """Sequence length of a Linear's input."""
    return args[0].shape[1]


@contextlib.contextmanager
def capturing_matchings(model):
    """Record, per patched block name, the matching of each call (read from the block's attention hook)."""
    seen = {}
    handles = []
    for block in tofu_sd.patched_blocks(model):
        module = model.get_submodule(block.name)
        attn = next(getattr(module, name) for name in ("attn", "attn1", "attention") if hasattr(module, name))
        hook = attn._diffusers_hook.get_hook(REDUCE_HOOK)
        seen[block.name] = []
        fn = lambda mod, args, kwargs, name=block.name, hook=hook: seen[name].append(hook.state.matching)
        handles.append(attn.register_forward_pre_hook(fn, with_kwargs=True))
    try:
        yield seen
    finally:
        for h in handles:
            h.remove()


def destinations(m):
    """``(B, num_dst)`` the destination positions of a matching (the last ``num_dst`` kept tokens)."""
    return m.keep_idx[:, -m.num_dst :]


def assert_unpatched(model):
    """No Token Fusion hook, registry or hooked forward is left anywhere in ``model``."""
    assert not hasattr(model, "_tofu_sd") and not hasattr(model, "_tofu_sd_handles")
    assert not model._forward_pre_hooks and not model._forward_hooks
    for name, module in model.named_modules():
        assert "_diffusers_hook" not in module.__dict__, name
        assert "forward" not in module.__dict__, name


# ---------------------------------------------------------------------------------------------------------
# Tests common to every architecture.


@pytest.mark.parametrize(
    "spec,expected",
    [(None, None), ("0-3", (0, 1, 2, 3)), ("5, 0-1,9", (0, 1, 5, 9)), ((3, 1), (1, 3)), ([0], (0,)), (range(2), (0, 1))],
)
def test_parse_blocks(spec, expected):
    assert parse_blocks(spec) == expected
    config = TokenFusionConfig(blocks=spec)
    assert parse_blocks(config.blocks) == expected
    assert config.blocks is None or isinstance(config.blocks, (str, tuple))  # hashable, as the config


@pytest.mark.parametrize("spec", ["", "3-1", "a", "1-2-3", "-1", "0,,1", (1, 1), (-1,), (True,), (1.0,), 3, "0-2,2"])
def test_bad_blocks_are_refused(spec):
    with pytest.raises(ValueError, match="blocks"):
        TokenFusionConfig(blocks=spec)


def test_default_schedule_merges_with_mlerp_in_every_block():
    """analyze's proposal for the trained DiT (no block's FL near 1/sqrt(2)), for any number of blocks."""
    for model in (tiny_sd3(), tiny_flux(), tiny_pixart(), tiny_qwenimage()):
        family = family_of(model)
        assert [family.default_schedule([None] * n) for n in (1, 2, 3, 24, 57)] == ["M", "MM", "MMM", "M" * 24, "M" * 57]


def test_blocks_on_a_unet_is_refused(unet_sd15):
    with pytest.raises(ValueError, match="max_downsample"):
        tofu_sd.apply(unet_sd15, blocks="0-1")
    assert tofu_sd.get_state(unet_sd15) is None


@pytest.mark.parametrize("build", [tiny_sd3, tiny_pixart, tiny_flux, pytest.param(tiny_qwenimage, marks=NEWER_DIFFUSERS)])
def test_pipelines_and_compiled_models_dispatch_to_the_transformer(build):
    model = build()
    pipe = types.SimpleNamespace(transformer=torch.compile(model, backend="aot_eager"))
    assert tofu_sd.apply(pipe, ratio=0.5, blocks=(1,)) is pipe
    assert [b.name for b in tofu_sd.patched_blocks(pipe)] == ["transformer_blocks.1"]
    assert tofu_sd.get_state(model) is tofu_sd.get_state(pipe) is tofu_sd.get_state(pipe.transformer)
    tofu_sd.remove(pipe)
    assert tofu_sd.patched_blocks(pipe) == [] and tofu_sd.get_state(model) is None
    assert_unpatched(model)


def test_an_unsupported_transformer_is_refused():
    pipe = types.SimpleNamespace(transformer=torch.nn.Linear(2, 2))
    with pytest.raises(ValueError, match="SD3Transformer2DModel"):
        tofu_sd.apply(pipe)


@pytest.mark.parametrize("build", [tiny_sd3, tiny_pixart, tiny_flux, pytest.param(functools.partial(tiny_qwenimage, num_layers=3), marks=NEWER_DIFFUSERS)])
def test_unet_options_and_bad_block_indices_are_refused(build):
    model = build()
    with pytest.raises(ValueError, match="max_downsample=2 only means something for U-Nets"):
        tofu_sd.apply(model, max_downsample=2)
    with pytest.raises(ValueError, match=r"names block\(s\) 9, but the model has \d patchable blocks"):
        tofu_sd.apply(model, blocks="0,9")
    with pytest.raises(ValueError, match="schedule 'PM' has 2 letters but 3 blocks"):
        tofu_sd.apply(model, blocks="0-2", schedule="PM")
    with pytest.raises(ValueError, match="modules=.* chooses sub-modules of U-Net blocks"):
        tofu_sd.apply(model, modules="attn1,ff")
    assert_unpatched(model)


@pytest.mark.parametrize(
    "build,inputs", [(tiny_sd3, sd3_inputs), (tiny_flux, flux_inputs), pytest.param(tiny_qwenimage, qwenimage_inputs, marks=NEWER_DIFFUSERS)]
)
def test_deep_copy_is_patched_alike_and_independent(build, inputs):
    import copy

    model = build()
    x = inputs(model)
    full = run(model, x)
    tofu_sd.apply(model, ratio=0.5, blocks=(0, 1), schedule="PM")
    reduced = run(model, x)
    twin = copy.deepcopy(model)
    assert tofu_sd.get_state(twin) == tofu_sd.get_state(model)
    assert torch.equal(run(twin, x), reduced)
    tofu_sd.remove(model)  # the copy stays patched, on its own weights and hooks
    assert torch.equal(run(model, x), full) and torch.equal(run(twin, x), reduced)
    tofu_sd.remove(twin)
    assert_unpatched(twin)
    assert torch.equal(run(twin, x), full)


def test_threads_see_their_own_calls():
    """Two threads calling one patched model on different grids and timesteps get what each gets alone."""
    model = tiny_sd3(num_layers=2)
    tofu_sd.apply(model, ratio=0.5)
    calls = [sd3_inputs(model, height=16, width=12, timestep=700.0), sd3_inputs(model, height=10, width=14, timestep=300.0)]
    alone, results = calls_in_threads(model, calls)
    for i in range(2):
        assert len(results[i]) == 3
        for out in results[i]:
            assert torch.equal(out, alone[i])
