"""The built-in model's prompt set: one class per (colour, shape), colour-major order.

Class ``i`` is colour ``i // len(SHAPES)`` and shape ``i % len(SHAPES)``; its name is ``"{colour} {shape}"``, so
its prompt is ``A high-quality photograph of a {colour} {shape}.``
"""

from __future__ import annotations

COLOURS = ("red", "orange", "yellow", "green", "cyan", "blue", "purple", "pink")
SHAPES = ("circle", "square", "triangle", "star", "ring", "cross")


def class_names() -> tuple[str, ...]:
    return tuple(f"{colour} {shape}" for colour in COLOURS for shape in SHAPES)


def class_parts(class_index: int) -> tuple[str, str]:
    """``(colour, shape)`` of a class."""
    return COLOURS[class_index // len(SHAPES)], SHAPES[class_index % len(SHAPES)]
