"""What Token Fusion needs to know about one family of models, and nothing else: :class:`Family`.

An adapter says where a model's patchable blocks are (:class:`Site`), how a call's token grid and timestep are
found, which sub-modules of a block run on reduced tokens and how (:class:`Part`), how rotary positions follow
their tokens, which options the family supports and which schedule it takes by default. Everything else (call
state, matching, reduce / restore, key / value reduction, removal, deep copies, compile, threads) is written once,
in :mod:`tofu_sd.install` and the hook modules. Families are registered per model class
(:func:`tofu_sd.register_family`).

The defaults of :class:`Family` are those of a diffusion transformer: every block patched unless ``blocks``
chooses others, one token grid per model call (read by a hook on the model itself, outside any compiled graph),
MLERP merging (``M``) in every block, ``max_downsample`` and ``modules`` refused.
"""

from __future__ import annotations

import importlib.metadata
from dataclasses import dataclass, fields

import torch
from packaging.version import Version

from ..arguments import argument
from ..config import TokenFusionConfig, parse_blocks
from ..joint_kv import JointAttention
from ..reducing import RotaryLayout, check_key_value_attention

#: How a :class:`Part` runs on reduced tokens.
PART_KINDS = ("tokens", "kv", "single")


@dataclass(frozen=True)
class Part:
    """A sub-module of a patched block that runs on reduced tokens.

    ``kind``: ``"tokens"`` (on the reduced tokens of its ``hidden_states``, output restored), ``"kv"`` (every
    token a query, the reduced tokens as keys and values) or ``"single"`` (the image part of a ``[text, image]``
    sequence, or of an ``[image, rest]`` one at an ``image_first`` site, reduced and restored). ``chunks``: it
    may be called on batch chunks (a U-Net's feed-forward); ``key_mask``: a mask over its keys alone is kept (a
    cross-attention's); ``joint_mask``: a ``"tokens"``
    attention's mask over the ``[text, image]`` sequence it concatenates, text first, is cut to the kept tokens
    (Chroma's; a ``"single"`` part always cuts a mask over its sequence)."""

    name: str  #: the sub-module's name under the block, e.g. ``attn1``, ``attn``, ``ff``
    kind: str = "tokens"
    chunks: bool = False
    key_mask: bool = False
    joint_mask: bool = False


@dataclass(frozen=True)
class Site:
    """One patchable block of a model and where it sits."""

    name: str  #: qualified module name, e.g. ``transformer_blocks.3``
    block: torch.nn.Module
    #: the module whose call carries the block's token grid (a U-Net's ``Transformer2DModel``; a diffusion
    #: transformer itself); its grid is read by :meth:`Family.grid`
    grid_module: torch.nn.Module
    attentions: tuple[str, ...] = ()  #: the block's attentions that a diffusion transformer reduces around
    downsample: int = 1  #: resolution factor relative to the model's input (U-Nets: 1, 2, 4, ...)
    on_down_path: bool = False  #: in a U-Net's ``down_blocks``
    single_stream: bool = False  #: its attention sees ``[text, image]`` (its ``encoder_hidden_states`` is the text)
    #: with ``single_stream``: the block's ``hidden_states`` already is ``[text, image]`` (the model concatenated
    #: them, as Chroma and FLUX.2 do): the image tokens are its last ``h * w`` tokens, the text those in front
    image_last: bool = False
    #: with ``single_stream``: the block's ``hidden_states`` is ``[image, rest]``, the image tokens its first
    #: ``h * w`` tokens and the rest (padding, text) after them, kept bit for bit (Z-Image's main layers)
    image_first: bool = False


