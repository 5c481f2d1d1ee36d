"""The registry of model families: which :class:`~tofu_sd.families.base.Family` adapts which model class."""

from __future__ import annotations

import torch

from .base import Family

_FAMILIES: dict[type, Family] = {}


def register_family(model_class: type, family: Family) -> None:
    """Make Token Fusion adapt models of ``model_class`` (and its subclasses, unless they have their own entry)
    with ``family``. A later registration for the same class replaces the earlier one."""
    if not isinstance(model_class, type) or not issubclass(model_class, torch.nn.Module):
        raise TypeError(f"register_family needs a torch.nn.Module subclass, got {model_class!r}.")
    if not isinstance(family, Family):
        raise TypeError(f"register_family needs a tofu_sd.Family instance, got {type(family).__name__}.")
    _FAMILIES[model_class] = family


def family_of(model: object) -> Family | None:
    """The family registered for the class of ``model`` or its nearest registered base class, or ``None``."""
    for cls in type(model).__mro__:
        family = _FAMILIES.get(cls)
        if family is not None:
            return family
    return None


def supported() -> str:
    """The registered families with their model classes, for messages: ``"U-Net (UNet2DConditionModel, ...), ..."``."""
    by_family: dict[str, list[str]] = {}
    for cls, family in _FAMILIES.items():
        by_family.setdefault(family.name, []).append(cls.__name__)
    return "; ".join(f"{name} ({', '.join(classes)})" for name, classes in by_family.items())
