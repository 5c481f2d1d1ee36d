"""What a measurement does on any model: denoise the configured prompts with a recorder's hooks in place, refuse
a model that is already reduced, and put ``fl.json``'s content together from the measured blocks."""

from __future__ import annotations

import time
from dataclasses import asdict

import torch
from tqdm.auto import tqdm

import prompts
from tofu_sd import TokenFusionConfig

from ..errors import EvaluationError
from ..linearity import FUNCTIONS, propose_schedule
from ..models import call_kwargs
from ..pipeline_calls import call_arguments, default_sides
from ..sampling import image_seed
from .config import AnalyzeConfig


def image_size(pipe, config: AnalyzeConfig) -> tuple[int, int]:
    """(height, width): the configured ones, else the model's default."""
    height, width = default_sides(pipe)
    return config.height or height, config.width or width


def train_timesteps(pipe) -> int:
    """The number of timesteps the pipeline's model was trained with (its scheduler's; 1000 if not said)."""
    return int(pipe.scheduler.config.get("num_train_timesteps", 1000))


def check_unreduced(state, sites, model: str) -> None:
    """EvaluationError if Token Fusion is applied (``state``, tofu_sd's state of the pipeline or model, is not
    None) or a block of ``sites`` runs its feed-forward in chunks (``model``: the pipeline's attribute to call
    ``disable_forward_chunking()`` on)."""
    if state is not None:
        raise EvaluationError(
            "Token Fusion is applied to this pipeline; the analysis measures the unreduced model. "
            "Call tofu_sd.remove(pipe) first."
        )
    for site in sites:
        if getattr(site.block, "_chunk_size", None) is not None:
            raise EvaluationError(
                f"{site.name} runs its feed-forward in chunks, so ff never sees the whole token set; "
                f"call pipe.{model}.disable_forward_chunking() before the analysis."
            )


def run_prompts(pipe, config: AnalyzeConfig, height: int, width: int, progress: bool) -> None:
    """Denoise every (class, sample) of ``config`` with the seeds of ``tofu-sd generate``, latents only."""
    jobs = [(c, k) for c in config.classes for k in range(config.per_class)]
    with tqdm(total=len(jobs), unit="img", disable=not progress, desc="analyzing") as bar:
        for start in range(0, len(jobs), config.batch_size):
            batch = jobs[start : start + config.batch_size]
            with torch.no_grad():
                pipe(
                    prompt=[prompts.prompt(c, config.prompts) for c, _ in batch],
                    num_inference_steps=config.steps,
                    height=height,
                    width=width,
                    generator=[torch.Generator("cpu").manual_seed(image_seed(config.seed, c, k)) for c, k in batch],
                    output_type="latent",  # the images themselves are not needed
                    **call_arguments(pipe, config.guidance_scale, config.frames),
                    **call_kwargs(config.model),
                )
            bar.update(len(batch))


def recorded(pipe, config: AnalyzeConfig, recorder, size: tuple[int, int], progress: bool) -> float:
    """Denoise the prompts (:func:`run_prompts`, at ``size``, (height, width)) with ``recorder``'s hooks in place,
    closing it afterwards whatever happens; returns when it started (``time.perf_counter``)."""
    started = time.perf_counter()
    try:
        run_prompts(pipe, config, *size, progress)
    finally:
        recorder.close()
    return started


def method_description(config: AnalyzeConfig, reduction: TokenFusionConfig, num_train: int) -> dict:
    """How the numbers were measured, for ``fl.json`` (on a U-Net; :mod:`.dit` adapts it)."""
    return {
        "fl": "Eq. 8: ||f(X1) - f(X2)|| / sum of ||f(X(t_i+1)) - f(X(t_i))|| over the polygonal path",
        "num_points": config.num_points,
        "pairs": f"tofu_sd's matching on each block's input at ratio {reduction.ratio}, up to {config.max_pairs} "
        "pairs per call and batch element, evenly spaced in similarity rank",
        "functions": {
            "self_attention": "attn1 with the interpolated token as query; keys and values: the call's full "
            "attn1 input, fixed",
            "feed_forward": "ff on the interpolated ff input",
        },
        "timestep_groups": {"early": f"t >= {2 * num_train / 3:g}", "middle": f"{num_train / 3:g} <= t < {2 * num_train / 3:g}",
                            "late": f"t < {num_train / 3:g}"},  # fmt: skip
        "threshold": config.threshold,
        "decision": config.decision,
    }


def _decision_value(fl: dict, decision: str) -> float | None:
    values = [fl[f]["mean"] for f in (FUNCTIONS if decision == "min" else (decision,))]
    return None if any(v is None for v in values) else min(values)


def _config_dict(config: AnalyzeConfig, pipe, height: int, width: int) -> dict:
    data = asdict(config)
    data["reduction"] = asdict(config.reduction)
    data.update(height=height, width=width, model_class=type(pipe).__name__)
    return data


def result(pipe, config: AnalyzeConfig, blocks: list[dict], default: str, reduction: TokenFusionConfig,
           method: dict, size: tuple[int, int], started: float) -> dict:  # fmt: skip
    """``fl.json``'s content: the measured ``blocks``, each given its proposed letter, the proposed and ``default``
    schedules, the options that apply the proposal (``reduction``'s, with it), how it was measured (``method``),
    the configuration and the seconds since ``started``."""
    schedule = propose_schedule([_decision_value(b["fl"], config.decision) for b in blocks], config.threshold, default)
    for block, letter in zip(blocks, schedule):
        block["proposed_letter"] = letter
    return {
        "blocks": blocks,
        "proposed_schedule": schedule,
        "default_schedule": default,
        "apply_kwargs": {**asdict(reduction), "schedule": schedule},
        "method": method,
        "config": _config_dict(config, pipe, *size),
        "seconds": time.perf_counter() - started,
    }
