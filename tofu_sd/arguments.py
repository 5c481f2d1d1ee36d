"""Reading and replacing a module call's arguments, whether they were passed by position or by keyword."""

from __future__ import annotations

from typing import Any

import torch


def argument(args: tuple, kwargs: dict, index: int, name: str) -> Any:
    """Argument ``name`` of a call, passed at position ``index`` or by keyword; ``None`` if it was not passed."""
    if name in kwargs:
        return kwargs[name]
    return args[index] if len(args) > index else None


def with_arguments(args: tuple, kwargs: dict, values: dict[int, tuple[str, Any]]) -> tuple[tuple, dict]:
    """``args`` and ``kwargs`` with argument ``name`` (at position ``index``) set, for each ``index: (name, value)``."""
    args, kwargs = list(args), dict(kwargs)
    for index, (name, value) in values.items():
        if name not in kwargs and len(args) > index:
            args[index] = value
        else:
            kwargs[name] = value
    return tuple(args), kwargs


def host_timestep(timestep) -> float | None:
    """The (first) timestep as a Python float; a tensor on an accelerator is copied to the host (a sync)."""
    if timestep is None:
        return None
    if isinstance(timestep, torch.Tensor):
        return float(timestep.reshape(-1)[0])
    return float(timestep)
