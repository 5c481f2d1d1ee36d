"""Token Fusion inside the pipelines users run: fused QKV projections and PAG with ``reduce="kv"``, and a pipeline
call that starts its own step count and matchings whatever came before (txt2img then img2img, an interrupted
call, a bare model with :func:`tofu_sd.reset_steps`)."""

import inspect

import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler, StableDiffusionImg2ImgPipeline, StableDiffusionInpaintPipeline, StableDiffusionPAGPipeline
from diffusers.models.attention_processor import PAGCFGIdentitySelfAttnProcessor2_0

import tofu_sd
from evaluation.tiny_random import tiny_pipeline, tiny_unet, tiny_unet_inputs
from tests.test_dit_common import pixart_inputs, tiny_pixart
from tofu_sd.reducing import KeyValueProjection


def unet_call(unet, inputs):
    with torch.no_grad():
        return unet(**inputs).sample


def pixart_call(model, inputs):
    with torch.no_grad():
        return model(**inputs).sample


def leftover_projections(model):
    return [name for name, m in model.named_modules() if isinstance(m.__dict__.get("to_kv"), KeyValueProjection)]


@pytest.mark.parametrize("fuse_first", [True, False], ids=["fuse-then-apply", "apply-then-fuse"])
@pytest.mark.parametrize(
    "build,inputs,run",
    [
        (lambda: tiny_unet("sd15"), tiny_unet_inputs, unet_call),
        (lambda: tiny_unet("sdxl"), tiny_unet_inputs, unet_call),
        (tiny_pixart, pixart_inputs, pixart_call),
    ],
    ids=["sd15", "sdxl", "pixart"],
)
def test_kv_with_fused_projections_equals_unfused(build, inputs, run, fuse_first):
    unfused = tofu_sd.apply(build(), 0.5, reduce="kv", **({"max_downsample": 2} if run is unet_call else {}))
    x = inputs(unfused)
    expected = run(unfused, x)
    assert not torch.allclose(expected, run(tofu_sd.remove(build()), x))  # kv reduces something
    model = build()
    options = {"reduce": "kv", **({"max_downsample": 2} if run is unet_call else {})}
    if fuse_first:
        model.fuse_qkv_projections()
        tofu_sd.apply(model, 0.5, **options)
    else:
        tofu_sd.apply(model, 0.5, **options)
        model.fuse_qkv_projections()
    torch.testing.assert_close(run(model, x), expected, rtol=1e-5, atol=1e-5)
    fused_alone = build()
    fused_alone.fuse_qkv_projections()
    tofu_sd.remove(model)
    assert not leftover_projections(model)
    assert torch.equal(run(model, x), run(fused_alone, x))


def _pag_pipe(layers):
    pipe = StableDiffusionPAGPipeline(**tiny_pipeline().components, pag_applied_layers=layers)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _pag_images(pipe, **kwargs):
    return pipe(
        "a red square", num_inference_steps=3, guidance_scale=5.0, pag_scale=3.0, height=32, width=32,
        generator=torch.Generator().manual_seed(0), output_type="np", **kwargs,
    ).images  # fmt: skip


def test_kv_with_pag_leaves_the_perturbed_layers_to_pag():
    """PAG's identity processors split the batch and take no keys or mask per branch: during PAG calls its layers
    run unreduced (perturbed as PAG defines); every other patched layer is still reduced."""
    pipe = _pag_pipe(["mid"])
    reference = _pag_images(pipe)
    tofu_sd.apply(pipe, 0.5, reduce="kv", max_downsample=4)
    mid = {b.name for b in tofu_sd.patched_blocks(pipe) if b.name.startswith("mid_block")}
    assert mid
    calls = {}
    handles = [
        pipe.unet.get_submodule(f"{b.name}.attn1").register_forward_pre_hook(
            lambda m, a, kw, name=b.name: calls.setdefault(name, []).append(
                (type(m.processor).__name__, kw.get("encoder_hidden_states") is not None)
            ),
            with_kwargs=True,
        )
        for b in tofu_sd.patched_blocks(pipe)
    ]
    images = _pag_images(pipe)
    for handle in handles:
        handle.remove()
    assert np.isfinite(images).all() and not np.allclose(images, reference)
    for name, seen in calls.items():
        pag = [kv for processor, kv in seen if processor.startswith("PAG")]
        assert (name in mid) == bool(pag), name
        assert not any(pag), name  # the hook left PAG's calls alone
    # the hooks' view of the PAG layers: the calls reaching the processor are PAG's own
    tofu_sd.remove(pipe)
    assert np.array_equal(_pag_images(pipe), reference)


@pytest.mark.parametrize("reduce", ["kv", "tokens"])
def test_sdxl_unet_with_pag_processors_in_its_mid_block(reduce):
    """SDXL's PAG pipeline, as its U-Net sees it: the mid block's self-attentions run PAG's CFG identity processor
    on a batch of three (unconditional, conditional, perturbed), with two levels patched."""
    unet = tiny_unet("sdxl")
    x = tiny_unet_inputs(unet, batch=3)
    pag = {name: PAGCFGIdentitySelfAttnProcessor2_0() for name in unet.attn_processors if name.startswith("mid_block") and "attn1" in name}
    unet.set_attn_processor({**unet.attn_processors, **pag})
    reference = unet_call(unet, x)
    tofu_sd.apply(unet, 0.5, reduce=reduce, max_downsample=2)
    assert any(b.name.startswith("mid_block") for b in tofu_sd.patched_blocks(unet))
    got = unet_call(unet, x)
    assert torch.isfinite(got).all() and not torch.allclose(got, reference)
    tofu_sd.remove(unet)
    assert torch.equal(unet_call(unet, x), reference)


