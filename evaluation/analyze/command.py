"""``tofu-sd analyze``: :func:`measure` on a pipeline of either kind, :func:`analyze` (load, measure, write
``fl.json`` and ``fl.png``) and :func:`format_summary`, the table it prints."""

from __future__ import annotations

import time
from pathlib import Path

from ..errors import EvaluationError
from ..files import write_json_atomic
from ..linearity import FUNCTIONS
from ..linearity_plot import plot
from ..manifest import library_versions
from ..models import is_transformer_pipeline, load_pipeline, resolve_device, resolve_dtype
from ..pipeline_calls import check_frames
from .config import AnalyzeConfig
from .dit import measure_dit
from .unet import measure_unet


def measure(pipe, config: AnalyzeConfig, progress: bool = True) -> dict:
    """Run ``pipe`` on the configured prompts and measure FL at each analysed block; returns ``fl.json``'s content."""
    if is_transformer_pipeline(pipe):
        return measure_dit(pipe, config, progress)
    return measure_unet(pipe, config, progress)


def analyze(config: AnalyzeConfig, pipe=None, progress: bool = True) -> dict:
    """Measure FL on ``pipe`` (loaded from ``config.model`` when None), write ``fl.json`` and ``fl.png`` in
    ``config.out``, and return the result; ``result["proposed_schedule"]`` goes to ``tofu_sd.apply(pipe,
    schedule=..., max_downsample=result["apply_kwargs"]["max_downsample"])``.
    """
    out = Path(config.out)
    if out.exists() and not out.is_dir():
        raise EvaluationError(f"--out {out} is a file; give a folder for fl.json and fl.png")
    if pipe is None:
        device = resolve_device(config.device)
        pipe = load_pipeline(config.model, device, resolve_dtype(config.dtype, device), config.scheduler)
    check_frames(pipe, config.frames)
    result = measure(pipe, config, progress)
    result["versions"] = library_versions()
    result["date"] = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())
    out.mkdir(parents=True, exist_ok=True)
    write_json_atomic(out / "fl.json", result)
    plot(result, out / "fl.png")
    return result


def format_summary(result: dict) -> str:
    """A table of the mean FL per block and function, with the default and proposed letters."""
    attention = "attn FL" if result.get("architecture") not in (None, "PixArt") else "attn1 FL"
    lines = [f"{'block':<50} {'tokens':>6} {attention:>9} {'ff FL':>9}  default  proposed"]
    for b in result["blocks"]:
        a, f = (b["fl"][name]["mean"] for name in FUNCTIONS)
        fmt = lambda v: "-" if v is None else f"{v:.4f}"  # noqa: E731
        lines.append(f"{b['name']:<50} {b['tokens'] or '-':>6} {fmt(a):>9} {fmt(f):>9}  {b['default_letter']:^7}  {b['proposed_letter']:^8}")
    return "\n".join(lines)
