"""Applying one of diffusers' step caches to a diffusion transformer and removing it exactly, with what a
``CacheMixin`` pipeline would give the caches where the pipeline gives none (see :mod:`.caches` for why each piece
is needed and the diffusers releases concerned): the current timestep, a cache context around each transformer
call, a reset of the caches' state after each pipeline call, and SD3's last block's text output."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from diffusers.hooks import HookRegistry, ModelHook

from tofu_sd.arguments import argument
from tofu_sd.hooking import is_class_forward, register_innermost, unregister_all

TEXT_HOOK = "evaluation.cache_text"  #: the name of :class:`TextPassThrough`'s registry hook
CONTEXT_NAME = "cond"  #: the cache context of a transformer call whose pipeline sets none
#: A model instance's attributes that applying a cache (and its registry) can add, deleted again afterwards.
TRACES = ("_diffusers_hook", "forward", "_cache_config", "_reset_stateful_cache")
#: Each cache config of ``diffusers.hooks`` and the function that applies it to a model without ``CacheMixin``.
APPLY = {
    "FirstBlockCacheConfig": "apply_first_block_cache", "TaylorSeerCacheConfig": "apply_taylorseer_cache",
    "MagCacheConfig": "apply_mag_cache", "PyramidAttentionBroadcastConfig": "apply_pyramid_attention_broadcast",
    "FasterCacheConfig": "apply_faster_cache",
}  # fmt: skip


@dataclass
class Setup:
    """What a cache's diffusers config is made from: the transformer and its family, the current timestep (a
    callable), the run's steps and guidance scale (None: unknown), and the :class:`CacheSupport` of the application."""

    model: torch.nn.Module
    family: Any
    clock: Callable[[], float]
    steps: int | None
    guidance_scale: float | None
    support: CacheSupport


def cache_context(name: str):
    try:
        from diffusers.hooks.hooks import CacheContext
    except ImportError:  # diffusers releases whose context is its name
        return name
    return CacheContext(name)


class CacheSupport:
    """The transformer's forward pre-hook and forward hook for the caches (see the module docstring): the clock,
    the cache context, a per-call check; and, on a model without ``CacheMixin``, ``_reset_stateful_cache``."""

    def __init__(self, model: torch.nn.Module, family) -> None:
        from diffusers.models.cache_utils import CacheMixin

        self.model, self.family = model, family
        self.time = 1000.0
        self.hooks: list[ModelHook] = []  #: the hooks of the cache enabled now
        self.managers: list = []  #: their state managers
        self.checks: list[Callable[[float], None]] = []
        self.entered = False
        self.handles = [
            model.register_forward_pre_hook(self._pre, with_kwargs=True),
            model.register_forward_hook(self._post, always_call=True),
        ]
        if not isinstance(model, CacheMixin):  # the pipeline calls it at the end of each call
            model._reset_stateful_cache = self._reset

    def clock(self) -> float:
        return self.time

    def watch(self, hooks: list[ModelHook]) -> None:
        from diffusers.hooks.hooks import StateManager

        self.hooks = hooks
        managers = {id(v): v for h in hooks for v in vars(h).values() if isinstance(v, StateManager)}
        self.managers = list(managers.values())

    def _pre(self, module, args, kwargs):
        timestep = self.family.timestep(args, kwargs)
        if timestep is not None:
            self.time = float(timestep.flatten()[0]) if torch.is_tensor(timestep) else float(timestep)
        for check in self.checks:
            check(self.time)
        if self.managers and all(m._context is None for m in self.managers):
            context = cache_context(CONTEXT_NAME)
            for manager in self.managers:
                manager.set_context(context)
            self.entered = True

    def _post(self, module, args, output):
        if self.entered:
            for manager in self.managers:
                manager.set_context(None)
            self.entered = False

    def _reset(self, recurse: bool = True) -> None:
        HookRegistry.check_if_exists_or_initialize(self.model).reset_stateful_hooks(recurse=recurse)

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()
        self.hooks, self.managers, self.checks = [], [], []


def registries(model: torch.nn.Module) -> dict[torch.nn.Module, HookRegistry]:
    return {m: m.__dict__["_diffusers_hook"] for m in model.modules() if "_diffusers_hook" in m.__dict__}


