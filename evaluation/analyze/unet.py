"""Measuring on a U-Net, with forward pre-hooks: the blocks ``tofu_sd.apply`` patches (or all of them), the
timestep of each U-Net call and the token grid of each transformer, and a probe per block."""

from __future__ import annotations

from dataclasses import replace

import torch

from tofu_sd import Site, TokenFusionConfig, get_state
from tofu_sd.api import model_and_family
from tofu_sd.families.unet import select_by_resolution, transformer_block_sites
from tofu_sd.hooks import MatchingHook
from tofu_sd.state import BlockState, CallState, GridState

from ..errors import EvaluationError
from ..linearity import timestep_group
from .config import AnalyzeConfig
from .measurement import check_unreduced, image_size, method_description, recorded, result, train_timesteps
from .probe import BlockProbe, block_result


class Recorder:
    """Hooks on the U-Net (timestep), the transformers (grid) and the probed blocks, removed by :meth:`close`."""

    def __init__(self, unet: torch.nn.Module, sites: list[Site], config: AnalyzeConfig,
                 reduction: TokenFusionConfig, num_train: int):  # fmt: skip
        self.config, self.num_train = config, num_train
        self.call = CallState(reduction, len(sites))
        self.grids: dict[int, GridState] = {}
        self.group = "early"
        self.handles = [unet.register_forward_pre_hook(self._on_unet, with_kwargs=True)]
        self.probes = []
        for index, site in enumerate(sites):
            if id(site.grid_module) not in self.grids:
                self.grids[id(site.grid_module)] = GridState()
                self.handles.append(site.grid_module.register_forward_pre_hook(self._on_transformer, with_kwargs=True))
            matcher = MatchingHook(self.call, self.grids[id(site.grid_module)], BlockState(), index)
            probe = BlockProbe(site, matcher, self)
            self.probes.append(probe)
            self.handles += [
                site.block.register_forward_pre_hook(probe.on_block, with_kwargs=True),
                site.block.attn1.register_forward_pre_hook(probe.on_attn1, with_kwargs=True),
                site.block.ff.register_forward_pre_hook(probe.on_ff, with_kwargs=True),
            ]

    def _on_unet(self, module, args, kwargs):
        t = kwargs.get("timestep", args[1] if len(args) > 1 else None)
        self.call.start(t)
        value = float(torch.as_tensor(t).reshape(-1)[0]) if t is not None else 0.0
        self.group = timestep_group(value, self.num_train)
        return None

    def _on_transformer(self, module, args, kwargs):
        x = args[0] if args else kwargs.get("hidden_states")
        self.grids[id(module)].grid = tuple(x.shape[-2:]) if x is not None and x.ndim == 4 else None
        return None

    def close(self) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles = []
        self.call.start(None)


def analysis_sites(unet: torch.nn.Module, config: AnalyzeConfig) -> tuple[list[Site], int]:
    """The blocks to measure and the ``max_downsample`` with which ``tofu_sd.apply`` patches exactly those."""
    sites = transformer_block_sites(unet)
    if not sites:
        raise EvaluationError(f"{type(unet).__name__} has no transformer block to analyze")
    if config.all_blocks:
        finest, coarsest = min(s.downsample for s in sites), max(s.downsample for s in sites)
        return sites, coarsest // finest
    return select_by_resolution(sites, config.reduction.max_downsample), config.reduction.max_downsample


def measure_unet(pipe, config: AnalyzeConfig, progress: bool) -> dict:
    """:func:`~.command.measure` on a U-Net pipeline."""
    if config.reduction.blocks is not None:
        raise EvaluationError(
            f"--blocks {config.reduction.blocks} chooses blocks of a diffusion transformer; a U-Net's blocks are "
            "chosen by resolution: use --max-downsample (or --all-blocks)"
        )
    unet, family = model_and_family(pipe)
    check_unreduced(get_state(unet), transformer_block_sites(unet), "unet")
    sites, max_downsample = analysis_sites(unet, config)
    num_train, size = train_timesteps(pipe), image_size(pipe, config)
    reduction = replace(config.reduction, schedule=None, max_downsample=max_downsample)
    recorder = Recorder(unet, sites, config, reduction, num_train)
    started = recorded(pipe, config, recorder, size, progress)
    default = family.default_schedule(sites)
    blocks = [
        block_result(probe, letter, name=site.name, downsample=site.downsample, on_down_path=site.on_down_path)
        for site, probe, letter in zip(sites, recorder.probes, default)
    ]  # fmt: skip
    return result(pipe, config, blocks, default, reduction, method_description(config, reduction, num_train), size, started)
