"""How ``tofu-sd generate`` and ``analyze`` call a pipeline of each kind: the arguments its sampling options become
(guidance, frames), its native size and the side multiple it needs, and the images of its output.

Most pipelines take ``guidance_scale`` as it is. The newer families differ:

- Qwen-Image (not guidance-distilled): its classifier-free guidance is ``true_cfg_scale``, and it runs only with
  a negative prompt, so ``--guidance-scale`` becomes ``true_cfg_scale`` with the negative prompt ``" "`` (the
  model card's); ``guidance_scale`` would be ignored.
- FLUX.2: ``guidance_scale`` is the distilled guidance the transformer takes as an input (one call per step).
- Sana: ``use_resolution_binning=False``, so the model runs at the size asked (binning would run it at the
  nearest trained aspect ratio and resize the image back).
- Wan (text to video): ``num_frames`` is ``--frames`` (default: the pipeline's, 81); the output is a video,
  whose frames :func:`output_images` returns per prompt.
"""

from __future__ import annotations

import inspect
import math

from .errors import EvaluationError
from .families import transformer_and_family


def family_name(pipe) -> str | None:
    """The tofu_sd family name of the pipeline's diffusion transformer; None for a U-Net pipeline."""
    try:
        return transformer_and_family(pipe)[1].name
    except ValueError:
        return None


def call_parameters(pipe) -> dict[str, inspect.Parameter]:
    return dict(inspect.signature(type(pipe).__call__).parameters)


def is_video(pipe) -> bool:
    """Whether the pipeline makes videos (its call takes ``num_frames``)."""
    return "num_frames" in call_parameters(pipe)


def check_text_to_image(pipe, model: str) -> None:
    """EvaluationError for a pipeline whose call needs an input image (image-to-image, image-to-video)."""
    needed = [name for name, p in call_parameters(pipe).items() if name == "image" and p.default is inspect.Parameter.empty]
    if needed:
        raise EvaluationError(
            f"--model {model!r} is a {type(pipe).__name__}, whose call needs an input image; generate and analyze "
            "make images (or videos) from text prompts only: give the model's text-to-image (text-to-video) pipeline"
        )


def check_frames(pipe, frames: int | None) -> None:
    """EvaluationError, before anything is generated, for ``--frames`` on an image pipeline, or a frame count
    the video pipeline's VAE cannot encode whole (Wan: ``4 k + 1`` frames)."""
    if frames is None:
        return
    if not is_video(pipe):
        raise EvaluationError(f"--frames {frames} is for video pipelines; a {type(pipe).__name__} makes images: leave it out")
    stride = int(getattr(pipe, "vae_scale_factor_temporal", 1) or 1)
    if (frames - 1) % stride:
        near = max(1, (frames - 1) // stride * stride + 1)
        raise EvaluationError(
            f"--frames must be {stride} k + 1 for a {type(pipe).__name__} (its VAE encodes {stride} frames per latent "
            f"frame after the first), got {frames}; e.g. {near} or {near + stride}"
        )


def call_arguments(pipe, guidance_scale: float, frames: int | None) -> dict:
    """The keyword arguments besides prompts, steps, size and generators that a call of ``pipe`` takes for these
    sampling options (see the module's docstring)."""
    family = family_name(pipe)
    arguments = {"guidance_scale": guidance_scale}
    if family == "Qwen-Image" and not getattr(pipe.transformer.config, "guidance_embeds", False):
        arguments = {"true_cfg_scale": guidance_scale, "negative_prompt": " "}
    if family == "Sana":
        arguments["use_resolution_binning"] = False
    if frames is not None and is_video(pipe):
        arguments["num_frames"] = frames
    return arguments


def output_images(pipe, output) -> list:
    """The images of a call's output (``output_type="pil"``): one PIL image per prompt, or for a video
    pipeline one list of frames per prompt."""
    return output.frames if is_video(pipe) else output.images


def middle_frame(frames: list):
    """The frame that stands for a video in the run's image folder (frame ``len // 2``)."""
    return frames[len(frames) // 2]


def default_sides(pipe) -> tuple[int, int]:
    """(height, width) the pipeline makes by default: its model's sample size times the VAE's scale, else its
    call's own defaults (Wan: 480 x 832)."""
    if getattr(pipe, "unet", None) is not None:
        side = int(pipe.unet.config.sample_size * pipe.vae_scale_factor)
        return side, side
    sample = getattr(pipe, "default_sample_size", None) or getattr(pipe.transformer.config, "sample_size", None)
    scale = getattr(pipe, "vae_scale_factor", None)
    if sample and scale:
        return int(sample * scale), int(sample * scale)
    params = call_parameters(pipe)
    height, width = params["height"].default, params["width"].default
    if not (isinstance(height, int) and isinstance(width, int)):
        raise EvaluationError(f"{type(pipe).__name__} says no default size; give --height and --width")
    return height, width


def side_multiple(pipe, base: int) -> tuple[int, str]:
    """The multiple every image side must be for ``pipe``, and why: the VAE's scale times the transformer's
    patch (2 x 2 where the pipeline packs latents), and a multiple of ``base`` (every pipeline's own rule)."""
    scale = int(getattr(pipe, "vae_scale_factor", None) or getattr(pipe, "vae_scale_factor_spatial", None) or 1)
    if getattr(pipe, "unet", None) is not None or getattr(pipe, "transformer", None) is None:
        return math.lcm(base, scale), (
            f"{type(pipe).__name__} needs multiples of {base}; its VAE scale factor is {scale}"
        )
    patch = getattr(pipe.transformer.config, "patch_size", 1) or 1
    patch = 2 if hasattr(pipe, "_pack_latents") else int(patch[-1] if isinstance(patch, (list, tuple)) else patch)
    why = f"{type(pipe).__name__}'s VAE scale factor is {scale} and its transformer's patches are {patch} pixels of latent wide"
    return math.lcm(base, scale * patch), why
