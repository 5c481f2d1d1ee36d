"""The SD3-style model's per-step random generators; its training loop is :mod:`evaluation.shapes.timed_loop`,
shared with the U-Net model's fine-tune."""

from __future__ import annotations

import numpy as np
import torch

from ..shapes.timed_loop import CHECKPOINT, LOSS_CSV, load_checkpoint, lr_factor_time, train_loop

__all__ = ["CHECKPOINT", "LOSS_CSV", "load_checkpoint", "lr_factor_time", "step_generators", "train_loop"]


def step_generators(seed: int, step: int, stage: int = 0) -> tuple[np.random.Generator, torch.Generator]:
    """Generators for step ``step``: the same on a resumed run as on an uninterrupted one. ``stage`` > 0 (a run
    continuing an exported model) draws other batches than the first run's."""
    key = [seed, 31, step] + ([stage] if stage else [])  # 31: apart from the --model tiny stages' keys
    rng = np.random.default_rng(key)
    return rng, torch.Generator().manual_seed(int(np.random.default_rng(key + [1]).integers(2**62)))
