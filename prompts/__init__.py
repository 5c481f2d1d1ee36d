"""ImageNet-1k class names in class-index order and the paper's prompt template."""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

#: Prompt template of the Token Fusion paper, Section 4.2.
TEMPLATE = "A high-quality photograph of a {}."
NUM_CLASSES = 1000


@lru_cache(maxsize=1)
def class_names() -> tuple[str, ...]:
    """The 1000 ImageNet-1k class names, index ``i`` being class ``i``."""
    names = Path(__file__).with_name("imagenet_classes.txt").read_text().splitlines()
    if len(names) != NUM_CLASSES:
        raise RuntimeError(f"imagenet_classes.txt has {len(names)} names, expected {NUM_CLASSES}")
    return tuple(names)


def prompt(class_index: int) -> str:
    """The prompt for one class: ``A high-quality photograph of a {class}.``"""
    return TEMPLATE.format(class_names()[class_index])
