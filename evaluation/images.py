"""The image files of a run: their names, how they are written, and the check that one is whole.

``<method>/<class:04d>_<k>.png``, with the prompt, seed, method, class, model and prompt set in PNG text
chunks. Written atomically (a temporary sibling, then a rename), so a reader never sees half of one; a machine
crash or another tool can still leave a damaged file behind, which :func:`image_problem` finds.
"""

from __future__ import annotations

import re
from pathlib import Path

from PIL import Image, PngImagePlugin

import prompts

from .files import atomic_path
from .sampling import image_seed

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
PNG_END = b"\x00\x00\x00\x00IEND\xaeB`\x82"  #: the IEND chunk (length 0, type, CRC) that ends every PNG we write
#: The text chunks every image carries (see :func:`image_text`).
TEXT_KEYS = ("prompt", "seed", "method", "class_index", "class_name", "model", "prompt_set")
_NAME = re.compile(r"(\d{4,})_(\d+)\.png")


def image_name(class_index: int, k: int) -> str:
    return f"{class_index:04d}_{k}.png"


def parse_image_name(name: str) -> tuple[int, int] | None:
    """``0012_3.png`` -> (12, 3); None for a name :func:`image_name` does not make."""
    match = _NAME.fullmatch(name)
    if match is None or image_name(int(match[1]), int(match[2])) != name:
        return None
    return int(match[1]), int(match[2])


def image_text(config, method: str, class_index: int, k: int) -> dict[str, str]:
    """The text chunks of sample ``k`` of a class, made by ``method`` with ``config`` (sampling options)."""
    return {
        "prompt": prompts.prompt(class_index, config.prompts), "seed": str(image_seed(config.seed, class_index, k)),
        "method": method, "class_index": str(class_index), "class_name": prompts.class_names(config.prompts)[class_index],
        "model": config.model, "prompt_set": config.prompts,
    }  # fmt: skip


def save_png_atomic(image: Image.Image, path: Path, text: dict[str, str]) -> None:
    """``image`` as a PNG with ``text`` chunks at ``path``; on any failure no file, not even a temporary one."""
    info = PngImagePlugin.PngInfo()
    for key, value in text.items():
        info.add_text(key, value)
    with atomic_path(path) as tmp:
        image.save(tmp, format="PNG", pnginfo=info)


def read_png(path: Path) -> tuple[tuple[int, int], dict[str, str]]:
    """(width, height) and the text chunks of a whole PNG; OSError or SyntaxError (PIL's) if it is not one.

    Whole means: the PNG signature, every chunk's CRC (PIL's ``verify``, which reads the file once without
    decompressing it) and the IEND chunk at the very end (``verify`` accepts a file cut inside IEND). A byte
    changed anywhere fails a CRC; a file cut short, empty or zeroed fails the signature, a chunk or IEND.
    """
    with open(path, "rb") as handle:
        if handle.read(len(PNG_SIGNATURE)) != PNG_SIGNATURE:
            raise SyntaxError("not a PNG file")
        handle.seek(0, 2)
        if handle.tell() < len(PNG_SIGNATURE) + len(PNG_END):
            raise SyntaxError("truncated PNG file")
        handle.seek(-len(PNG_END), 2)
        if handle.read() != PNG_END:
            raise SyntaxError("truncated PNG file (no IEND chunk at the end)")
        handle.seek(0)
        with Image.open(handle, formats=["PNG"]) as image:
            size = image.size
            text = {k: v for k, v in image.info.items() if isinstance(k, str) and isinstance(v, str)}
            image.verify()
    return size, text


def image_problem(path: Path, size: tuple[int, int] | None = None) -> str | None:
    """Why ``path`` is not a finished image of a run whose images are ``size`` (width, height); None if it is."""
    try:
        found, _ = read_png(path)
    except FileNotFoundError:
        return "missing"
    except Exception as error:  # PIL raises OSError, SyntaxError, struct.error, ... for damaged files
        return f"unreadable: {error}"
    if size is not None and found != tuple(size):
        return f"{found[0]}x{found[1]}, the run's images are {size[0]}x{size[1]}"
    return None
