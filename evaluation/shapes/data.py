"""Procedural captioned pictures for the built-in model: one coloured shape on a plain or gradient background.

Every picture is a pure function of ``(seed, index)``: drawn with its own random generator, so a data set is
reproducible, can be drawn in any order or in parts, and needs no download. Picture ``index`` has class
``index % NUM_CLASSES`` (balanced classes); its caption is the project's prompt for that class.
"""

from __future__ import annotations

import math

import numpy as np
from PIL import Image, ImageDraw

from prompts import prompt
from prompts.shapes import COLOURS, SHAPES, class_parts

SIZE = 64
NUM_CLASSES = len(COLOURS) * len(SHAPES)
_SUPERSAMPLE = 4  # shapes are drawn at 4x and box-filtered down: anti-aliased edges

#: sRGB of each colour name; pictures jitter each channel by up to +-JITTER.
RGB = {
    "red": (215, 35, 35),
    "orange": (245, 135, 20),
    "yellow": (240, 215, 30),
    "green": (35, 165, 55),
    "cyan": (40, 205, 215),
    "blue": (35, 65, 215),
    "purple": (130, 45, 185),
    "pink": (245, 120, 190),
}
JITTER = 12
assert set(RGB) == set(COLOURS)


def caption(class_index: int) -> str:
    return prompt(class_index, "shapes")


def _polygon(shape: str, cx: float, cy: float, radius: float, angle: float) -> list[tuple[float, float]]:
    """Vertices of a polygonal shape of circumradius ``radius``, rotated by ``angle`` radians."""
    if shape == "square":
        points = [(radius * math.cos(a), radius * math.sin(a)) for a in (np.arange(4) * math.pi / 2 + math.pi / 4)]
    elif shape == "triangle":
        points = [(radius * math.cos(a), radius * math.sin(a)) for a in (np.arange(3) * 2 * math.pi / 3 - math.pi / 2)]
    elif shape == "star":
        points = [
            ((radius if i % 2 == 0 else 0.42 * radius) * math.cos(a), (radius if i % 2 == 0 else 0.42 * radius) * math.sin(a))
            for i, a in enumerate(np.arange(10) * math.pi / 5 - math.pi / 2)
        ]
    elif shape == "cross":
        arm, half = radius, 0.32 * radius  # a plus sign: arms of half-width 0.32 r reaching r from the centre
        points = [(half, -arm), (half, -half), (arm, -half), (arm, half), (half, half), (half, arm),
                  (-half, arm), (-half, half), (-arm, half), (-arm, -half), (-half, -half), (-half, -arm)]  # fmt: skip
    else:
        raise ValueError(f"{shape!r} is not a polygonal shape")
    c, s = math.cos(angle), math.sin(angle)
    return [(cx + x * c - y * s, cy + x * s + y * c) for x, y in points]


def shape_mask(shape: str, cx: float, cy: float, radius: float, angle: float, size: int = SIZE) -> np.ndarray:
    """Coverage in ``[0, 1]`` of ``shape`` on a ``size x size`` grid (pixel units), anti-aliased."""
    k = _SUPERSAMPLE
    canvas = Image.new("L", (size * k, size * k), 0)
    draw = ImageDraw.Draw(canvas)
    box = lambda r: (k * (cx - r), k * (cy - r), k * (cx + r), k * (cy + r))  # noqa: E731
    if shape == "circle":
        draw.ellipse(box(radius), fill=255)
    elif shape == "ring":
        draw.ellipse(box(radius), fill=255)
        draw.ellipse(box(0.55 * radius), fill=0)
    else:
        draw.polygon([(k * x, k * y) for x, y in _polygon(shape, cx, cy, radius, angle)], fill=255)
    small = canvas.resize((size, size), Image.BOX)
    return np.asarray(small, dtype=np.float32) / 255.0


def _background(rng: np.random.Generator, size: int) -> np.ndarray:
    """A plain or linear-gradient background of low-saturation colours, ``(size, size, 3)`` float in [0, 255]."""
    def tone():
        grey = rng.uniform(25, 235)
        return np.clip(grey + rng.uniform(-18, 18, size=3), 0, 255)

    a = tone()
    if rng.random() < 0.5:
        return np.broadcast_to(a, (size, size, 3)).copy()
    b = tone()
    theta = rng.uniform(0, 2 * math.pi)
    ys, xs = np.mgrid[0:size, 0:size].astype(np.float32) / (size - 1) - 0.5
    t = np.clip(xs * math.cos(theta) + ys * math.sin(theta) + 0.5, 0, 1)[..., None]
    return a * (1 - t) + b * t


def draw_sample(seed: int, index: int, size: int = SIZE) -> tuple[np.ndarray, int]:
    """Picture ``index`` of the data set ``seed``: a ``(size, size, 3)`` uint8 array and its class."""
    rng = np.random.default_rng([seed, index])
    label = index % NUM_CLASSES
    colour, shape = class_parts(label)
    radius = rng.uniform(0.2, 0.4) * size
    margin = radius * 1.02
    cx, cy = rng.uniform(margin, size - margin, size=2)
    angle = rng.uniform(0, 2 * math.pi)
    fill = np.clip(np.array(RGB[colour], dtype=np.float32) + rng.uniform(-JITTER, JITTER, size=3), 0, 255)
    mask = shape_mask(shape, cx, cy, radius, angle, size)[..., None]
    picture = _background(rng, size) * (1 - mask) + fill * mask
    return np.round(picture).astype(np.uint8), label


def draw_dataset(seed: int, count: int, start: int = 0, size: int = SIZE) -> tuple[np.ndarray, np.ndarray]:
    """Pictures ``start .. start + count - 1``: ``(count, size, size, 3)`` uint8 and ``(count,)`` int64 labels."""
    images = np.empty((count, size, size, 3), dtype=np.uint8)
    labels = np.empty(count, dtype=np.int64)
    for i in range(count):
        images[i], labels[i] = draw_sample(seed, start + i, size)
    return images, labels
