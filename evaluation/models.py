"""Loading the Stable Diffusion pipeline to generate with: a hub id, a local folder, or the offline ``tiny`` one."""

from __future__ import annotations

import torch

from .errors import EvaluationError

DEFAULT_MODEL = "stable-diffusion-v1-5/stable-diffusion-v1-5"
TINY = "tiny"  # the built-in model trained on coloured shapes (evaluation/shapes/model), offline
TINY_RANDOM = "tiny-random"  # random-weight tiny configs (evaluation/tiny_random.py): fast, for tests, draws noise
BUILTIN_MODELS = (TINY, TINY_RANDOM)

# --scheduler names -> diffusers scheduler classes (built from the model's own scheduler config).
SCHEDULERS = {
    "ddim": "DDIMScheduler",
    "pndm": "PNDMScheduler",
    "euler": "EulerDiscreteScheduler",
    "euler-a": "EulerAncestralDiscreteScheduler",
    "dpm++": "DPMSolverMultistepScheduler",
    "unipc": "UniPCMultistepScheduler",
}
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def resolve_device(device: str) -> torch.device:
    """``auto`` is CUDA, then MPS, then CPU."""
    if device == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        resolved = torch.device(device)
    except RuntimeError as error:
        raise EvaluationError(f"unknown --device {device!r}: {error}") from error
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise EvaluationError(f"--device {device} asked for CUDA, but torch sees no CUDA GPU here; use --device cpu")
    return resolved


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    """``auto`` is fp16 on CUDA / MPS and fp32 on the CPU."""
    if dtype == "auto":
        return torch.float16 if device.type in ("cuda", "mps") else torch.float32
    if dtype not in DTYPES:
        raise EvaluationError(f"unknown --dtype {dtype!r}; choose from auto, {', '.join(DTYPES)}")
    return DTYPES[dtype]


def default_prompt_set(model: str) -> str:
    """The prompt set a model was made for: its own shape classes for the built-in model, ImageNet otherwise."""
    return "shapes" if model == TINY else "imagenet"


def builtin_model_dir():
    """The folder of the built-in trained model, installed with the package."""
    from .shapes import MODEL_DIR

    return MODEL_DIR


def load_pipeline(model: str, device: torch.device, dtype: torch.dtype, scheduler: str | None = None):
    """The text-to-image pipeline of ``model`` on ``device``, with a U-Net, progress bar off."""
    import diffusers

    if model == TINY_RANDOM:
        from .tiny_random import tiny_pipeline

        pipe = tiny_pipeline()
        if dtype != torch.float32:
            pipe = pipe.to(dtype=dtype)
    elif model == TINY:
        folder = builtin_model_dir()
        if not (folder / "model_index.json").is_file():
            raise EvaluationError(
                f"the built-in model is missing from {folder}; reinstall tofu-sd, or train it with "
                "`python -m evaluation.shapes.train`"
            )
        pipe = diffusers.StableDiffusionPipeline.from_pretrained(folder, torch_dtype=dtype, local_files_only=True)
    else:
        try:
            pipe = diffusers.AutoPipelineForText2Image.from_pretrained(model, torch_dtype=dtype)
        except Exception as error:
            raise EvaluationError(
                f"could not load --model {model!r} ({type(error).__name__}: {str(error).splitlines()[0][:300]}). "
                "--model takes a Hugging Face hub id (downloaded once, then cached), a local diffusers folder, "
                f"or '{TINY}' for the built-in offline model."
            ) from error
    if getattr(pipe, "unet", None) is None:
        raise EvaluationError(
            f"--model {model!r} is a {type(pipe).__name__} without a U-Net; token reduction here supports "
            "U-Net Stable Diffusion models (SD 1.x, 2.x, SDXL)."
        )
    if scheduler is not None:
        if scheduler not in SCHEDULERS:
            raise EvaluationError(f"unknown --scheduler {scheduler!r}; choose from {', '.join(SCHEDULERS)}")
        pipe.scheduler = getattr(diffusers, SCHEDULERS[scheduler]).from_config(pipe.scheduler.config)
    pipe = pipe.to(device)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def default_size(pipe) -> int:
    """The pipeline's native image side: U-Net sample size times the VAE's scale factor."""
    return int(pipe.unet.config.sample_size * pipe.vae_scale_factor)
