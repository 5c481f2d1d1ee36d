"""What ``torch.profiler`` measures on the CPU for the bench: the peak of live tensors of a stretch of work (from
the allocation trace) and the top-level aten ops it runs, without kineto's lines on the terminal.

``torch.profiler`` runs through kineto, which logs at its own levels on the process's stderr (C++, not Python's
logging): ``USDT: ... profiler_start`` / ``profiler_stop`` markers at every profile, and, on a CUDA build of
torch without a usable GPU, ``ERROR: ... gpuGetDeviceCount failed with code 35`` (the CUDA driver's
"insufficient driver") once, when it looks for devices to describe in a trace. Neither is an error of the
measurement. Kineto reads its threshold, ``KINETO_LOG_LEVEL`` (0 verbose ... 4 error, 5 USDT), once, when the
first profile of the process starts; :func:`cpu_profile` sets it above every level for that moment, unless the
user set it. The profiler, its events and so the numbers are the same as without it.
"""

from __future__ import annotations

import collections
import contextlib
import os

KINETO_LOG_LEVEL = "KINETO_LOG_LEVEL"
KINETO_SILENT = "6"  #: above kineto's highest level (USDT, 5): it prints nothing


@contextlib.contextmanager
def cpu_profile(**kwargs):
    """``torch.profiler.profile`` of CPU activity (``kwargs`` as there), with kineto silent unless the user set
    ``KINETO_LOG_LEVEL``; the environment is as before afterwards."""
    from torch.profiler import ProfilerActivity, profile

    added = KINETO_LOG_LEVEL not in os.environ
    if added:
        os.environ[KINETO_LOG_LEVEL] = KINETO_SILENT
    try:
        with profile(activities=[ProfilerActivity.CPU], **kwargs) as prof:
            yield prof
    finally:
        if added:
            os.environ.pop(KINETO_LOG_LEVEL, None)


def peak_alloc_bytes(fn) -> int:
    """Peak bytes of tensors allocated by ``fn()`` and alive at once, from the profiler's allocation trace (each
    op's net allocation, frees in time order): unlike peak RSS, it does not depend on what ran before."""
    with cpu_profile(profile_memory=True) as prof:
        fn()
    live = top = 0
    for event in sorted(prof.events(), key=lambda e: e.time_range.start):
        live += event.self_cpu_memory_usage
        top = max(top, live)
    return top


_VIEW_OPS = {
    "aten::view", "aten::_unsafe_view", "aten::slice", "aten::select", "aten::expand", "aten::transpose", "aten::t",
    "aten::permute", "aten::unsqueeze", "aten::squeeze", "aten::as_strided", "aten::alias", "aten::unbind",
    "aten::split", "aten::split_with_sizes", "aten::chunk", "aten::narrow", "aten::detach", "aten::_reshape_alias",
    "aten::view_as", "aten::expand_as", "aten::unflatten", "aten::diagonal", "aten::lift_fresh", "aten::movedim",
    "aten::result_type", "aten::promote_types", "aten::resolve_conj", "aten::resolve_neg",
}  # fmt: skip
#: Composite ops that launch work only when they copy (a non-viewable reshape, a real dtype change, ...).
_PASS_THROUGH = {"aten::reshape", "aten::flatten", "aten::to", "aten::contiguous", "aten::type_as"}


def count_ops(fn) -> collections.Counter:
    """Top-level aten ops of ``fn()`` by name, as ``torch.profiler`` records them, views and no-op casts excluded."""
    with cpu_profile() as prof:
        fn()
    counts = collections.Counter()
    for event in prof.events():
        if event.cpu_parent is not None or not event.name.startswith("aten::") or event.name in _VIEW_OPS:
            continue
        if event.name in _PASS_THROUGH and not any(
            child.name not in _VIEW_OPS and child.name not in _PASS_THROUGH for child in event.cpu_children
        ):
            continue
        counts[event.name] += 1
    return counts
