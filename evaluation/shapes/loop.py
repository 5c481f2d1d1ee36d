"""The training loop that every stage of the built-in model's training shares: checkpointed and resumable, with
the random generators of each step drawn from ``(seed, stage, step)``; and a run's state, which both built-in
models' trainings keep in their work folder (:func:`run_state`)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import torch

from ..files import atomic_path, write_text_atomic

STAGES = ("data", "vae", "latents", "unet", "classifier", "export")


def step_generators(seed: int, stage: str, step: int) -> tuple[np.random.Generator, torch.Generator]:
    """Generators for step ``step`` of ``stage``: the same on a resumed run as on an uninterrupted one."""
    key = [seed, STAGES.index(stage), step]
    rng = np.random.default_rng(key)
    return rng, torch.Generator().manual_seed(int(np.random.default_rng(key + [1]).integers(2**62)))


def lr_factor(step: int, total: int, warmup: int) -> float:
    """Linear warm-up, then cosine decay to 10%."""
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress))


def save_atomic(obj, path: Path) -> None:
    """``torch.save`` through a temporary file: the file at ``path`` is always a whole checkpoint."""
    with atomic_path(path) as tmp:
        torch.save(obj, tmp)


def run_state(path: Path, current: dict, advice: str) -> dict:
    """The state of the run whose ``state.json`` is ``path`` (empty for a new run), its ``config`` set to
    ``current``, the run's options; SystemExit if the run was started with other ones (``advice``: what to do)."""
    state = json.loads(path.read_text()) if path.exists() else {}
    recorded = state.get("config")
    if recorded is not None and recorded != current:
        diff = {k: (recorded.get(k), v) for k, v in current.items() if recorded.get(k) != v}
        raise SystemExit(f"{path.parent} holds a run with other options {diff}; {advice}")
    state.setdefault("config", current)
    return state


def write_loss_log(path: Path, log: list[tuple[int, float]]) -> None:
    write_text_atomic(path, "step,loss\n" + "".join(f"{s},{v:.6f}\n" for s, v in log))


def _resume(path: Path, modules: dict, optimizer, ema) -> tuple[int, list]:
    """The step and loss log of the checkpoint at ``path`` (its weights loaded), or (0, []) without one."""
    if not path.exists():
        return 0, []
    ckpt = torch.load(path, weights_only=False)
    for name, module in modules.items():
        module.load_state_dict(ckpt[name])
    optimizer.load_state_dict(ckpt["optimizer"])
    if ema is not None:
        ema.load_state_dict(ckpt["ema"])
    return ckpt["step"], ckpt["log"]


def optimizer_step(loss, optimizer, params: list, ema, what: str, step: int) -> float:
    """One training step from ``loss``: backward, gradients clipped to norm 1, the optimizer's step and the EMA's
    (if any). Returns the loss; SystemExit (``what`` leading its message) if it is not finite."""
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(params, 1.0)
    optimizer.step()
    if ema is not None:
        ema.step(params)
    value = float(loss.detach())
    if not math.isfinite(value):
        raise SystemExit(f"{what}loss became {value} at step {step}; lower the learning rate")
    return value


def train_loop(
    work: Path, stage: str, modules: dict, optimizer, steps: int, step_fn, lr: float, warmup: int, ema=None,
    checkpoint_every: int = 100, make_bar=None,
) -> list[tuple[int, float]]:  # fmt: skip
    """Train ``modules`` for ``steps`` steps of ``step_fn(step) -> loss`` (gradients clipped to norm 1, learning
    rate :func:`lr_factor` times ``lr``, EMA if given), from the stage's checkpoint in ``work`` if there is one;
    a checkpoint and ``loss_<stage>.csv`` every ``checkpoint_every`` steps and at the end; ``make_bar(stage, total,
    initial)`` makes the progress bar. Returns the loss log."""
    path = work / f"{stage}.ckpt"
    start, log = _resume(path, modules, optimizer, ema)

    def save(step: int) -> None:
        ckpt = {name: module.state_dict() for name, module in modules.items()}
        ckpt.update(optimizer=optimizer.state_dict(), step=step, log=log)
        if ema is not None:
            ckpt["ema"] = ema.state_dict()
        save_atomic(ckpt, path)
        write_loss_log(work / f"loss_{stage}.csv", log)

    for module in modules.values():
        module.train()
    bar = make_bar(stage, steps, start)
    running = None
    params = [p for g in optimizer.param_groups for p in g["params"]]
    for step in range(start, steps):
        for group in optimizer.param_groups:
            group["lr"] = lr * lr_factor(step, steps, warmup)
        value = optimizer_step(step_fn(step), optimizer, params, ema, f"{stage}: ", step)
        log.append((step, value))
        running = value if running is None else 0.98 * running + 0.02 * value
        bar.update(1)
        bar.set_postfix(loss=f"{running:.4f}")
        if (step + 1) % checkpoint_every == 0 or step + 1 == steps:
            save(step + 1)
    bar.close()
    for module in modules.values():
        module.eval()
    return log
