"""A whole StableDiffusionPipeline of tiny real components runs with Token Fusion applied."""

import copy

import numpy as np
import torch

import tofu_sd


def generate(pipe, **kw):
    return pipe(
        "A high-quality photograph of a goldfish.", num_inference_steps=2, height=32, width=32,
        generator=torch.Generator().manual_seed(0), output_type="np", **kw,
    ).images


def test_pipeline_two_steps_with_tofu(tiny_pipe_factory):
    pipe = tiny_pipe_factory()
    full = generate(pipe)
    seen = []
    handle = pipe.unet.down_blocks[0].attentions[0].transformer_blocks[0].attn1.to_q.register_forward_pre_hook(
        lambda _, args: seen.append(tuple(args[0].shape))
    )
    assert tofu_sd.apply(pipe, ratio=0.5) is pipe
    images = generate(pipe)
    handle.remove()
    # Classifier-free guidance: one batch of 2 per step, 16x16 latents = 256 tokens reduced to 128.
    assert seen == [(2, 128, 32)] * 2
    assert images.shape == full.shape == (1, 32, 32, 3) and np.isfinite(images).all()
    assert not np.array_equal(images, full)
    tofu_sd.remove(pipe)
    assert np.array_equal(generate(pipe), full)


def first_attn1_tokens(pipe, **kw):
    """The images, and the token shapes reaching the first patched self-attention at each step."""
    seen = []
    handle = pipe.unet.down_blocks[0].attentions[0].transformer_blocks[0].attn1.to_q.register_forward_pre_hook(
        lambda _, args: seen.append(tuple(args[0].shape))
    )
    try:
        return generate(pipe, **kw), seen
    finally:
        handle.remove()


def test_pipeline_three_images_without_guidance(tiny_pipe_factory):
    pipe = tiny_pipe_factory()
    tofu_sd.apply(pipe, ratio=0.5)
    images, seen = first_attn1_tokens(pipe, num_images_per_prompt=3, guidance_scale=1.0)
    assert seen == [(3, 128, 32)] * 2  # one batch of 3 per step (no CFG), reduced from 256 tokens
    assert images.shape == (3, 32, 32, 3) and np.isfinite(images).all()


def test_deep_copy_of_a_patched_pipeline_runs_its_own_unet(tiny_pipe_factory):
    pipe = tofu_sd.apply(tiny_pipe_factory(), ratio=0.5)
    images = generate(pipe)
    twin = copy.deepcopy(pipe)
    assert tofu_sd.get_state(twin) == tofu_sd.get_state(pipe) and twin.unet is not pipe.unet
    with torch.no_grad():
        for p in pipe.unet.parameters():  # changing the original's U-Net does not change the copy
            p.mul_(1.5)
    copied, seen = first_attn1_tokens(twin)
    assert np.array_equal(copied, images) and seen == [(2, 128, 32)] * 2
    assert not np.array_equal(generate(pipe), images)
