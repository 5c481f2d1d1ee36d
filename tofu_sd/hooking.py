"""Installing and removing hooks: torch module hooks, and diffusers registry hooks kept innermost.

Two kinds of hooks carry Token Fusion:

- **Torch module hooks** (:class:`TorchHooks`: a forward pre-hook with keyword arguments and a forward hook) on
  the model and on the modules whose call carries a token grid (a U-Net's ``Transformer2DModel`` s). Torch runs
  them in ``Module.__call__`` whatever the module's ``forward`` is, and they leave ``forward`` alone. Other
  packages replace ``forward`` on exactly these modules (DeepCache on a U-Net and its blocks; accelerate's
  offloading), and a diffusers registry hook would discard a wrapper installed after it, or be discarded with
  one installed before it. With torch hooks either package can be enabled first and either removed while the
  other stays exactly as it is alone.
- **Diffusers registry hooks** (:class:`~diffusers.hooks.HookRegistry`, names ``tofu_sd.*``) on each patched
  block and on the sub-modules it reduces: they run inside the module's ``forward``, so in a compiled block they
  are part of its graph. :func:`register_innermost` puts each one *innermost*, next to the module's own
  ``forward``, whatever was registered before: a cache hook on the same module (diffusers' FirstBlockCache,
  MagCache, PyramidAttentionBroadcast, TaylorSeer, FasterCache) then always sees, stores and hands back what
  the un-reduced module gives, in either order of application. :func:`remove_registry_hook` removes a hook
  from the middle of a chain correctly: diffusers' own ``HookRegistry.remove_hook`` (every release from 0.33.0,
  where the registry appeared, to 0.42.1; checked in 0.33.0, 0.33.1, 0.34, 0.36, 0.38, 0.40 and 0.42.1's
  source) overwrites the ``forward`` of the next hook's function
  reference even when that hook wraps through ``new_forward`` (its ``original_forward``), which switches the
  next hook off (e.g. a cache applied after Token Fusion, once Token Fusion is removed). This module is the one
  place that reads the registry's private fields (``_hook_order``, ``_fn_refs``, ``_module_ref``); a test pins
  them.
"""

from __future__ import annotations

import functools
from typing import Any, Callable

import torch
from diffusers.hooks import HookRegistry, ModelHook
from diffusers.hooks.hooks import HookFunctionReference

#: The start of the name of every hook of Token Fusion's.
PREFIX = "tofu_sd."
#: A module's torch hook tables, each keyed by the handle id of a hook.
HOOK_TABLES = (
    "_forward_pre_hooks", "_forward_pre_hooks_with_kwargs", "_forward_hooks", "_forward_hooks_with_kwargs",
    "_forward_hooks_always_called",
)  # fmt: skip


class TorchHooks:
    """A :class:`~diffusers.hooks.ModelHook`'s ``pre_forward`` and ``post_forward`` run as torch's own forward
    pre-hook (with keyword arguments) and forward hook of ``module``, named ``name``.

    The forward hook is also called when the forward raises (``always_call``), so a call's state is freed then
    too. With ``eager=True`` both run through ``torch.compiler.disable``: always as Python, outside any compiled
    graph (for hooks on a model that ``torch.compile`` compiles whole, which it would otherwise compile as frames
    of their own, dropping their writes to thread-local state). :meth:`remove` removes exactly these two hooks,
    through their handles."""

    def __init__(self, module: torch.nn.Module, hook: ModelHook, name: str, *, eager: bool = False) -> None:
        self.hook, self.name = hook, name

        def pre(module, args, kwargs):
            return hook.pre_forward(module, *args, **kwargs)

        def post(module, args, output):
            return hook.post_forward(module, output)

        functions = (torch.compiler.disable(pre), torch.compiler.disable(post)) if eager else (pre, post)
        for function in functions:
            function.tofu_sd_hooks = self  # how :func:`torch_hooks` recognizes them
        self.functions = functions  # the very objects torch stores (a deep copy leaves them out)
        self.handles = (
            module.register_forward_pre_hook(functions[0], with_kwargs=True),
            module.register_forward_hook(functions[1], always_call=True),
        )

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()

    def remove_from_copy(self, twin: torch.nn.Module) -> None:
        """Remove these hooks' entries from ``twin``, a deep copy of their module (whose hook tables hold what the
        copy made of them under the same handle ids)."""
        for table in HOOK_TABLES:
            for handle in self.handles:
                getattr(twin, table).pop(handle.id, None)


def torch_hooks(root: torch.nn.Module, prefixes: str | tuple[str, ...] = PREFIX) -> list[tuple[torch.nn.Module, TorchHooks]]:
    """The :class:`TorchHooks` under ``root`` whose name starts with one of ``prefixes``, with their modules."""
    found = []
    for module in root.modules():
        for function in list(module._forward_pre_hooks.values()):
            owner = getattr(function, "tofu_sd_hooks", None)
            if isinstance(owner, TorchHooks) and owner.name.startswith(prefixes) and function is owner.functions[0]:
                found.append((module, owner))
    return found


def get_torch_hook(module: torch.nn.Module, name: str) -> ModelHook | None:
    """The hook that :class:`TorchHooks` runs on ``module`` itself under ``name``, or None."""
    for function in module._forward_pre_hooks.values():
        owner = getattr(function, "tofu_sd_hooks", None)
        if isinstance(owner, TorchHooks) and owner.name == name:
            return owner.hook
    return None


