"""Loading the pipeline to generate with: a hub id, a local folder, or a built-in offline one (``tiny``, a U-Net;
``tiny-sd3``, a diffusion transformer); what each model needs in its calls; which methods a pipeline can run.

A pipeline is either a U-Net Stable Diffusion (SD 1.x, 2.x, SDXL), on which every method runs but diffusers' step
caches, or a diffusion transformer of a family that :mod:`tofu_sd.families` adapts (SD3 / SD3.5, PixArt, Flux,
Qwen-Image, FLUX.2, Sana, Wan text-to-video: its call arguments are :mod:`evaluation.pipeline_calls`), on
which Token Fusion through ``tofu_sd.apply``, the oracle and diffusers' step caches run, and not the other
packages' methods (:func:`check_methods`).
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from tofu_sd.families import supported

from .errors import EvaluationError
from .families import transformer_and_family
from .pipeline_calls import check_text_to_image

DEFAULT_MODEL = "stable-diffusion-v1-5/stable-diffusion-v1-5"
TINY = "tiny"  # the built-in model trained on coloured shapes (evaluation/shapes/model), offline
TINY_RANDOM = "tiny-random"  # random-weight tiny configs (evaluation/tiny_random.py): fast, for tests, draws noise
TINY_SD3 = "tiny-sd3"  # the built-in SD3-style diffusion transformer trained on coloured shapes (evaluation/shapes_sd3)
BUILTIN_MODELS = (TINY, TINY_RANDOM, TINY_SD3)
SHAPES_MODELS = (TINY, TINY_SD3)  #: the built-in models made for the ``shapes`` prompt set
#: Development only: a folder that ``--model tiny-sd3`` loads instead of the shipped ``evaluation/shapes_sd3/model``
#: (an intermediate export, or the tests' random one).
TINY_SD3_DIR_ENV = "TOFU_SD_TINY_SD3_DIR"

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
    """The prompt set a model was made for: its own shape classes for the built-in models, ImageNet otherwise."""
    return "shapes" if model in SHAPES_MODELS else "imagenet"


def model_defaults(model: str) -> dict:
    """Sampling defaults of a model that has its own (``tiny-sd3``: ``steps``, ``guidance_scale``); else ``{}``."""
    if model == TINY_SD3:
        from .shapes_sd3 import DEFAULT_GUIDANCE, DEFAULT_STEPS

        return {"steps": DEFAULT_STEPS, "guidance_scale": DEFAULT_GUIDANCE}
    return {}


def call_kwargs(model: str) -> dict:
    """Keyword arguments every pipeline call of ``model`` takes besides the sampling options (``tiny-sd3``: its
    ``max_sequence_length``, the number of zero "T5" tokens it was trained with); else ``{}``."""
    if model == TINY_SD3:
        from .shapes_sd3 import CALL_KWARGS

        return dict(CALL_KWARGS)
    return {}


def builtin_model_dir():
    """The folder of the built-in trained model, installed with the package."""
    from .shapes import MODEL_DIR

    return MODEL_DIR


def builtin_sd3_dir() -> Path:
    """The folder of the built-in SD3-style model: ``$TOFU_SD_TINY_SD3_DIR`` if set (development), else the shipped one."""
    from .shapes_sd3 import MODEL_DIR

    return Path(os.environ.get(TINY_SD3_DIR_ENV) or MODEL_DIR)


def is_transformer_pipeline(pipe) -> bool:
    """Whether ``pipe`` is a diffusion-transformer pipeline (no U-Net, a ``transformer``)."""
    return getattr(pipe, "unet", None) is None and getattr(pipe, "transformer", None) is not None


def load_pipeline(model: str, device: torch.device, dtype: torch.dtype, scheduler: str | None = None):
    """The text-to-image pipeline of ``model`` on ``device``, with a U-Net or a supported diffusion transformer,
    progress bar off."""
    import diffusers

    if model == TINY_SD3:
        pipe = _load_tiny_sd3(dtype)
    elif model == TINY_RANDOM:
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
            pipe = _load_text_to_image(diffusers, model, dtype)
        except Exception as error:
            raise EvaluationError(
                f"could not load --model {model!r} ({type(error).__name__}: {str(error).splitlines()[0][:300]}). "
                "--model takes a Hugging Face hub id (downloaded once, then cached), a local diffusers folder, "
                f"or '{TINY}' / '{TINY_SD3}' for the built-in offline models."
            ) from error
    _check_supported(model, pipe)
    check_text_to_image(pipe, model)
    if scheduler is not None:
        if scheduler not in SCHEDULERS:
            raise EvaluationError(f"unknown --scheduler {scheduler!r}; choose from {', '.join(SCHEDULERS)}")
        if "FlowMatch" in type(pipe.scheduler).__name__:
            raise EvaluationError(
                f"--scheduler {scheduler} replaces a noise-prediction scheduler, but --model {model!r} is a "
                f"flow-matching model ({type(pipe.scheduler).__name__}); leave --scheduler out"
            )
        pipe.scheduler = getattr(diffusers, SCHEDULERS[scheduler]).from_config(pipe.scheduler.config)
    pipe = pipe.to(device)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _load_text_to_image(diffusers, model: str, dtype: torch.dtype):
    """The model's text-to-image pipeline (diffusers' AutoPipeline); for a model AutoPipeline maps to no
    text-to-image pipeline (a text-to-video one, such as Wan's), the pipeline its ``model_index.json`` names."""
    try:
        return diffusers.AutoPipelineForText2Image.from_pretrained(model, torch_dtype=dtype)
    except ValueError as error:
        if "AutoPipeline can't find a pipeline" not in str(error):
            raise
    return diffusers.DiffusionPipeline.from_pretrained(model, torch_dtype=dtype)


def _missing_tiny_sd3(folder: Path) -> EvaluationError:
    return EvaluationError(
        f"--model {TINY_SD3}: the built-in SD3-style model is not in {folder} (no model_index.json): it has not been "
        f"exported there yet. Train and export it (python -m evaluation.shapes_sd3.train, then "
        f"python -m evaluation.shapes_sd3.export), or use --model {TINY} meanwhile"
    )


def check_available(model: str) -> None:
    """EvaluationError if ``model`` is a built-in one whose folder is missing (so far ``tiny-sd3``), before
    anything is loaded or written."""
    if model == TINY_SD3 and not (builtin_sd3_dir() / "model_index.json").is_file():
        raise _missing_tiny_sd3(builtin_sd3_dir())


def _load_tiny_sd3(dtype: torch.dtype):
    from .shapes_sd3 import load_pipeline as load_sd3

    folder = builtin_sd3_dir()
    try:
        return load_sd3("cpu", dtype, folder)
    except FileNotFoundError as error:
        raise _missing_tiny_sd3(folder) from error


def _check_supported(model: str, pipe) -> None:
    """EvaluationError unless ``pipe`` has a U-Net or a transformer that tofu_sd supports."""
    if getattr(pipe, "unet", None) is not None:
        return
    if is_transformer_pipeline(pipe):
        try:
            transformer_and_family(pipe)
            return
        except ValueError:
            has = f"a {type(pipe.transformer).__name__}"
    else:
        has = "neither a U-Net nor a transformer"
    raise EvaluationError(
        f"--model {model!r} is a {type(pipe).__name__} with {has}; token reduction here supports U-Net Stable "
        f"Diffusion models (SD 1.x, 2.x, SDXL) and the model families that tofu_sd adapts: {supported()}."
    )


# ---------------------------------------------------------------------------------------------------------------
# Which methods a pipeline can run
# ---------------------------------------------------------------------------------------------------------------

def unet_only_reasons(methods) -> list[tuple[str, str]]:
    """``(name, why)`` for each of ``methods`` that runs on U-Nets only (the registry's ``Method.unet_only``)."""
    from .methods import parse_name

    return [(m, why) for m in methods if (why := parse_name(m).method.unet_only) is not None]


def transformer_methods() -> list[str]:
    """The registry's methods that run on diffusion transformers too (where ``tofu_sd.apply`` accepts them)."""
    from .methods import REGISTRY

    return [name for name, method in REGISTRY.items() if method.runs_on_transformers]


def refuse_unet_only(methods, model: str, option: str = "--model", works=None) -> None:
    """EvaluationError if a method of ``methods`` runs only on U-Nets (tome, todo, catome, deepcache...), for a
    diffusion-transformer ``model``, named as ``<option> <model>`` in the message. It lists ``works`` as what to
    give instead (default: the registry's methods that run on transformers, where tofu_sd.apply accepts them)."""
    refused = unet_only_reasons(methods)
    if refused:
        lines = "; ".join(f"{m}: {why}" for m, why in refused)
        instead = ", ".join(works) if works is not None else (
            f"{', '.join(transformer_methods())}, where tofu_sd.apply accepts their options (it refuses the "
            "+<module> variants on every transformer, and tofu-kv on a family without reduce='kv')"
        )  # fmt: skip
        raise EvaluationError(
            f"{option} {model} is a diffusion transformer, and {', '.join(m for m, _ in refused)} "
            f"run{'s' if len(refused) == 1 else ''} on U-Nets only ({lines}). On diffusion transformers give {instead}"
        )


def transformer_only_reasons(methods) -> list[tuple[str, str]]:
    """``(name, why)`` for each of ``methods`` that runs on diffusion transformers only (``Method.transformer_only``)."""
    from .methods import parse_name

    return [(m, why) for m in methods if (why := parse_name(m).method.transformer_only) is not None]


def refuse_transformer_only(methods, model: str, option: str = "--model") -> None:
    """EvaluationError if a method of ``methods`` runs only on diffusion transformers (diffusers' step caches:
    fbcache, pab, ...), for a U-Net ``model``, named as ``<option> <model>`` in the message, which lists what
    runs on U-Nets instead."""
    from .methods import REGISTRY

    refused = transformer_only_reasons(methods)
    if refused:
        reasons = {why for _, why in refused}
        works = [name for name, method in REGISTRY.items() if method.runs_on_unets]
        raise EvaluationError(
            f"{option} {model} is a U-Net, and {', '.join(m for m, _ in refused)} run{'s' if len(refused) == 1 else ''} "
            f"on diffusion transformers only ({'; '.join(sorted(reasons))}). On U-Nets give {', '.join(works)}"
        )


def check_methods(pipe, model: str, methods, options, more=None) -> None:
    """EvaluationError, before anything is generated, if ``pipe`` cannot run one of ``methods``: on a diffusion
    transformer the U-Net-only methods (:func:`refuse_unet_only`), and each method that its patch (``tofu_sd.apply``)
    refuses there (the ``+ff`` / ``+attn2`` variants; ``tofu-kv`` on a family without ``reduce="kv"``), found by applying and
    removing it (``apply`` checks everything before it touches the model). On a U-Net: the methods that run on
    diffusion transformers only (:func:`refuse_transformer_only`), and ``--blocks``, which only diffusion
    transformers take."""
    from .methods import REFERENCE, method_applied

    if not is_transformer_pipeline(pipe):
        refuse_transformer_only(methods, model)
        if getattr(options, "blocks", None) is not None and any(m != REFERENCE for m in methods):
            raise EvaluationError(
                f"--blocks {options.blocks} chooses blocks of a diffusion transformer; --model {model} is a U-Net, "
                "whose blocks are chosen by resolution: use --max-downsample"
            )
        return
    refuse_unet_only(methods, model)
    arch = type(transformer_and_family(pipe)[0]).__name__
    for method in methods:
        try:
            with method_applied(pipe, method, options, more):
                pass
        except ValueError as error:
            raise EvaluationError(f"method {method} cannot run on --model {model} (a {arch}): {error}") from error
