"""Quality of the built-in U-Net model (``--model tiny``) at a given picture size: prompt accuracy and "one shape
per picture".

    python -m evaluation.shapes.quality --model evaluation/shapes/model --size 128 --per-class 1

- Prompt accuracy: the shipped shape classifier (:mod:`.classifier`, trained on 64x64 pictures) names the class of
  each full image of the 48 prompts; a larger image is first reduced to 64x64 by area averaging (the mean of each
  ``f x f`` block, ``f = size / 64``), so the classifier sees what a 64-px picture of the same drawing would show.
- One shape per picture (:func:`count_shapes`): the background is estimated from the picture's border (a plane,
  ``a + b x + c y`` per channel, fitted by least squares: the training pictures' backgrounds are plain or linear
  gradients); pixels farther than ``threshold`` from it (Euclidean RGB distance in [0, 1] units) *and* saturated
  (max - min channel above ``saturation``: the backgrounds are greyish, at most 0.14, every shape colour at least
  0.4) are the shape's, and their 8-connected components of at least ``min_area`` of the picture's pixels are
  counted. Distance alone miscounts two pictures side by side (two backgrounds: no plane fits both), saturation
  alone would count a saturated background. A model drawing outside its training size tends to draw the shape
  twice; this counts that.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch

from . import MODEL_DIR
from .classifier import load_classifier
from .data import NUM_CLASSES, SIZE, caption

STEPS = 20  #: DPM-Solver++ steps, as `tofu-sd generate --model tiny` samples by default
GUIDANCE = 7.5  #: classifier-free guidance, likewise
THRESHOLD = 0.25  #: RGB distance from the background (in [0, 1] units) beyond which a pixel is the shape's
SATURATION = 0.27  #: max - min channel (in [0, 1] units) beyond which a pixel is coloured, not background
MIN_AREA = 0.005  #: the smallest component counted, as a fraction of the picture (the smallest shape: ~1.2%)


def area_downsample(images: np.ndarray, size: int = SIZE) -> np.ndarray:
    """``(B, H, W, C)`` float images reduced to ``size x size`` by averaging ``H / size`` square blocks."""
    h, w = images.shape[1:3]
    if h != w or h % size:
        raise ValueError(f"expected square images whose side is a multiple of {size}, got {h}x{w}")
    f = h // size
    return images.reshape(len(images), size, f, size, f, -1).mean(axis=(2, 4))


def border_background(image: np.ndarray) -> np.ndarray:
    """The background of an ``(H, W, 3)`` float image: a plane per channel fitted to its outermost pixels."""
    h, w = image.shape[:2]
    ys, xs = np.mgrid[0:h, 0:w].astype(np.float64)
    border = np.zeros((h, w), dtype=bool)
    border[[0, -1], :] = border[:, [0, -1]] = True
    design = np.stack([np.ones_like(xs), xs / (w - 1), ys / (h - 1)], axis=-1)
    coef, *_ = np.linalg.lstsq(design[border], image[border].astype(np.float64), rcond=None)
    return design @ coef


def count_shapes(image: np.ndarray, threshold: float = THRESHOLD, saturation: float = SATURATION,
                 min_area: float = MIN_AREA) -> int:  # fmt: skip
    """The number of shapes on an ``(H, W, 3)`` image in [0, 1] (see the module docstring)."""
    from scipy import ndimage

    far = np.linalg.norm(image - border_background(image), axis=-1) > threshold
    far &= image.max(axis=-1) - image.min(axis=-1) > saturation
    labels, count = ndimage.label(far, structure=np.ones((3, 3)))
    if count == 0:
        return 0
    areas = np.bincount(labels.ravel())[1:]
    return int((areas >= min_area * far.size).sum())


def one_shape_fraction(images: np.ndarray, **kwargs) -> float:
    """The fraction of ``(B, H, W, 3)`` images in [0, 1] on which :func:`count_shapes` finds exactly one shape."""
    return float(np.mean([count_shapes(im, **kwargs) == 1 for im in images]))


def generate(pipe, size: int, per_class: int, seed: int = 1, steps: int = STEPS, guidance: float = GUIDANCE) -> np.ndarray:
    """``(48 * per_class, size, size, 3)`` images in [0, 1], class-major; image ``j`` of class ``c`` from
    generator seed ``seed + 1000 c + j``."""
    out = []
    for c in range(NUM_CLASSES):
        gens = [torch.Generator().manual_seed(seed + 1000 * c + j) for j in range(per_class)]
        out.append(pipe([caption(c)] * per_class, height=size, width=size, num_inference_steps=steps,
                        guidance_scale=guidance, generator=gens, output_type="np").images)  # fmt: skip
    return np.concatenate(out)


def score(images: np.ndarray, labels: np.ndarray, classifier_dir: Path = MODEL_DIR) -> dict:
    """Prompt accuracy (after :func:`area_downsample` to 64x64) and one-shape fraction of ``images``."""
    classifier = load_classifier(classifier_dir)
    small = area_downsample(images.astype(np.float32)) if images.shape[1] != SIZE else images.astype(np.float32)
    with torch.no_grad():
        pred = classifier(torch.from_numpy(small).permute(0, 3, 1, 2)).argmax(1).numpy()
    return {
        "prompt_accuracy": float((pred == labels).mean()), "colour_accuracy": float((pred // 6 == labels // 6).mean()),
        "shape_accuracy": float((pred % 6 == labels % 6).mean()), "one_shape": one_shape_fraction(images),
    }  # fmt: skip


def measure(folder: Path, size: int, per_class: int = 1, seed: int = 1, steps: int = STEPS,
            guidance: float = GUIDANCE) -> dict:  # fmt: skip
    """Quality of the model in ``folder`` at ``size`` px on the 48 prompts x ``per_class`` seeds (its classifier
    scores it)."""
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(folder, torch_dtype=torch.float32, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    images = generate(pipe, size, per_class, seed, steps, guidance)
    labels = np.repeat(np.arange(NUM_CLASSES), per_class)
    return {"size": size, "images": len(images), "seed": seed, "steps": steps, "guidance": guidance,
            **score(images, labels, Path(folder))}  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m evaluation.shapes.quality", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=str(MODEL_DIR))
    parser.add_argument("--size", type=int, action="append", help="picture size (repeatable; default 64 and 128)")
    parser.add_argument("--per-class", type=int, default=1)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--threads", type=int, default=0)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    for size in args.size or [SIZE, 2 * SIZE]:
        print(json.dumps(measure(Path(args.model), size, args.per_class, args.seed)), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
