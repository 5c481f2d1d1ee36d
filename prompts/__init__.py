"""Prompt sets in class-index order and the paper's prompt template.

Two sets: ``imagenet`` (the 1000 ImageNet-1k class names, for real Stable Diffusion models) and ``shapes`` (the
48 colour-shape classes the built-in model was trained on, see :mod:`prompts.shapes`).
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

from . import shapes

#: Prompt template of the Token Fusion paper, Section 4.2.
TEMPLATE = "A high-quality photograph of a {}."
NUM_CLASSES = 1000  # ImageNet
PROMPT_SETS = ("imagenet", "shapes")
DEFAULT_SET = "imagenet"


@lru_cache(maxsize=1)
def _imagenet() -> tuple[str, ...]:
    names = Path(__file__).with_name("imagenet_classes.txt").read_text().splitlines()
    if len(names) != NUM_CLASSES:
        raise RuntimeError(f"imagenet_classes.txt has {len(names)} names, expected {NUM_CLASSES}")
    return tuple(names)


def class_names(prompt_set: str = DEFAULT_SET) -> tuple[str, ...]:
    """The class names of a prompt set, index ``i`` being class ``i``."""
    if prompt_set == "imagenet":
        return _imagenet()
    if prompt_set == "shapes":
        return shapes.class_names()
    raise ValueError(f"unknown prompt set {prompt_set!r}; choose from {', '.join(PROMPT_SETS)}")


def prompt(class_index: int, prompt_set: str = DEFAULT_SET) -> str:
    """The prompt for one class: ``A high-quality photograph of a {class}.``"""
    return TEMPLATE.format(class_names(prompt_set)[class_index])