def _run_hook(fn_ref: HookFunctionReference, module: torch.nn.Module, *args, **kwargs):
    """What a registry hook does around the forward below it (as ``HookRegistry.register_hook``'s wrapper)."""
    args, kwargs = fn_ref.pre_forward(module, *args, **kwargs)
    return fn_ref.post_forward(module, fn_ref.forward(*args, **kwargs))


def _below(fn_ref: HookFunctionReference) -> Callable:
    """The forward that a registry hook's function reference wraps."""
    return fn_ref.original_forward if fn_ref.original_forward is not None else fn_ref.forward


def _set_below(fn_ref: HookFunctionReference, forward: Callable) -> None:
    if fn_ref.original_forward is not None:  # a hook with its own `new_forward` calls `original_forward`
        fn_ref.original_forward = forward
    else:
        fn_ref.forward = forward


def register_innermost(module: torch.nn.Module, hook: ModelHook, name: str) -> None:
    """Register ``hook`` on ``module`` through diffusers' registry, innermost: it wraps the module's forward
    directly, below every hook registered before it. A hook with ``new_forward`` runs that instead of the
    forward, which it reaches as ``hook.fn_ref.original_forward`` (as diffusers' own registration does)."""
    registry = HookRegistry.check_if_exists_or_initialize(module)
    if not registry._fn_refs:
        registry.register_hook(hook, name)
        return
    if name in registry.hooks:
        raise ValueError(f"{type(module).__name__} already has a hook named {name!r}.")
    registry._module_ref = hook.initialize_hook(registry._module_ref)
    first = registry._fn_refs[0]
    fn_ref = HookFunctionReference()
    below = _below(first)
    fn_ref.pre_forward, fn_ref.post_forward, fn_ref.forward = hook.pre_forward, hook.post_forward, below
    if hasattr(hook, "new_forward"):
        fn_ref.original_forward = below
        fn_ref.forward = functools.update_wrapper(functools.partial(hook.new_forward, registry._module_ref), hook.new_forward)
    _set_below(first, functools.update_wrapper(functools.partial(_run_hook, fn_ref, registry._module_ref), below))
    hook.fn_ref = fn_ref
    registry.hooks[name] = hook
    registry._hook_order.insert(0, name)
    registry._fn_refs.insert(0, fn_ref)


def remove_registry_hook(module: torch.nn.Module, name: str) -> None:
    """Remove the registry hook ``name`` from ``module``, relinking the chain around it (see the module
    docstring for why not ``HookRegistry.remove_hook``)."""
    registry = module._diffusers_hook
    index = registry._hook_order.index(name)
    below = _below(registry._fn_refs[index])
    if index == len(registry._fn_refs) - 1:
        registry._module_ref.forward = below
    else:
        _set_below(registry._fn_refs[index + 1], below)
    registry._module_ref = registry.hooks[name].deinitalize_hook(registry._module_ref)
    del registry.hooks[name]
    registry._hook_order.pop(index)
    registry._fn_refs.pop(index)


def is_class_forward(module: torch.nn.Module, forward: Any) -> bool:
    """Whether ``forward`` is only ``module``'s own class ``forward``, bound to it (no wrapper of anyone's)."""
    return getattr(forward, "__self__", None) is module and getattr(forward, "__func__", None) is type(module).forward


def unregister_all(root: torch.nn.Module, prefixes: str | tuple[str, ...] = PREFIX) -> bool:
    """Remove every registry hook under ``root`` whose name starts with one of ``prefixes``; True if any was there.

    A module left with no hook is left as it was before its first one: no registry and, unless something else
    (an offloading hook, say) installed its own, the class's ``forward`` rather than a copy of it."""
    found = False
    for module in root.modules():
        registry = getattr(module, "_diffusers_hook", None)
        if registry is None:
            continue
        ours = [name for name in registry.hooks if name.startswith(prefixes)]
        for name in ours:
            remove_registry_hook(module, name)
        found = found or bool(ours)
        if ours and not registry.hooks:
            del module._diffusers_hook
            if is_class_forward(module, module.__dict__.get("forward")):
                del module.forward
    return found


def hooked_modules(root: torch.nn.Module, prefixes: str | tuple[str, ...] = PREFIX) -> dict[torch.nn.Module, Callable]:
    """The modules under ``root`` with registry hooks named ``prefixes...``, each with the forward those wrap.

    That forward is the module's class ``forward`` (bound) unless something had replaced it before the first
    hook was registered. Raises ``TypeError`` if one of these modules also has other diffusers hooks: then its
    registry is not Token Fusion's alone (a deep copy could neither keep nor drop it correctly)."""
    wrapped: dict[torch.nn.Module, Callable] = {}
    for qualified, module in root.named_modules():
        registry = getattr(module, "_diffusers_hook", None)
        if registry is None or not any(name.startswith(prefixes) for name in registry.hooks):
            continue
        others = [name for name in registry.hooks if not name.startswith(prefixes)]
        if others:
            raise TypeError(
                f"cannot deep-copy: {qualified or type(module).__name__} has diffusers hooks besides Token Fusion's "
                f"({', '.join(others)}), and a copy of a diffusers hook stays bound to the original module. Remove "
                "those hooks, or Token Fusion (tofu_sd.remove), before copying; apply them to the copy after."
            )
        wrapped[module] = _below(registry._fn_refs[0])  # what the innermost hook wraps
    return wrapped
