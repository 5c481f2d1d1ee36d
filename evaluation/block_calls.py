"""How many transformer blocks (and attentions) a method actually runs: what ``tofu-sd generate`` records per
method on diffusion transformers (``block_calls_per_image``, ``attention_calls_per_image`` in
``manifest.json``), a cost that does not depend on the machine.

:func:`counting` registers a pass-through registry hook (:data:`COUNT_HOOK`) *innermost* on each block of the
family's block list (``transformer_and_family(pipe)[1].sites(model)``) and on each attention that Token Fusion
reduces around (``Site.attentions``). **Enter it before the method is applied** (``tofu-sd generate`` does):
diffusers registers a step cache's hooks outermost, so they sit above the counter, and a block or attention
that a cache skips (returning a cached or predicted output without calling it) is not counted; Token Fusion
registers its hooks innermost, so they sit below the counter, and an attention that Token Fusion runs itself
(``reduce="kv"``, which computes the attention with every query and the reduced keys instead of calling the
module's forward) is counted. Entered after Token Fusion, the counter would sit below that attention and miss
every ``kv`` call (the bug that recorded 0 attentions for ``tofu-kv`` methods before 2026-12-07). A call counts the rows of its ``hidden_states`` (the
batch): an image's conditional and unconditional passes (classifier-free guidance, batched or not) count two,
so the count per image does not depend on the batch size. The hooks change no value (they only read the
batch size) and are removed afterwards, with anything the registry would leave behind.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
from diffusers.hooks import ModelHook

from tofu_sd.arguments import argument
from tofu_sd.hooking import register_innermost, unregister_all

from .families import is_transformer, transformer_and_family

COUNT_HOOK = "evaluation.block_calls"


@dataclass
class Tally:
    """The block and attention calls counted, each weighted by its batch rows."""

    blocks: int = 0
    attentions: int = 0


class _Count(ModelHook):
    def __init__(self, tally: Tally, field: str) -> None:
        super().__init__()
        self.tally, self.field = tally, field

    def pre_forward(self, module, *args, **kwargs):
        x = argument(args, kwargs, 0, "hidden_states")
        rows = x.shape[0] if isinstance(x, torch.Tensor) and x.ndim > 0 else 1
        setattr(self.tally, self.field, getattr(self.tally, self.field) + rows)
        return args, kwargs


@contextlib.contextmanager
def counting(pipe):
    """Count the block and attention calls of ``pipe``'s diffusion transformer in the block: yields a
    :class:`Tally`; None (nothing counted) for a U-Net or a model that tofu_sd does not adapt."""
    try:
        model, family = transformer_and_family(pipe) if is_transformer(pipe) else (None, None)
    except ValueError:
        model = None
    if model is None:
        yield None
        return
    tally = Tally()
    try:
        for site in family.sites(model):
            register_innermost(site.block, _Count(tally, "blocks"), COUNT_HOOK)
            for part in site.attentions:
                register_innermost(getattr(site.block, part), _Count(tally, "attentions"), COUNT_HOOK)
        yield tally
    finally:
        unregister_all(model, COUNT_HOOK)


#: The manifest's fields of the counts: the totals, the images they cover, and per image.
COUNT_FIELDS = ("block_calls", "attention_calls", "images_counted")


def add_counts(stats: dict, part: dict) -> None:
    """Add a report's counts (``part``, with :data:`COUNT_FIELDS`) to a method's manifest entry ``stats`` and
    update its ``block_calls_per_image`` and ``attention_calls_per_image``; nothing if ``part`` has none."""
    if "images_counted" not in part:
        return
    for key in COUNT_FIELDS:
        stats[key] = stats.get(key, 0) + part[key]
    if stats["images_counted"]:
        stats["block_calls_per_image"] = stats["block_calls"] / stats["images_counted"]
        stats["attention_calls_per_image"] = stats["attention_calls"] / stats["images_counted"]