class Family:
    """The adapter of one family of models. Subclasses set the class attributes and :meth:`sites` and
    :meth:`grid`; the other methods have a diffusion transformer's defaults."""

    #: The family's name in messages and docs, e.g. ``"SD3"``.
    name: str = ""
    #: The pipeline attribute that holds such a model: ``"unet"`` or ``"transformer"``.
    pipeline_attribute: str = "transformer"
    #: Position of ``timestep`` in the model's ``forward``, and what the model multiplies it by (the partition's
    #: key is the timestep as the model scales it, so the same step gets the same partition in every family).
    timestep_index: int = 1
    timestep_scale: float = 1.0
    #: The query / key norms of a reduced attention that rotate per kept token, ``(name, is_text)``; empty for
    #: families without rotary positions.
    rotary_norms: tuple[tuple[str, bool], ...] = ()
    #: How its attentions carry their rotary table and apply it (with ``rotary_norms``): Flux's by default.
    rotary_layout: RotaryLayout = RotaryLayout()
    #: The attention argument that carries a rotary table per batch element and token, ``(B, S, ...)`` over the
    #: attention's ``hidden_states``, which the attention applies itself (Z-Image's ``freqs_cis``): an
    #: ``image_first`` site's hook gathers its rows with the kept tokens. ``None``: no such table.
    token_rotary: str | None = None
    #: The attention processors its hooks work with (exactly these classes; empty: any), and why, for the message
    #: of :meth:`check_attention`.
    processors: tuple[type, ...] = ()
    processor_reason: str = ""
    #: Why ``reduce="kv"`` is refused, or ``None`` if the family supports it.
    key_value_refusal: str | None = "its attention does not take keys and values apart from its queries"
    #: For ``reduce="kv"``: its joint attention, run by :class:`~tofu_sd.joint_kv.JointKeyValueHook` with the
    #: reduced image keys and values; ``None``: the attention's own processor takes them (``KeyValueHook``).
    joint_attention: JointAttention | None = None
    #: A video family's default ``st`` (frames per cell; its :meth:`grid` is ``(frames, h, w)``); ``None`` for an
    #: image family, whose grid is ``(h, w)``.
    default_st: int | None = None
    #: The oldest diffusers release this family's adapter was tested on (None: the package's floor); an older
    #: diffusers is refused by :meth:`check`, since the model classes' internals that the adapter relies on change.
    tested_diffusers: str | None = None

    def sites(self, model: torch.nn.Module) -> list[Site]:
        """Every patchable block of ``model``, in forward order."""
        raise NotImplementedError

    def grid(self, module: torch.nn.Module, args: tuple, kwargs: dict) -> tuple[int, int] | None:
        """The token grid ``(h, w)`` of a call of a site's ``grid_module``, or ``None`` (nothing is reduced)."""
        raise NotImplementedError

    def timestep(self, args: tuple, kwargs: dict):
        """The call's timestep, scaled as the model scales it."""
        timestep = argument(args, kwargs, self.timestep_index, "timestep")
        if timestep is not None and self.timestep_scale != 1:
            timestep = timestep * self.timestep_scale
        return timestep

    def select(self, sites: list[Site], config: TokenFusionConfig) -> list[Site]:
        """The sites ``config`` patches: those ``config.blocks`` names by index (``None``: all)."""
        indices = parse_blocks(config.blocks)
        if indices is None:
            return sites
        bad = [i for i in indices if i >= len(sites)]
        if bad:
            listing = "\n".join(f"  {i}: {site.name}" for i, site in enumerate(sites))
            raise ValueError(
                f"blocks={config.blocks!r} names block(s) {', '.join(map(str, bad))}, but the model has "
                f"{len(sites)} patchable blocks (0 to {len(sites) - 1}), in forward order:\n{listing}"
            )
        return [sites[i] for i in indices]

    def default_schedule(self, sites: list[Site]) -> str:
        """MLERP merging (``M``) in every block: ``tofu-sd analyze`` on the built-in trained DiT finds no block far
        from linear (README, diffusion transformers). Real SD3 / Flux weights were not analysed."""
        return "M" * len(sites)

    def check(self, model: torch.nn.Module, sites: list[Site], config: TokenFusionConfig) -> None:
        """Raise ``ValueError`` for an option or a module that the family cannot patch as ``config`` asks."""
        require_diffusers(self.tested_diffusers, f"Token Fusion on {self.name} models")
        if config.reduce == "kv" and self.joint_attention is not None:
            require_diffusers(JOINT_KV_DIFFUSERS, f"reduce='kv' on {self.name} models")
        if config.max_downsample != 1:
            raise ValueError(
                f"max_downsample={config.max_downsample} only means something for U-Nets (their lower-resolution "
                f"blocks); a {self.name} transformer has one token grid: choose its blocks with `blocks` instead."
            )
        default_modules = next(f.default for f in fields(config) if f.name == "modules")
        if config.modules != default_modules:
            raise ValueError(
                f"modules={config.modules!r} chooses sub-modules of U-Net blocks; on a {self.name} transformer "
                "Token Fusion reduces around each patched block's attention only: leave modules at its default."
            )
        if config.reduce == "kv" and self.key_value_refusal is not None:
            raise ValueError(
                f"reduce='kv' is not supported for {self.name} transformers yet: {self.key_value_refusal}; use "
                "reduce='tokens'."
            )
        for site in sites:
            for part in self.parts(site, config):
                attn = site.block.get_submodule(part.name)
                self.check_attention(f"{site.name}.{part.name}", attn)
                if part.kind == "kv":
                    check_key_value_attention(f"{site.name}.{part.name}", attn)
                    if self.joint_attention is not None:
                        self.joint_attention.check(f"{site.name}.{part.name}", attn)

    def check_attention(self, name: str, attn: torch.nn.Module) -> None:
        """Raise ``ValueError`` if the attention ``name`` has a processor the family's hooks do not work with
        (one not in :attr:`processors`)."""
        processor = getattr(attn, "processor", None)
        if self.processors and type(processor) not in self.processors:
            expected = " or ".join(p.__name__ for p in self.processors)
            raise ValueError(
                f"Token Fusion cannot patch {name}: its attention processor {type(processor).__name__} is not "
                f"{expected}, {self.processor_reason}."
            )

    def frames_per_cell(self, config: TokenFusionConfig) -> int | None:
        """``config.st`` as the family takes it: a video family's default for ``None``; an image family keeps
        ``None`` or 1 and refuses anything else (its grid has no frames)."""
        if self.default_st is not None:
            return self.default_st if config.st is None else config.st
        if config.st not in (None, 1):
            raise ValueError(
                f"st={config.st} makes cells span frames of a video; a {self.name} model's token grid is one image "
                "(no frames): leave st unset (or 1)."
            )
        return config.st

    def parts(self, site: Site, config: TokenFusionConfig) -> list[Part]:
        """The sub-modules of ``site``'s block that run on reduced tokens: each of its attentions."""
        if site.single_stream:
            return [Part(name, "single") for name in site.attentions]
        kind = "kv" if config.reduce == "kv" else "tokens"
        return [Part(name, kind) for name in site.attentions]


