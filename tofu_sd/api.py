"""Public entry points: apply Token Fusion to a model or pipeline, inspect it, remove it.

:func:`apply_token_fusion` / :func:`remove_token_fusion` take a :class:`~tofu_sd.TokenFusionConfig`, in the style
of diffusers' ``apply_*(module, config)``; :func:`apply` / :func:`remove` are the one-line convenience over them.
Both take a model of a registered family (:func:`tofu_sd.register_family`), possibly wrapped by
``torch.compile``, or a pipeline holding one as its ``unet`` or ``transformer``.
"""

from __future__ import annotations

import copy
import functools
from dataclasses import dataclass, fields, replace
from typing import TypeVar

import torch

from .config import TokenFusionConfig
from .families import Family, family_of, supported
from .hooking import hooked_modules, is_class_forward, torch_hooks
from .install import call_state, install, uninstall
from .merge import MODES

T = TypeVar("T")

_STATE = "_tofu_sd"  #: the :class:`TokenFusionState` on a patched model
#: An instance attribute of a patched model, found by ``copy.deepcopy`` (it looks the copier up on the instance).
_DEEPCOPY = "__deepcopy__"
#: Stands, during a deep copy, for the hooks, registries and hooked forwards left out of the copy.
_LEFT_OUT = object()


@dataclass(frozen=True)
class PatchedBlock:
    """A block Token Fusion patched: its module name, its schedule letter and its resolution factor."""

    name: str
    letter: str  #: ``P`` (pruned), ``A`` (average) or ``M`` (MLERP)
    downsample: int

    @property
    def mode(self) -> str:
        return MODES[self.letter]


@dataclass(frozen=True)
class TokenFusionState:
    """What :func:`apply_token_fusion` installed on a model (stored on it as ``model._tofu_sd``)."""

    config: TokenFusionConfig
    blocks: tuple[PatchedBlock, ...]

    @property
    def schedule(self) -> str:
        return "".join(block.letter for block in self.blocks)


def model_and_family(obj: object) -> tuple[torch.nn.Module, Family]:
    """The model of ``obj`` (itself, or a pipeline's ``unet`` / ``transformer``), without a ``torch.compile``
    wrapper, and its family; ``ValueError`` naming the supported families if there is none."""
    model = obj
    if not isinstance(obj, torch.nn.Module):
        model = next((getattr(obj, a) for a in ("unet", "transformer") if getattr(obj, a, None) is not None), obj)
    model = getattr(model, "_orig_mod", model)  # torch.compile's OptimizedModule
    family = family_of(model)
    if family is None:
        held = "" if model is obj else f" holding a {type(model).__name__}"
        raise ValueError(
            f"tofu_sd does not support {type(obj).__name__}{held}. Supported: a model of one of these families, "
            f"or a pipeline holding one as its `unet` or `transformer`: {supported()}. Other models can be "
            "adapted with tofu_sd.register_family."
        )
    return model, family


def apply_token_fusion(obj: object, config: TokenFusionConfig) -> TokenFusionState:
    """Hook Token Fusion into the model of ``obj`` (a model, or a pipeline holding it) as ``config`` says,
    replacing an earlier patch; returns what was installed.

    Everything is validated before the model is touched; if hooking fails half way, what was hooked is removed.
    Given a pipeline, each of its calls starts a new step count (see :func:`reset_steps`)."""
    model, family = model_and_family(obj)
    sites = family.select(family.sites(model), config)
    if not sites:
        raise ValueError(f"{type(model).__name__} has no {family.name} blocks that Token Fusion can patch.")
    family.check(model, sites, config)
    names = [site.name for site in sites]
    schedule = family.default_schedule(sites) if config.schedule is None else config.resolve_schedule(names)
    config = replace(config, seed=0 if config.seed is None else config.seed, st=family.frames_per_cell(config))
    state = TokenFusionState(config, tuple(PatchedBlock(s.name, letter, s.downsample) for s, letter in zip(sites, schedule)))

    remove_token_fusion(obj)
    if config.ratio != 0:  # at 0 nothing is reduced: the model stays exactly as it is, with the request noted
        install(model, family, sites, schedule, config)
        setattr(model, _DEEPCOPY, functools.partial(_deepcopy_patched, model))
        if model is not obj and not isinstance(obj, torch.nn.Module):
            _CallStart.install(obj, model)
    setattr(model, _STATE, state)
    _reset_compiled(obj)
    return state