def invalidate(model: torch.nn.Module) -> None:
    registry = HookRegistry.check_if_exists_or_initialize(model)
    if hasattr(registry, "invalidate_child_registries_cache"):  # diffusers 0.42: a cached list of child registries
        registry.invalidate_child_registries_cache()


@contextlib.contextmanager
def cache_enabled(model: torch.nn.Module, config, support: CacheSupport):
    """The cache of ``config`` on ``model`` for the block, through diffusers' API; yields its hooks (watched by
    ``support``). Removed afterwards, each hook where it was registered (it is the outermost there: whatever this
    evaluation registers meanwhile goes innermost)."""
    from diffusers import hooks as dh
    from diffusers.models.cache_utils import CacheMixin

    before = {m: set(r.hooks) for m, r in registries(model).items()}

    def added() -> list[tuple[torch.nn.Module, str]]:
        return [(m, name) for m, r in registries(model).items() for name in r.hooks if name not in before.get(m, ())]

    mixin = isinstance(model, CacheMixin)
    apply = {getattr(dh, config_name): getattr(dh, function) for config_name, function in APPLY.items() if hasattr(dh, config_name)}

    def remove() -> None:
        if mixin and model.is_cache_enabled:
            model.disable_cache()
        for module, name in reversed(added()):  # all of them, also after a failed apply
            module._diffusers_hook.remove_hook(name, recurse=False)
        invalidate(model)
        support.watch([])

    quiet = logging.getLogger("diffusers.hooks.faster_cache")  # "FasterCache is a purely experimental feature"
    level = quiet.level
    quiet.setLevel(logging.ERROR)
    try:
        if mixin:
            model.enable_cache(config)
        else:
            apply[type(config)](model, config)
            invalidate(model)
    except BaseException:
        remove()
        raise
    finally:
        quiet.setLevel(level)
    hooks = [module._diffusers_hook.hooks[name] for module, name in added()]
    if not hooks:  # e.g. TaylorSeer's default patterns (``transformer_blocks.*attn``) on PixArt's attn1 / attn2
        remove()
        raise ValueError(f"diffusers' {type(config).__name__} hooks nothing on a {type(model).__name__}: its default "
                         "module patterns match none of the model's modules")
    support.watch(hooks)
    try:
        yield support.hooks
    finally:
        remove()


class TextPassThrough(ModelHook):
    """On an SD3 block that returns None for the text stream (its last, ``context_pre_only``): its text input in
    place of that None. SD3Transformer2DModel discards the last block's text output, so nothing it computes
    changes; First Block Cache and TaylorSeer's lite mode (diffusers 0.42.1) need a tensor there."""

    def __init__(self) -> None:
        super().__init__()
        self.text = None

    def pre_forward(self, module, *args, **kwargs):
        self.text = argument(args, kwargs, 1, "encoder_hidden_states")
        return args, kwargs

    def post_forward(self, module, output):
        text, self.text = self.text, None
        if isinstance(output, tuple) and output and output[0] is None and text is not None:
            return (text, *output[1:])
        return output


@contextlib.contextmanager
def text_passthrough(model: torch.nn.Module, family):
    blocks = [site.block for site in family.sites(model) if getattr(site.block, "context_pre_only", False)]
    try:
        for block in blocks:
            register_innermost(block, TextPassThrough(), TEXT_HOOK)
        yield
    finally:
        unregister_all(model, TEXT_HOOK)


class Traces:
    """The attributes of :data:`TRACES` on each module of a model, to delete those a cache's application added
    (an empty registry, a copy of the class ``forward``, ``_cache_config``, ``_reset_stateful_cache``) and the
    attributes it added to registries that were there before."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.model = model
        self.had = {m: {key for key in TRACES if key in m.__dict__} for m in model.modules()}
        self.registry_keys = {id(r): set(vars(r)) for r in registries(model).values()}

    def restore(self) -> None:
        for module, had in self.had.items():
            registry = module.__dict__.get("_diffusers_hook")
            if registry is not None and "_diffusers_hook" not in had and not registry.hooks:
                del module._diffusers_hook
                registry = None
            if "forward" not in had and "forward" in module.__dict__ and is_class_forward(module, module.__dict__["forward"]):
                del module.forward
            for key in ("_cache_config", "_reset_stateful_cache"):
                if key not in had:
                    module.__dict__.pop(key, None)
            if registry is not None and id(registry) in self.registry_keys:
                for key in set(vars(registry)) - self.registry_keys[id(registry)]:
                    delattr(registry, key)
