"""Configuration of Token Fusion and its validation."""

from __future__ import annotations

import numbers
from dataclasses import dataclass, fields

import torch

from .merge import MATCHINGS, MODES

#: What self-attention takes from the reduced tokens: everything (queries, keys, values), or only keys and values.
REDUCES = ("tokens", "kv")
#: The sub-modules of a ``BasicTransformerBlock`` that can run on the reduced tokens, by diffusers' names, in
#: forward order: self-attention, cross-attention, feed-forward.
MODULES = ("attn1", "attn2", "ff")


@dataclass(frozen=True)
class TokenFusionConfig:
    r"""Configuration of Token Fusion (:func:`tofu_sd.apply_token_fusion`; :func:`tofu_sd.apply` takes the same fields
    as keyword arguments). These field docs are the one place the options are documented (docs/options.md is
    generated from them).

    Args:
        ratio (`float`, defaults to `0.5`):
            Fraction of the tokens removed before self-attention (or each of the ``modules``) in each patched
            block: ``r = int(N * ratio)`` (with ``reduce="kv"``, removed from self-attention's keys and values only).
            Must lie in ``[0, 1 - 1 / (sx * sy * st)]`` (0.75 with the default 2x2 cells; ``st`` unset counts as 1). ``0`` hooks nothing: the
            model stays bit-identical. Any real number is accepted (numpy scalars, one-element tensors) and stored as a Python ``float``.
        schedule (`str`, *optional*):
            How each patched block reduces, one letter per block in forward order: ``P`` pruned merging (drop the
            matched sources), ``A`` average merging, ``M`` MLERP merging (mean direction, largest norm). A single
            letter applies to every block. ``None`` uses the model family's default: on a U-Net the paper's hybrid,
            ``P`` on the down path and ``M`` after it (SD 1.x / 2.x: ``PPMMM``); on a diffusion transformer ``M`` in
            every block (``tofu-sd analyze`` finds no block of the built-in trained DiT far from linear).
        max_downsample (`int`, defaults to `1`):
            Patch the transformer blocks whose resolution is at most this many times lower than the U-Net's
            highest transformer resolution: 1, 2, 4 or 8. ``1`` patches only the highest resolution.
        sx (`int`, defaults to `2`):
            Width, in tokens, of the cells that each hold one destination token. Columns left over when the
            grid's width is no multiple of ``sx`` hold sources only.
        sy (`int`, defaults to `2`):
            Height, in tokens, of the cells that each hold one destination token. Rows left over when the
            grid's height is no multiple of ``sy`` hold sources only.
        st (`int`, *optional*):
            Extent, in frames, of the cells of a video model's ``frames x height x width`` token grid (Wan): each
            ``st x sy x sx`` cell holds one destination, so its sources may merge into a destination of a
            neighbouring frame. ``None`` takes the family's default: ``2`` for video, because neighbouring frames
            hold a video's most similar tokens: one destination per cell of a frame pair still leaves each source
            a near twin close by, while 7 of 8 tokens are sources to pick the ``r`` most similar pairs from (3 of
            4 with ``1``, which gives spatial cells in every frame). Frames left over when the frame
            count is no multiple of ``st`` hold sources only (Wan 2.1's 21 latent frames of an 81-frame video:
            10 cells of two frames, then one frame of sources); a grid with fewer frames than ``st`` takes cells
            of all its frames. Local matching's window spans ``local_window`` cells over frames too. Image
            models have no frames: there ``st`` must be ``None`` or ``1``.
        use_rand (`bool`, defaults to `True`):
            Place each cell's destination at a random position (seeded, per block and timestep) rather than at
            the cell's top-left token.
        seed (`int`, *optional*):
            Seed of the destination positions when ``use_rand`` is set. ``None`` means ``0``: runs are
            reproducible unless a seed is chosen. A position is a hash of (seed, block, timestep, cell), so it is the
            same on every device, for both halves of a classifier-free-guidance batch, and for separate
            conditional and unconditional calls at one timestep.
        matching (`str`, defaults to `"global"`):
            Where each source token looks for its most similar destination. ``"global"``: among all destinations,
            exactly as ToMe (computed in chunks of source rows, so memory stays O(N)). ``"local"``: among the
            destinations of the ``local_window x local_window`` cells around its own cell, O(N) time and memory.
            Either way the ``r`` most similar pairs are chosen over the whole image.
        local_window (`int`, defaults to `3`):
            Side, in cells, of the square window of local matching, centred on the source's cell (tokens in no
            full cell use the nearest full cell) and clipped at the image border: an odd number >= 1. ``3`` (the
            cell and its 8 neighbours: 9 candidates, within 2 to 3 tokens with 2x2 cells) keeps the candidates
            that image tokens' best matches mostly are, at a cost independent of N. Ignored for global matching.
        reduce (`str`, defaults to `"tokens"`):
            What self-attention (``attn1``) of a patched block runs on. ``"tokens"``: the ``N - r`` reduced tokens
            are its queries, keys and values, and each token then takes its output back from its slot (the
            paper's method). ``"kv"``: all ``N`` tokens stay queries; the keys and values come from the
            ``N - r`` reduced tokens (the schedule letter says how: ``P`` leaves the matched sources out,
            ``A`` / ``M`` merge them into their destination), with proportional attention: each reduced key's
            logit gains ``log(s)``, ``s`` being the number of tokens it stands for (its destination and the
            sources matched to it; 1 for an unmatched token), so ``s`` identical tokens weigh as they do in
            full attention. No restore step. On U-Nets and PixArt it runs through the attention's own diffusers
            processor (the reduced tokens as its ``encoder_hidden_states``, the bias as an additive
            ``attention_mask``), so the attention backend stays the user's; fused QKV projections work too. A
            call with its own attention mask, or through a PAG processor, is left unreduced. On SD3 / SD3.5 and
            Flux, whose joint attentions take text and image together, Token Fusion runs each patched attention
            itself as ``JointAttnProcessor2_0`` / ``FluxAttnProcessor`` would, with the module's own weights:
            every query, text and image, is kept; the image keys and values come from the reduced image tokens
            (on Flux each with the rotary position of its slot's token: its own, or a merged group's
            destination's), the text keys and values are untouched, and the bias goes to
            ``scaled_dot_product_attention`` (SD3, as its processor) or to diffusers' attention dispatch with the
            processor's backend (Flux: one that takes an additive mask, e.g. native; flash and sage refuse it).
            Qwen-Image's joint attention and Wan's self-attention ``attn1`` are run alike, as
            ``QwenDoubleStreamAttnProcessor2_0`` / ``WanAttnProcessor`` would (Qwen-Image's text padding mask
            kept; Wan's cross-attention untouched; each reduced key rotated with its slot's position, each query
            with its own). Sana's linear ``attn1`` has no logits: there each reduced key's ReLU feature is
            weighted by its group's size, the exact linear-attention equivalent (it saves less: only the key and
            value projections and sums shrink). Other processors (IP-Adapter, PAG, xformers) and fused QKV
            projections are refused there. FLUX.2 (both kinds of block), Chroma and Z-Image run alike, as
            ``Flux2AttnProcessor`` / ``Flux2ParallelSelfAttnProcessor`` / ``FluxAttnProcessor`` /
            ``ZSingleStreamAttnProcessor`` would, their attention masks kept (a reduced key's mask entry is
            ``log(sum(exp(mask)))`` over its group: ``log(size)`` where nothing is masked).
        rematch_every (`int`, defaults to `1`):
            Compute each block's partition and matching at one denoising step and reuse them, unchanged, for
            the next ``rematch_every - 1`` steps of the same pipeline call; ``1`` matches at every call (and
            counts nothing). Steps are counted per thread from the ``timestep`` argument of successive model
            calls (its first element, read on the host: a device sync for a tensor on an accelerator):

            - the first call, a call without a timestep, and a call whose timestep is *higher* than the previous
              call's start a new pipeline call: step 0;
            - a call whose timestep is *lower* than the previous call's starts the next step;
            - a call at the *same* timestep belongs to the same step: the conditional and unconditional calls of
              classifier-free guidance run separately, or the two evaluations of a second-order sampler (a
              batched CFG call holds both halves in one call).

            A pipeline given to :func:`tofu_sd.apply` also starts a new pipeline call at the start of each of its
            calls (txt2img, img2img at any strength, inpainting, a refiner's ``denoising_start``, a call after an
            interrupted one), whatever its first timestep; on a bare model, :func:`tofu_sd.reset_steps` marks one.

            Step ``i`` of a pipeline call is a matching step when ``i % rematch_every == 0``: its first call drops
            the stored matchings, and each of its calls matches and stores its own. At the other steps a call
            takes, for each block, the matching stored for the same block, grid, batch size, device, dtype and
            position of the call in its step, and matches (and stores) its own if there is none, e.g. after a
            change of image size. Only the first four calls of a step store theirs. So at most one matching per
            block, shape and position is kept, from the last matching step on; it stays until the next pipeline
            call's first step (or :func:`~tofu_sd.remove`). Without a marked start, a pipeline call that starts at
            the timestep where the previous one ended (or lower) continues its step count. The step count is kept
            on the host, outside compiled graphs, so a compiled model (whole or by blocks) reuses matchings too,
            through two graphs per block (matching and reusing).
        modules (`tuple[str, ...]`, defaults to `("attn1",)`):
            Which sub-modules of each patched ``BasicTransformerBlock`` run on the reduced tokens, by diffusers'
            names: ``"attn1"`` (self-attention), ``"attn2"`` (cross-attention), ``"ff"`` (feed-forward), or any
            non-empty combination, given as a tuple or list of names or a comma-separated string
            (``"attn1,ff"``); stored as a tuple in that canonical order. Each chosen module's input is reduced
            with the block's matching (computed once per block call, on the block's input) and its schedule
            letter, and its output restored (tomesd's ``merge_attn``, ``merge_crossattn`` and ``merge_mlp``).
            ``attn2`` keeps its keys and values (the text); only its queries are reduced. ``reduce`` concerns
            ``attn1`` only: with ``reduce="kv"`` it keeps every query, while ``attn2`` and ``ff`` are reduced
            and restored as with ``"tokens"``. With diffusers' feed-forward chunking (a block's
            ``set_chunk_feed_forward``), batch chunks (``dim=0``) are reduced row by row; sequence chunks
            (``dim=1``) cannot be (merging needs every token), so ``ff`` then runs unreduced. A block without
            cross-attention has no ``attn2`` to reduce. For U-Nets; diffusion transformers reduce around the
            attentions their family names (leave ``modules`` at its default there).
        blocks (`str` or `tuple[int, ...]`, *optional*):
            Which blocks of a diffusion transformer (SD3, PixArt, Flux, FLUX.2, Chroma, Qwen-Image, Z-Image, Sana, Wan; see
            :mod:`tofu_sd.families`) are patched, by
            index in forward order (FLUX.1, FLUX.2 and Chroma: the double-stream blocks, then the single-stream ones): a tuple of
            ints, or a string of indices and inclusive ranges, e.g. ``"0-11"`` or ``"0-3,8,20-23"``. ``None``
            patches every block. Only for diffusion transformers: U-Nets choose their blocks by resolution
            (``max_downsample``).
    """

    ratio: float = 0.5
    schedule: str | None = None
    max_downsample: int = 1
    sx: int = 2
    sy: int = 2
    st: int | None = None
    use_rand: bool = True
    seed: int | None = None
    matching: str = "global"
    local_window: int = 3
    reduce: str = "tokens"
    rematch_every: int = 1
    modules: tuple[str, ...] = ("attn1",)
    blocks: str | tuple[int, ...] | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "ratio", _real(self.ratio))
        for field in fields(self):
            # A boolean option takes True or False only: "false" or 0 would silently read as another choice.
            if field.type == "bool" and not isinstance(getattr(self, field.name), bool):
                raise ValueError(f"{field.name} must be True or False, got {getattr(self, field.name)!r}.")
        for name in ("sx", "sy", "max_downsample", "local_window", "rematch_every"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int):
                raise ValueError(f"{name} must be an int, got {value!r}.")
        if self.sx < 1 or self.sy < 1:
            raise ValueError(f"sx and sy must be >= 1, got sx={self.sx}, sy={self.sy}.")
        if self.st is not None and (isinstance(self.st, bool) or not isinstance(self.st, int) or self.st < 1):
            raise ValueError(f"st must be None (the family's default) or an int >= 1 (frames per cell), got {self.st!r}.")
        if self.max_downsample < 1 or self.max_downsample & (self.max_downsample - 1):
            raise ValueError(f"max_downsample must be a power of two (1, 2, 4 or 8), got {self.max_downsample}.")
        if self.matching not in MATCHINGS:
            raise ValueError(
                f"matching must be 'global' (every destination, as ToMe) or 'local' (destinations of nearby cells), "
                f"got {self.matching!r}."
            )
        if self.reduce not in REDUCES:
            raise ValueError(
                f"reduce must be 'tokens' (attention on the reduced tokens, then restored) or 'kv' (every query, "
                f"reduced keys and values), got {self.reduce!r}."
            )
        if self.rematch_every < 1:
            raise ValueError(f"rematch_every must be >= 1 (1 matches at every step), got {self.rematch_every}.")
        if self.local_window < 1 or self.local_window % 2 == 0:
            raise ValueError(
                f"local_window must be an odd number of cells >= 1 (a window centred on the source's cell), got "
                f"{self.local_window}; 3 is the default."
            )
        if not isinstance(self.ratio, float):
            raise ValueError(f"ratio must be a real number in [0, 1), got {self.ratio!r}.")
        cell = self.sx * self.sy * (self.st or 1)
        limit = 1 - 1 / cell
        if not 0 <= self.ratio < 1:
            raise ValueError(f"ratio must be in [0, 1), got {self.ratio}; 0.5 is the usual choice.")
        if self.ratio > limit + 1e-9:
            shape = f"{self.sx}x{self.sy}" + ("" if self.st is None else f"x{self.st}")
            raise ValueError(
                f"ratio={self.ratio} removes more tokens than {shape} cells allow (at most "
                f"1 - 1/({'sx*sy' if self.st is None else 'sx*sy*st'}) = {limit:.4g}, one destination per cell); "
                "lower ratio or enlarge sx/sy"
                + ("." if self.st is None else "/st.")
            )
        if self.seed is not None and (isinstance(self.seed, bool) or not isinstance(self.seed, int)):
            raise ValueError(f"seed must be an int or None, got {self.seed!r}.")
        object.__setattr__(self, "modules", _modules_value(self.modules))
        if self.blocks is not None:
            object.__setattr__(self, "blocks", _blocks_value(self.blocks))
        if self.schedule is not None:
            if not isinstance(self.schedule, str) or not self.schedule:
                raise ValueError(f"schedule must be a non-empty string of P/A/M letters or None, got {self.schedule!r}.")
            bad = sorted(set(self.schedule.upper()) - set(MODES))
            if bad:
                raise ValueError(
                    f"schedule {self.schedule!r} has unknown letter(s) {', '.join(bad)}; use P (pruned), "
                    "A (average) or M (MLERP), one per patched block or a single letter for all."
                )

    def resolve_schedule(self, block_names: list[str]) -> str:
        """The given schedule as one upper-case letter per patched block; raises if its length does not fit.
        (``schedule=None`` is the model family's default, see :meth:`tofu_sd.Family.default_schedule`.)"""
        schedule = self.schedule.upper()
        if len(schedule) == 1:
            return schedule * len(block_names)
        if len(schedule) != len(block_names):
            listing = "\n".join(f"  {i}: {name}" for i, name in enumerate(block_names))
            raise ValueError(
                f"schedule {self.schedule!r} has {len(schedule)} letters but {len(block_names)} blocks are patched; "
                f"give one letter per block (or a single letter for all). Patched blocks, in order:\n{listing}"
            )
        return schedule


