"""What the evaluation asks tofu_sd about a pipeline's model: which family adapts it, where its blocks are.

Every answer comes from the plugin's family adapters (:mod:`tofu_sd.families`), so a family added there is known
here without a copy of its knowledge."""

from __future__ import annotations

import torch

from tofu_sd import Family, Site
from tofu_sd.api import model_and_family
from tofu_sd.families.unet import select_by_resolution, transformer_block_sites


def is_transformer(pipe) -> bool:
    """Whether ``pipe`` is (or holds) a diffusion transformer: its model is a family's ``transformer``, or it has a
    ``transformer`` and no ``unet`` (even one that tofu_sd does not support)."""
    try:
        return model_and_family(pipe)[1].pipeline_attribute == "transformer"
    except ValueError:
        return getattr(pipe, "transformer", None) is not None and getattr(pipe, "unet", None) is None


def unet_of(pipe) -> torch.nn.Module:
    """The U-Net of a pipeline (or the U-Net itself, without a compile wrapper); ValueError for anything else."""
    model, family = model_and_family(pipe)
    if family.pipeline_attribute != "unet":
        raise ValueError(f"{type(pipe).__name__} holds a {type(model).__name__} ({family.name}), not a U-Net.")
    return model


def unet_sites(unet: torch.nn.Module, max_downsample: int = 1) -> list[Site]:
    """The U-Net blocks that ``tofu_sd.apply`` patches with ``max_downsample``."""
    return select_by_resolution(transformer_block_sites(unet), max_downsample)


def transformer_and_family(pipe) -> tuple[torch.nn.Module, Family]:
    """The diffusion transformer of ``pipe`` and its family; ValueError naming the supported ones otherwise."""
    model, family = model_and_family(pipe)
    if family.pipeline_attribute != "transformer":
        raise ValueError(f"{type(pipe).__name__} holds a U-Net, not a diffusion transformer.")
    return model, family
