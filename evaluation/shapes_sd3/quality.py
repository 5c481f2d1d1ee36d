"""Prompt accuracy of an exported SD3-style model: images for the 48 shape prompts, named by the shipped shape
classifier (:mod:`evaluation.shapes.classifier`), and a grid picture to look at.

    python -m evaluation.shapes_sd3.quality --model evaluation/shapes_sd3/model --per-class 2 --grid /tmp/grid.png
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

from ..shapes import MODEL_DIR as SHAPES_DIR
from ..shapes.classifier import load_classifier
from ..shapes.data import NUM_CLASSES, caption
from . import CALL_KWARGS, DEFAULT_GUIDANCE, DEFAULT_STEPS, MODEL_DIR, load_pipeline


def generate(pipe, classes, per_class: int, steps: int, guidance: float, seed: int, **kwargs) -> np.ndarray:
    """``(len(classes) * per_class, 64, 64, 3)`` float images in [0, 1], class-major; image ``j`` of class ``c``
    from generator seed ``seed + 1000 c + j``."""
    out = []
    for c in classes:
        gens = [torch.Generator().manual_seed(seed + 1000 * c + j) for j in range(per_class)]
        result = pipe(
            [caption(c)] * per_class, num_inference_steps=steps, guidance_scale=guidance, generator=gens,
            output_type="np", **{**CALL_KWARGS, **kwargs},
        )  # fmt: skip
        out.append(result.images)
    return np.concatenate(out)


def prompt_accuracy(images: np.ndarray, labels: np.ndarray) -> tuple[float, np.ndarray]:
    classifier = load_classifier(SHAPES_DIR)
    with torch.no_grad():
        pred = classifier(torch.from_numpy(images).permute(0, 3, 1, 2).float()).argmax(1).numpy()
    return float((pred == labels).mean()), pred


def save_grid(images: np.ndarray, columns: int, path: Path, scale: int = 2) -> None:
    from PIL import Image

    rows = -(-len(images) // columns)
    h, w = images.shape[1:3]
    grid = np.ones((rows * (h + 2), columns * (w + 2), 3), dtype=np.float32)
    for i, im in enumerate(images):
        r, c = divmod(i, columns)
        grid[r * (h + 2) : r * (h + 2) + h, c * (w + 2) : c * (w + 2) + w] = im
    picture = Image.fromarray(np.round(grid * 255).astype(np.uint8))
    picture.resize((picture.width * scale, picture.height * scale), Image.NEAREST).save(path)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m evaluation.shapes_sd3.quality", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=str(MODEL_DIR))
    parser.add_argument("--per-class", type=int, default=2)
    parser.add_argument("--steps", type=int, default=DEFAULT_STEPS)
    parser.add_argument("--guidance", type=float, default=DEFAULT_GUIDANCE)
    parser.add_argument("--max-sequence-length", type=int, default=CALL_KWARGS["max_sequence_length"])
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--grid", help="write a grid PNG here (a row per class pair)")
    parser.add_argument("--threads", type=int, default=0)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    pipe = load_pipeline("cpu", folder=args.model)
    classes = list(range(NUM_CLASSES))
    start = time.perf_counter()
    images = generate(pipe, classes, args.per_class, args.steps, args.guidance, args.seed,
                      max_sequence_length=args.max_sequence_length)  # fmt: skip
    seconds = time.perf_counter() - start
    labels = np.repeat(classes, args.per_class)
    accuracy, pred = prompt_accuracy(images, labels)
    colour_ok = float((pred // 6 == labels // 6).mean())
    shape_ok = float((pred % 6 == labels % 6).mean())
    if args.grid:
        save_grid(images, 12 * args.per_class if args.per_class <= 2 else args.per_class, Path(args.grid))
    print(json.dumps({"prompt_accuracy": accuracy, "colour_accuracy": colour_ok, "shape_accuracy": shape_ok,
                      "images": len(images), "steps": args.steps, "guidance": args.guidance,
                      "max_sequence_length": args.max_sequence_length, "seconds": round(seconds, 1)}))  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