def _real(value):
    """``value`` as a float if it is a real number (Python, numpy, or a one-element real tensor); else unchanged."""
    if isinstance(value, bool) or type(value).__name__ == "bool_":
        return value
    if isinstance(value, torch.Tensor):
        if value.numel() == 1 and not (value.dtype.is_complex or value.dtype == torch.bool):
            return float(value.item())
        return value
    if isinstance(value, numbers.Real):
        return float(value)
    return value


def _modules_value(value) -> tuple[str, ...]:
    """``modules`` as stored: a tuple of known names in canonical order; ValueError for anything else."""
    hint = f"modules must be a non-empty tuple or list of {', '.join(map(repr, MODULES))}, or a comma-separated string"
    if isinstance(value, str):
        names = [part.strip() for part in value.split(",")]
    elif isinstance(value, (tuple, list)) and all(isinstance(name, str) for name in value):
        names = list(value)
    else:
        raise ValueError(f"{hint} such as 'attn1,ff'; got {value!r}.")
    if not names or names == [""]:
        raise ValueError(f"{hint}; got {value!r}, which names no module.")
    unknown = [name for name in names if name not in MODULES]
    if unknown:
        raise ValueError(
            f"modules={value!r} has unknown name(s) {', '.join(map(repr, unknown))}; use 'attn1' (self-attention), "
            "'attn2' (cross-attention) and/or 'ff' (feed-forward)."
        )
    repeated = sorted({name for name in names if names.count(name) > 1}, key=MODULES.index)
    if repeated:
        raise ValueError(f"modules={value!r} names {', '.join(map(repr, repeated))} more than once.")
    return tuple(name for name in MODULES if name in names)


