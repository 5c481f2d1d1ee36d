"""MagCache's magnitude ratios for a model diffusers has none for: calibrated with MagCache's own calibrate mode
by one pipeline call of the run (see :mod:`.caches`)."""

from __future__ import annotations

import contextlib
import contextvars
import io
from collections.abc import Callable

import torch

from ..errors import EvaluationError
from .cache_hooks import Setup, cache_enabled


class Calibration:
    """How MagCache's ratios are calibrated in a run: ``run(steps)`` makes one pipeline call of ``steps`` steps at
    the run's options on a fixed job; the ratios are kept per transformer and step count."""

    def __init__(self, run: Callable[[int], None]) -> None:
        self.run = run
        self.ratios: dict[tuple[int, int], list[float]] = {}


CALIBRATION: contextvars.ContextVar[Calibration | None] = contextvars.ContextVar("magcache_calibration", default=None)


@contextlib.contextmanager
def calibrating(calibration: Calibration):
    """MagCache applied within the block calibrates with ``calibration`` where diffusers has no ratios."""
    token = CALIBRATION.set(calibration)
    try:
        yield calibration
    finally:
        CALIBRATION.reset(token)


def mag_ratios(setup: Setup) -> list[float] | torch.Tensor | None:
    """diffusers' ``FLUX_MAG_RATIOS`` on Flux; else the calibrated ratios (calibrated now if new), or None where
    nothing calibrates."""
    from diffusers.hooks.mag_cache import FLUX_MAG_RATIOS

    if setup.family.name == "Flux":
        return FLUX_MAG_RATIOS
    calibration = CALIBRATION.get()
    if calibration is None:
        return None
    key = (id(setup.model), setup.steps)
    if key not in calibration.ratios:
        calibration.ratios[key] = _calibrate(setup, calibration)
    return calibration.ratios[key]


def _calibrate(setup: Setup, calibration: Calibration) -> list[float]:
    """MagCache's calibrate mode through one pipeline call: the ratio its tail block computes at each step."""
    from diffusers.hooks import MagCacheConfig
    from diffusers.hooks.mag_cache import MagCacheBlockHook

    ratios: list[float] = []
    config = MagCacheConfig(calibrate=True, num_inference_steps=setup.steps)
    with cache_enabled(setup.model, config, setup.support) as hooks:
        tail = next(h for h in hooks if isinstance(h, MagCacheBlockHook) and h.is_tail)
        perform = tail._perform_calibration_step

        def record(state, residual):
            perform(state, residual)
            ratios.append(float(state.calibration_ratios[-1]))

        tail._perform_calibration_step = record
        with contextlib.redirect_stdout(io.StringIO()):  # calibrate mode prints the ratios
            calibration.run(setup.steps)
    if len(ratios) != setup.steps:
        raise EvaluationError(
            f"magcache: calibrating on a {type(setup.model).__name__} gave {len(ratios)} ratios for {setup.steps} steps "
            "(MagCache needs one transformer call per step)"
        )
    return ratios