def remove_token_fusion(obj: object) -> bool:
    """Remove Token Fusion from the model of ``obj`` (and its pipeline's call marking); True if it was applied."""
    model, _ = model_and_family(obj)
    had_state = model.__dict__.pop(_STATE, None) is not None
    model.__dict__.pop(_DEEPCOPY, None)
    found = uninstall(model)
    if not isinstance(obj, torch.nn.Module):
        found = _CallStart.uninstall(obj) or found
    if had_state or found:
        _reset_compiled(obj)
    return had_state or found


def apply(pipe_or_model: T, ratio: float = 0.5, **options) -> T:
    """Apply Token Fusion to a pipeline or model, in place, and return it: ``apply_token_fusion(pipe_or_model,
    TokenFusionConfig(ratio=ratio, **options))``. The options, their defaults and what they do are
    :class:`~tofu_sd.TokenFusionConfig`'s fields (docs/options.md). Calling it again replaces the earlier patch;
    :func:`remove` undoes it exactly.

    Example:
        ```python
        pipe = StableDiffusionPipeline.from_pretrained(...).to("cuda")
        tofu_sd.apply(pipe, ratio=0.5)
        image = pipe("A high-quality photograph of a goldfish.").images[0]
        tofu_sd.remove(pipe)
        ```
    """
    known = {f.name for f in fields(TokenFusionConfig)} - {"ratio"}
    unknown = sorted(set(options) - known)
    if unknown:
        raise ValueError(f"unknown option(s) {', '.join(unknown)}; tofu_sd.apply takes ratio and {', '.join(sorted(known))}.")
    apply_token_fusion(pipe_or_model, TokenFusionConfig(ratio=ratio, **options))
    return pipe_or_model


def remove(pipe_or_model: T) -> T:
    """Remove Token Fusion from a pipeline or model (a no-op if it was not applied) and return it."""
    remove_token_fusion(pipe_or_model)
    return pipe_or_model


def get_state(pipe_or_model: object) -> TokenFusionState | None:
    """The configuration and blocks of the Token Fusion applied to a pipeline or model, or None."""
    model, _ = model_and_family(pipe_or_model)
    return getattr(model, _STATE, None)


def patched_blocks(pipe_or_model: object) -> list[PatchedBlock]:
    """The blocks Token Fusion is applied to, in forward order, with their schedule letters (empty if none)."""
    state = get_state(pipe_or_model)
    return list(state.blocks) if state is not None else []


def reset_steps(pipe_or_model: object) -> None:
    """Make the calling thread's next call of the patched model the first step of a new pipeline call: its step
    count (``rematch_every``) starts again and the matchings stored by earlier calls are dropped.

    A pipeline given to :func:`apply` does this at the start of each of its calls (when it sets its scheduler's
    timesteps and opens its progress bar, as every diffusers pipeline does before its denoising loop), whatever
    its first timestep; so does another pipeline made from its components (it shares the scheduler). Call it
    yourself when you drive a bare model, or a pipeline with another scheduler that shares the model, from one
    request to the next; without it a call whose first timestep is not higher than the previous call's last one continues
    that call's step count (see ``TokenFusionConfig.rematch_every``)."""
    model, _ = model_and_family(pipe_or_model)
    call = call_state(model)
    if call is not None:
        call.new_pipeline_call()


