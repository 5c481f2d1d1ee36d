"""A method name in use: its parameters (:func:`method_params`) and its patch (:func:`method_applied`)."""

from __future__ import annotations

import contextlib

from tofu_sd import TokenFusionConfig

from .base import MethodOptions
from .names import parse_name


def method_params(name: str, options: TokenFusionConfig, more: MethodOptions | None = None) -> dict:
    """What shapes a name's images beyond the run's options, and the fraction of keys its attention drops:
    recorded per method in the manifest (a run refuses to change it) and used by the report's Pareto plot.
    ``more``: the run's :class:`~.base.MethodOptions` (``--cache-interval``; None: the defaults)."""
    return parse_name(name).params(options, more)


@contextlib.contextmanager
def method_applied(pipe, method: str, options: TokenFusionConfig, more: MethodOptions | None = None):
    """Patch ``pipe`` (a pipeline, or a bare U-Net) for ``method`` for the duration of the block, and restore it
    afterwards.

    ``method`` is a name, ``tofu`` or ``tofu@0.3``: the ratio after ``@`` replaces ``options.ratio``. ``tome``
    takes ``ratio``, ``max_downsample``, ``sx``, ``sy`` and ``use_rand`` from ``options`` (ToMe has no schedule
    and no seed); ``tofu`` takes all of them (``tofu-P``/``-A``/``-M`` and ``tofu-local`` replace the schedule or
    the matching). ``todo`` takes ``max_downsample`` and its pooling from the name (2x2 without a ratio).
    ``catome`` takes ``max_downsample``, ``sx``, ``sy`` and ``use_rand``, with ca-tome's default threshold and
    cache schedule. ``oracle`` takes ``max_downsample``. ``tofu+ff`` and the other ``+<module>`` names are tofu
    (or tome) on more sub-modules of each block. ``deepcache@N`` is DeepCache at interval N (3 unsuffixed); the
    ``deepcache+<tofu>`` names are that tofu variant with DeepCache around it at ``more.cache_interval``. On
    diffusion transformers, ``fbcache@T``, ``taylorseer@N``, ``taylorseer-lite@N``, ``magcache@T``, ``pab@N`` and
    ``fastercache@N`` are diffusers' step caches (``magcache`` takes ``more.steps``, ``fastercache``
    ``more.guidance_scale``), and ``<cache>+tofu`` that cache at its default with tofu at the name's ratio
    (:mod:`.caches`). See :mod:`evaluation.methods.registry`.
    """
    name = parse_name(method)
    with name.method.patch(pipe, options, name.params(options, more)):
        yield
