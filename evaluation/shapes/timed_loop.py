"""The resumable training loop under a wall-time budget, shared by the SD3-style model's training
(:mod:`evaluation.shapes_sd3.train`) and the U-Net model's fine-tune (:mod:`.finetune`): a checkpoint (weights,
optimizer, EMA, step, loss log, wall time) every few minutes and at the end, written atomically; a restarted run continues from it and, since every
step's random generators are drawn from ``(seed, step)``, takes the same batches as an uninterrupted run."""

from __future__ import annotations

import math
import time
from pathlib import Path

import numpy as np
import torch

from .loop import lr_factor, optimizer_step, save_atomic, write_loss_log

CHECKPOINT = "transformer.ckpt"
LOSS_CSV = "loss.csv"


def lr_factor_time(step: int, progress: float, warmup: int) -> float:
    """Linear warm-up over ``warmup`` steps, then cosine decay to 10% over ``progress`` (time used / budget)."""
    if step < warmup:
        return (step + 1) / warmup
    return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def load_checkpoint(work: Path) -> dict | None:
    path = Path(work) / CHECKPOINT
    return torch.load(path, weights_only=False) if path.exists() else None


def train_loop(
    work: Path, modules: dict, optimizer, steps: int, step_fn, lr: float, warmup: int, ema=None,
    checkpoint_seconds: float = 300.0, checkpoint_every: int | None = None, log_every: int = 10, echo=print,
    budget_seconds: float = 0.0,
) -> dict:  # fmt: skip
    """Train ``modules`` for ``steps`` steps of ``step_fn(step) -> loss`` (AdamW ``optimizer``, gradients clipped
    to norm 1, learning rate :func:`~evaluation.shapes.loop.lr_factor` times ``lr``, ``ema`` if given), resuming
    from ``work/transformer.ckpt``. Checkpoints every ``checkpoint_seconds`` of wall time (and every
    ``checkpoint_every`` steps if given) and at the end; ``loss.csv`` grows by one line a step. Returns the final
    checkpoint's dict.

    With ``budget_seconds``, training stops when its wall time (summed over resumes) reaches the budget, or at
    ``steps``, whichever comes first, and the cosine decay runs over the budget's time instead of the steps
    (:func:`lr_factor_time`): the run ends in time on a machine shared with other jobs, whatever its step rate. A
    resumed run takes the same batches, but its learning rates depend on the step times.
    """
    work = Path(work)
    work.mkdir(parents=True, exist_ok=True)
    ckpt = load_checkpoint(work)
    start, log, seconds = 0, [], 0.0
    if ckpt is not None:
        for name, module in modules.items():
            module.load_state_dict(ckpt[name])
        optimizer.load_state_dict(ckpt["optimizer"])
        if ema is not None:
            ema.load_state_dict(ckpt["ema"])
        start, log, seconds = ckpt["step"], ckpt["log"], ckpt["seconds"]
        echo(f"resumed at step {start} of {steps} ({seconds:.0f} s trained)")
    write_loss_log(work / LOSS_CSV, log)  # drops the lines of steps after the checkpoint

    def save(step: int, finished: bool = False) -> dict:
        state = {name: module.state_dict() for name, module in modules.items()}
        state.update(optimizer=optimizer.state_dict(), step=step, log=log, seconds=seconds + time.perf_counter() - t0,
                     finished=finished)  # fmt: skip
        if ema is not None:
            state["ema"] = ema.state_dict()
        save_atomic(state, work / CHECKPOINT)
        return state

    for module in modules.values():
        module.train()
    params = [p for g in optimizer.param_groups for p in g["params"]]
    t0 = last_save = time.perf_counter()
    state = ckpt
    step = start
    if ckpt is not None and ckpt.get("finished"):
        steps = step  # a finished run (by steps or by its budget) stays finished
    with open(work / LOSS_CSV, "a") as csv:
        while step < steps:
            elapsed = seconds + time.perf_counter() - t0
            if budget_seconds and elapsed >= budget_seconds:
                break
            if budget_seconds:
                factor = lr_factor_time(step, elapsed / budget_seconds, warmup)
            else:
                factor = lr_factor(step, steps, warmup)
            for group in optimizer.param_groups:
                group["lr"] = lr * factor
            value = optimizer_step(step_fn(step), optimizer, params, ema, "", step)
            log.append((step, value))
            csv.write(f"{step},{value:.6f}\n")
            csv.flush()
            step += 1
            now = time.perf_counter()
            if step % log_every == 0:
                recent = np.mean([v for _, v in log[-log_every:]])
                echo(f"step {step}/{steps} loss {recent:.4f} {(now - t0) / (step - start):.2f} s/step "
                     f"lr {lr * factor:.2e} {seconds + now - t0:.0f} s")  # fmt: skip
            if now - last_save >= checkpoint_seconds or (checkpoint_every and step % checkpoint_every == 0):
                state = save(step)
                last_save = time.perf_counter()
    if state is None or not state.get("finished"):
        state = save(step, finished=True)
        echo(f"finished at step {step} after {state['seconds']:.0f} s of training")
    for module in modules.values():
        module.eval()
    return state
