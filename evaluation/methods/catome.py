"""CA-ToMe (Saghatchian et al. 2025) as a peer method, through the optional ``ca-tome`` package.

ToMe with a cosine-similarity threshold instead of a ratio, and matchings reused between the steps of a cache
schedule: the bench therefore times a matching step and a cached step and weighs them as a whole schedule does
(:data:`STEP_MIX`).
"""

from __future__ import annotations

import contextlib
import statistics

import torch

from tofu_sd import TokenFusionConfig

from ..families import unet_of

from ..errors import EvaluationError
from .base import StepMix
from .tofu import tome_max_downsample

CATOME_THRESHOLD = 0.7  #: ca-tome's default cosine-similarity threshold (its ``apply_patch(r=0.7)``)
CATOME_CACHE = "CONFIG_3"  #: ca-tome's best cache schedule (its README): steps where matchings are recomputed
CATOME_BARE_STEPS = 50  #: the schedule length ca-tome's cache schedules are made for
CATOME_INSTALL = "pip install --no-deps ca-tome==0.1.3"
#: Attributes that the package's patch adds to modules and its ``remove_patch`` leaves behind.
_ADDED = ("_cache_info", "_ca_tome_info", "inference_step", "use_ada_layer_norm", "use_ada_layer_norm_zero")


def catome_params(value: float | None, options: TokenFusionConfig) -> dict:
    return {"threshold": CATOME_THRESHOLD, "cache": CATOME_CACHE, "keys_removed": None}  # adaptive: not fixed


@contextlib.contextmanager
def catome_patch(pipe, options: TokenFusionConfig, params: dict):
    with catome_applied(pipe, options, params["threshold"], params["cache"]):
        yield


def _step_counter(blocks: list, scheduler):
    """The U-Net forward pre-hook that numbers the steps for the patched blocks (see :func:`catome_applied`)."""
    counter = {"calls": 0}

    def set_step(module, args, kwargs):
        timestep = kwargs["timestep"] if "timestep" in kwargs else args[1]
        timesteps = getattr(scheduler, "timesteps", None)
        # The first step of a pipeline call runs at the schedule's first timestep (some schedules, PNDM's, repeat
        # later timesteps, so the step is counted rather than looked up).
        if timesteps is not None and len(timesteps) and float(torch.as_tensor(timestep).flatten()[0]) == float(timesteps[0]):
            counter["calls"] = 0
        elif timesteps is None and counter["calls"] == CATOME_BARE_STEPS:  # a bare U-Net: cycle through a schedule
            counter["calls"] = 0
        counter["calls"] += 1
        for block in blocks:
            block.inference_step = counter["calls"]
            if counter["calls"] == 1:
                block._cache_info["merge"] = block._cache_info["unmerge"] = None
        return None

    return set_step


@contextlib.contextmanager
def catome_applied(pipe, options: TokenFusionConfig, threshold: float = CATOME_THRESHOLD, cache: str = CATOME_CACHE):
    """CA-ToMe through the ``ca-tome`` package's block patch (``ca_tome.patch.apply_patch``).

    The package's ``apply_CA_ToMe`` also replaces the U-Net's ``forward`` and adds ``pipe.call``, copies of an
    older diffusers' code whose only change is an ``inference_step`` argument that reaches the blocks (and it
    does not undo them, so a plain ``pipe()`` fails afterwards). Here a forward pre-hook on the U-Net gives the
    blocks that step instead, numbered as the package's pipeline numbers it (1 for the first step), and
    drops the cached matchings at the first step of each pipeline call, which the package would carry over from
    the previous images. Without a scheduler (a bare U-Net) every U-Net call counts as the next step of a
    :data:`CATOME_BARE_STEPS`-step schedule, over and over. ``max_downsample``, ``sx``, ``sy`` and ``use_rand``
    come from ``options``, on the blocks that ``tome`` patches.
    """
    try:
        from ca_tome import CacheConf
        from ca_tome.patch import apply_patch, remove_patch
    except ImportError as error:
        raise EvaluationError(
            f"method catome needs the ca-tome package ({error}). Install it with `{CATOME_INSTALL}`: its metadata "
            "pins torch<2.2.2 and numpy<2, which would replace this environment's torch (diffusers 0.42 needs "
            "torch>=2.6), while its code runs on them (README: CA-ToMe)"
        ) from error
    unet = unet_of(pipe)
    before = {id(m): set(m.__dict__) for m in unet.modules()}
    blocks = []
    apply_patch(
        unet, list(getattr(CacheConf, cache)), r=threshold, max_downsample=tome_max_downsample(unet, options),
        sx=options.sx, sy=options.sy, use_rand=options.use_rand,
    )  # fmt: skip
    blocks.extend(m for m in unet.modules() if "_cache_info" in m.__dict__)
    handle = unet.register_forward_pre_hook(_step_counter(blocks, getattr(pipe, "scheduler", None)), with_kwargs=True)
    try:
        yield
    finally:
        handle.remove()
        remove_patch(unet)
        for module in unet.modules():  # the attributes the patch added (remove_patch leaves them)
            for attr in set(module.__dict__) - before.get(id(module), set()):
                if attr in _ADDED:
                    del module.__dict__[attr]


# ---------------------------------------------------------------- its step time in the bench


def catome_compute_fraction(steps: int = CATOME_BARE_STEPS) -> float:
    """Fraction of the steps of a ``steps``-step schedule at which CA-ToMe computes its matchings (the first, and
    those of its cache schedule); at the others it reuses the cached ones."""
    from ca_tome import CacheConf

    return (1 + len({s for s in getattr(CacheConf, CATOME_CACHE) if 2 <= s <= steps})) / steps


def _note(name: str, summary: dict) -> str:
    return (
        f"per-step mean of a {summary['schedule_steps']}-step schedule, {summary['compute_fraction']:.0%} of steps "
        f"matching (median {statistics.median(summary['compute_s']):.4f} s), the rest cached "
        f"({statistics.median(summary['cached_s']):.4f} s)"
    )


def step_mix(params: dict, options: TokenFusionConfig) -> StepMix:
    """A fresh application's first U-Net call matches (step 1), its second reuses the matchings (step 2 is in no
    cache schedule), weighed as a :data:`CATOME_BARE_STEPS`-step schedule does."""
    share = catome_compute_fraction()
    return StepMix(
        phases=("compute", "cached"), weights=(share, 1 - share),
        summary={"compute_fraction": share, "schedule_steps": CATOME_BARE_STEPS}, note=_note,
    )  # fmt: skip