class _CallStart:
    """Marks the start of each pipeline call: installed on a pipeline as its ``progress_bar`` and on its scheduler
    as its ``set_timesteps`` (instance attributes; every diffusers pipeline calls both before its denoising loop,
    and a pipeline made from the same components, e.g. with ``from_pipe``, shares the scheduler), it calls
    :func:`reset_steps` on ``model`` and then the method it replaced."""

    #: The methods it replaces: on the pipeline, and on the pipeline's scheduler.
    PLACES = (("", "progress_bar"), ("scheduler", "set_timesteps"))

    def __init__(self, owner: object, name: str, model: torch.nn.Module) -> None:
        self.owner, self.name, self.model = owner, name, model
        self.previous = owner.__dict__.get(name)  # a replacement of someone else's, kept and called
        # What it stands for, so that `inspect.signature` (which pipelines ask whether `set_timesteps` takes
        # `sigmas` or `timesteps`) sees the replaced method's parameters.
        self.__wrapped__ = self.previous if self.previous is not None else getattr(owner, name)

    def __call__(self, *args, **kwargs):
        reset_steps(self.model)
        if self.previous is not None:
            return self.previous(*args, **kwargs)
        return getattr(type(self.owner), self.name)(self.owner, *args, **kwargs)

    @classmethod
    def owners(cls, pipe: object):
        for attribute, name in cls.PLACES:
            owner = getattr(pipe, attribute, None) if attribute else pipe
            if owner is not None and callable(getattr(type(owner), name, None)):
                yield owner, name

    @classmethod
    def install(cls, pipe: object, model: torch.nn.Module) -> None:
        for owner, name in cls.owners(pipe):
            setattr(owner, name, cls(owner, name, model))

    @classmethod
    def uninstall(cls, pipe: object) -> bool:
        found = False
        for owner, name in cls.owners(pipe):
            marker = owner.__dict__.get(name)
            if isinstance(marker, cls):
                del owner.__dict__[name]
                if marker.previous is not None:
                    setattr(owner, name, marker.previous)
                found = True
        return found


def _deepcopy_patched(model: torch.nn.Module, memo: dict) -> torch.nn.Module:
    """``copy.deepcopy`` of a patched model: an independent copy, patched alike; ``model`` is not touched.

    A deep-copied diffusers hook would stay bound to the original (its forward is a closure over the original's
    hooks and forward), and a deep-copied torch hook of Token Fusion's would share the original's state, so the
    copy is made without Token Fusion's registries, hooked forwards and torch hooks, and Token Fusion is then
    applied to the copy with the same configuration."""
    wrapped = hooked_modules(model)
    for module in wrapped:
        memo[id(module._diffusers_hook)] = memo[id(module.__dict__["forward"])] = _LEFT_OUT
    outer = torch_hooks(model)
    for _, owner in outer:
        for function in owner.functions:
            memo[id(function)] = _LEFT_OUT
    cls = type(model)
    copied = memo[id(model)] = cls.__new__(cls)  # as copy.deepcopy does, so references to model map to the copy
    state = {key: value for key, value in model.__getstate__().items() if key not in (_STATE, _DEEPCOPY)}
    copied.__setstate__(copy.deepcopy(state, memo))
    for module, forward in wrapped.items():
        twin = memo[id(module)]
        del twin.__dict__["_diffusers_hook"], twin.__dict__["forward"]
        if not is_class_forward(module, forward):
            twin.forward = copy.deepcopy(forward, memo)  # a wrapper installed before Token Fusion's hooks
    for module, owner in outer:
        owner.remove_from_copy(memo[id(module)])
    apply_token_fusion(copied, getattr(model, _STATE).config)
    return copied


def _reset_compiled(obj: object) -> None:
    """A compiled model has traced the old hooks: drop its graphs so the next call traces the new ones."""
    held = [obj] + [getattr(obj, a) for a in ("unet", "transformer") if getattr(obj, a, None) is not None]
    if any(hasattr(x, "_orig_mod") for x in held):
        torch._dynamo.reset()