def _blocks_value(value):
    """``blocks`` as stored: a string as given, a sequence of ints as a tuple; ValueError if it names no block."""
    if not isinstance(value, str):
        try:
            value = tuple(value)
        except TypeError:
            raise ValueError(f"blocks must be None, a string such as '0-11' or a tuple of ints, got {value!r}.") from None
    parse_blocks(value)
    return value


def parse_blocks(blocks: str | tuple[int, ...] | None) -> tuple[int, ...] | None:
    """The block indices that ``blocks`` names, ascending (``None`` for ``None``: every block).

    ``blocks`` is a tuple of ints >= 0 or a string of comma-separated indices and inclusive ranges (``"0-11"``,
    ``"0-3,8"``); an empty selection, a repeated index or anything else raises ``ValueError``."""
    if blocks is None:
        return None
    if isinstance(blocks, str):
        indices: list[int] = []
        for part in blocks.split(","):
            bounds = part.strip().split("-")
            if len(bounds) > 2 or not all(b.strip().isdigit() for b in bounds):
                raise ValueError(
                    f"blocks={blocks!r}: {part.strip()!r} is no block index or inclusive range; write e.g. '0-11' "
                    "or '0-3,8,20-23'."
                )
            low, high = int(bounds[0]), int(bounds[-1])
            if high < low:
                raise ValueError(f"blocks={blocks!r}: the range {part.strip()!r} is empty (write low-high).")
            indices.extend(range(low, high + 1))
    else:
        indices = list(blocks)
        bad = [i for i in indices if isinstance(i, bool) or not isinstance(i, numbers.Integral) or i < 0]
        if bad:
            raise ValueError(f"blocks must hold block indices (ints >= 0), got {blocks!r}.")
        indices = [int(i) for i in indices]
    if not indices:
        raise ValueError(f"blocks={blocks!r} names no block; None patches every block.")
    repeated = sorted({i for i in indices if indices.count(i) > 1})
    if repeated:
        raise ValueError(f"blocks={blocks!r} names block(s) {', '.join(map(str, repeated))} more than once.")
    return tuple(sorted(indices))