def _pipe(**options):
    """The tiny pipeline with DDIM's "trailing" timesteps (3 or 4 steps end at 333 or 249, above the start of an
    img2img at strength 0.2), patched."""
    pipe = tiny_pipeline()
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config, timestep_spacing="trailing")
    return tofu_sd.apply(pipe, 0.5, **options)


def _latents(pipe, **kwargs):
    return pipe(
        "a blue circle", generator=torch.Generator().manual_seed(1), output_type="latent", guidance_scale=5.0,
        height=32, width=32, **kwargs,
    ).images  # fmt: skip


def _img2img(pipe, strength):
    image = torch.linspace(-1, 1, 3 * 32 * 32).reshape(1, 3, 32, 32)
    return _latents(StableDiffusionImg2ImgPipeline(**pipe.components), image=image, strength=strength, num_inference_steps=10)


def test_img2img_after_txt2img_starts_its_own_steps():
    """The img2img call (another pipeline from the same components) starts at a timestep below the txt2img call's
    last one: without a marked start it would continue the txt2img call's steps and reuse its matchings."""
    pipe = _pipe(rematch_every=2)
    _latents(pipe, num_inference_steps=3)  # steps at 999, 666, 333: the img2img's 199 would be step 3, a reuse step
    assert torch.equal(_img2img(pipe, 0.2), _img2img(_pipe(rematch_every=2), 0.2))


def _inpaint(pipe, strength):
    image = torch.linspace(-1, 1, 3 * 32 * 32).reshape(1, 3, 32, 32)
    mask = torch.zeros(1, 1, 32, 32)
    mask[..., 8:24, 8:24] = 1
    return _latents(StableDiffusionInpaintPipeline(**pipe.components), image=image, mask_image=mask, strength=strength,
                    num_inference_steps=10)  # fmt: skip


def test_inpainting_after_txt2img_starts_its_own_steps():
    """An inpainting call at a low strength after a txt2img call through the same components: its own steps and
    matchings, the latents of the same call made alone."""
    pipe = _pipe(rematch_every=2)
    _latents(pipe, num_inference_steps=3)
    assert torch.equal(_inpaint(pipe, 0.2), _inpaint(_pipe(rematch_every=2), 0.2))


def test_a_call_after_an_interrupted_one_starts_fresh():
    pipe = _pipe(rematch_every=3)

    def stop(p, i, t, kwargs):
        p._interrupt = i >= 1
        return kwargs

    _latents(pipe, num_inference_steps=4, callback_on_step_end=stop)  # ends after the step at 749
    assert torch.equal(_img2img(pipe, 0.5), _img2img(_pipe(rematch_every=3), 0.5))
    assert torch.equal(_latents(pipe, num_inference_steps=4), _latents(_pipe(rematch_every=3), num_inference_steps=4))


def test_remove_takes_the_call_markers_away():
    pipe = tiny_pipeline()
    before = {"pipe": dict(vars(pipe)), "scheduler": dict(vars(pipe.scheduler))}
    signature = inspect.signature(pipe.scheduler.set_timesteps)
    tofu_sd.apply(pipe, 0.5)
    assert "progress_bar" in vars(pipe) and "set_timesteps" in vars(pipe.scheduler)
    # pipelines ask the signature whether set_timesteps takes `sigmas` / `timesteps` (FluxPipeline does)
    assert inspect.signature(pipe.scheduler.set_timesteps) == signature
    tofu_sd.remove(pipe)
    assert dict(vars(pipe)).keys() == before["pipe"].keys() and dict(vars(pipe.scheduler)).keys() == before["scheduler"].keys()


def test_reset_steps_on_a_bare_model():
    """Two denoising sequences on a bare U-Net, the second starting below where the first ended: with
    ``reset_steps`` between them the second equals the same sequence on a fresh model."""
    unet = tofu_sd.apply(tiny_unet("sd15"), 0.5, rematch_every=2)
    x = tiny_unet_inputs(unet)
    first = [dict(x, timestep=torch.tensor(t)) for t in (900, 600, 300)]
    second = [dict(x, timestep=torch.tensor(t)) for t in (200, 100)]
    fresh = tofu_sd.apply(tiny_unet("sd15"), 0.5, rematch_every=2)
    expected = [unet_call(fresh, inputs) for inputs in second]
    for inputs in first:
        unet_call(unet, inputs)
    continued = unet_call(unet, second[0])
    assert not torch.equal(continued, expected[0])  # it took step 2's place: a reuse step of the first sequence
    for inputs in first:
        unet_call(unet, inputs)
    tofu_sd.reset_steps(unet)
    assert all(torch.equal(unet_call(unet, inputs), out) for inputs, out in zip(second, expected))
