"""Peak memory of a stretch of work: CUDA peak allocated on a GPU, peak resident set size (RSS) otherwise."""

from __future__ import annotations

import contextlib
import resource
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

_STATUS = Path("/proc/self/status")
_CLEAR_REFS = Path("/proc/self/clear_refs")


@dataclass
class Peak:
    bytes: int = 0


def _reset_rss_peak() -> bool:
    """Linux resets the process's peak RSS (VmHWM) when "5" is written to clear_refs."""
    try:
        _CLEAR_REFS.write_text("5")
        return True
    except OSError:
        return False


def _rss_peak() -> int:
    try:
        for line in _STATUS.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024


class PeakMemory:
    """``with tracker.measure() as peak: ...`` sets ``peak.bytes`` to the peak of that block."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        if device.type == "cuda":
            self.kind = "cuda_peak_allocated"
        else:
            self.kind = "peak_rss" if _reset_rss_peak() else "peak_rss_since_process_start"

    @contextlib.contextmanager
    def measure(self):
        peak = Peak()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
        else:
            _reset_rss_peak()
        try:
            yield peak
        finally:
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
                peak.bytes = torch.cuda.max_memory_allocated(self.device)
            else:
                peak.bytes = _rss_peak()