#: The oldest diffusers release ``reduce="kv"`` on joint attentions (:mod:`tofu_sd.joint_kv`) was tested on: it
#: runs the attention as that release's processors do.
JOINT_KV_DIFFUSERS = "0.42.1"


def require_diffusers(version: str | None, what: str) -> None:
    """Raise ``ValueError`` if the installed diffusers is older than ``version`` (``what`` was tested on it)."""
    if version is None:
        return
    installed = importlib.metadata.version("diffusers")
    if Version(installed) < Version(version):
        raise ValueError(
            f"{what} was tested on diffusers >= {version}; this environment has diffusers {installed}. Upgrade it "
            f"(pip install -U 'diffusers>={version}'), or leave this model without Token Fusion."
        )


def latent_grid(model: torch.nn.Module, args: tuple, kwargs: dict) -> tuple[int, int] | None:
    """The patch grid of a call whose ``hidden_states`` is a ``(B, C, H, W)`` latent cut into ``patch_size``
    patches (SD3, PixArt): ``(H // p, W // p)``; ``None`` for another input."""
    x = argument(args, kwargs, 0, "hidden_states")
    if not isinstance(x, torch.Tensor) or x.ndim != 4:
        return None
    p = model.config.patch_size
    return x.shape[-2] // p, x.shape[-1] // p
