"""The models that ``tofu-sd bench --arch`` names, with random weights: a U-Net (:data:`evaluation.archs.BENCH_ARCHS`)
or a diffusion transformer (:data:`evaluation.dit_archs.DIT_ARCHS`); each one's default batch, one step's inputs
and token width; and, for a transformer, the checks made before it is built: that its weights fit the machine,
that the image sizes fit it, and that it runs every variant (the registry's ``unet_only``, then the variant's
patch applied to the model made on the meta device, where nothing is allocated)."""

from __future__ import annotations

import os

import torch
from diffusers import UNet2DConditionModel

from ..archs import BENCH_ARCHS, CLIP_TOKENS, DIT_ARCHS, build_unet as build_from_config, dit_step_inputs, step_inputs
from ..dit_archs import check_latent
from ..errors import EvaluationError
from ..methods.base import MethodOptions
from ..methods.registry import REGISTRY
from ..models import refuse_unet_only
from ..methods.names import normal_names
from .variants import default_variants, parse_variants, variant_applied

ARCH_ALIASES = {"tiny": "tiny-random"}  #: the earlier name of ``tiny-random`` (random weights, not ``--model tiny``)
ARCHS = (*BENCH_ARCHS, *DIT_ARCHS)  #: every name ``--arch`` takes
UNET_BATCH = 2  #: a U-Net step's default batch: classifier-free guidance's two rows


def resolve_arch(arch: str) -> str:
    """The arch's name (``tiny`` -> ``tiny-random``); ValueError listing the choices for an unknown one."""
    arch = ARCH_ALIASES.get(arch, arch)
    if arch not in ARCHS:
        raise ValueError(f"unknown arch {arch!r}; choose from {', '.join(ARCHS)}")
    return arch


def is_transformer(arch: str) -> bool:
    return arch in DIT_ARCHS


def default_batch(arch: str) -> int:
    """2 for the U-Nets and SD3 (classifier-free guidance), 1 for Flux-dev (guidance-distilled)."""
    return DIT_ARCHS[arch].batch if is_transformer(arch) else UNET_BATCH


def build_unet(arch: str, device: torch.device, dtype: torch.dtype) -> UNet2DConditionModel:
    """``sd15`` / ``sdxl``: the real architectures with random weights; ``sd15-level``: SD 1.5's highest-resolution
    level alone; ``tiny-random``: the test-sized SD 1.5 shape (:mod:`evaluation.archs`)."""
    unet = build_from_config(BENCH_ARCHS[ARCH_ALIASES.get(arch, arch)], seed=0)
    unet = unet.to(device) if dtype == torch.float32 else unet.to(device=device, dtype=dtype)
    return unet.eval().requires_grad_(False)


def build_model(arch: str, device: torch.device, dtype: torch.dtype) -> torch.nn.Module:
    """The U-Net (:func:`build_unet`) or the transformer (made on ``device`` in ``dtype``) of ``arch``."""
    if is_transformer(arch):
        return DIT_ARCHS[arch].build(seed=0, device=device, dtype=dtype)
    return build_unet(arch, device, dtype)


def inputs_of(arch: str, model, batch: int, latent: int, device, dtype) -> dict:
    """One step's inputs on a ``latent x latent`` latent: CLIP's 77 text tokens for the U-Nets, the pipeline's for
    the transformers (:mod:`evaluation.dit_archs`)."""
    if is_transformer(arch):
        spec = DIT_ARCHS[arch]
        frames = {} if spec.frames is None else {"frames": spec.frames}
        return dit_step_inputs(model, batch, latent, text_tokens=spec.text_tokens, device=device, dtype=dtype, **frames)
    return step_inputs(model, batch, latent, text_tokens=CLIP_TOKENS, device=device, dtype=dtype)


def token_channels(arch: str, model) -> int:
    """The channels of the tokens that the patched blocks reduce: the first transformer level's (SDXL: the
    second, its first has none), a transformer's inner width (heads x head size)."""
    if is_transformer(arch):
        return model.config.num_attention_heads * model.config.attention_head_dim
    return model.config.block_out_channels[0 if arch != "sdxl" else 1]


def check_sizes(arch: str, latents: tuple[int, ...]) -> None:
    """ValueError, before anything is built, for a latent size the transformer of ``arch`` does not take."""
    meta = DIT_ARCHS[arch].build(device="meta")
    for latent in latents:
        try:
            check_latent(meta, latent, latent)
        except ValueError as error:
            raise ValueError(f"--arch {arch} at {latent * 8} px: {error}") from error


def check_fits(arch: str, device: torch.device, dtype: torch.dtype) -> None:
    """EvaluationError if the transformer's weights alone take more memory than ``device`` has (free on a GPU,
    physical on the CPU), before anything is allocated."""
    params = DIT_ARCHS[arch].num_params()
    need = params * torch.empty((), dtype=dtype).element_size()
    if device.type == "cuda":
        have, what = torch.cuda.mem_get_info(device)[0], "free on the GPU"
    elif device.type == "cpu":
        have, what = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"), "of memory on this machine"
    else:
        return
    if need > have:
        raise EvaluationError(
            f"--arch {arch} has {params / 1e9:.1f}B parameters, {need / 2**30:.1f} GiB of {str(dtype).removeprefix('torch.')} "
            f"weights: more than the {have / 2**30:.1f} GiB {what}. Use "
            + (f"a slice of it (--arch {arch}-slice), " if f"{arch}-slice" in DIT_ARCHS else "")
            + "a smaller --dtype (bf16), or a larger GPU"
        )


def transformer_variants(arch: str, meta: torch.nn.Module, ratio: float, options, more: MethodOptions | None) -> list[str]:
    """The registry's methods (unsuffixed, installed) that run on ``meta``, the transformer of ``arch`` made on the
    meta device: not U-Net only, one the bench can time, and its patch accepts the model."""
    works = []
    for name, method in REGISTRY.items():
        if not method.runs_on_transformers or method.bench_refusal is not None or (
            method.requires is not None and not method.requires.available()
        ):
            continue
        try:
            with variant_applied(meta, name, ratio, options, more):
                pass
        except ValueError:
            continue
        works.append(name)
    return works


def transformer_variants_checked(
    arch: str, variants: list[str] | None, ratio: float, options, more: MethodOptions | None
) -> list[str]:
    """The variants for the transformer of ``arch`` in normal form (None: those of the bench's default set that run
    on it), checked before it is built; EvaluationError for one that cannot run on it: first the U-Net-only ones
    (named, with why), then one whose patch refuses the model (the ``+<module>`` variants on every
    transformer; ``tofu-kv`` on a family without ``reduce="kv"``), found on the model made on the meta device. The messages list what runs there."""
    meta = DIT_ARCHS[arch].build(device="meta")
    works = transformer_variants(arch, meta, ratio, options, more)
    if variants is None:
        variants = [name for name in default_variants() if name in works]
    refuse_unet_only(normal_names(list(variants), options, noun="variant"), arch, option="--arch", works=works)
    names = parse_variants(variants, ratio, options, more)
    for name in names:
        try:
            with variant_applied(meta, name, ratio, options, more):
                pass
        except ValueError as error:
            raise EvaluationError(
                f"variant {name} cannot run on --arch {arch} (a {type(meta).__name__}): {error} Variants that run on "
                f"it: {', '.join(works)} (and <method>@<ratio>)"
            ) from error
    return names
