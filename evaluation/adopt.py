"""``tofu-sd generate --adopt``: rebuild a lost ``manifest.json`` from the images of a run directory.

Every image carries, in its PNG text chunks, the prompt, seed, method, class index and name, model and prompt
set it was made with. An image is adopted if all of these agree with this call (its seed is the one ``--seed``
gives its class and sample) and its name and size fit the run. An image that disagrees refuses the adoption: it
was made with other options, and mixing it in would make the comparison wrong. A damaged image is left to be
re-made. What the images do not record (steps, guidance, scheduler, dtype, device, the token-reduction options,
the batch size, the time and memory of each method) cannot be checked: it is taken from this call, and said so.
"""

from __future__ import annotations

from pathlib import Path

import prompts

from .errors import EvaluationError, listed
from .images import TEXT_KEYS, image_text, parse_image_name, read_png
from .manifest import MANIFEST, now
from .sampling import MAX_PER_CLASS

#: What this call gives and no image records: adopted as given, unverified.
UNVERIFIED = ("steps", "guidance_scale", "scheduler", "dtype", "device", "reduction", "method parameters",
              "batch_size", "seconds and peak memory")  # fmt: skip


def _disagreement(config, method: str, path: Path, text: dict[str, str]) -> str | None:
    job = parse_image_name(path.name)
    if job is None:
        return "not a name tofu-sd gives its images (<class:04d>_<k>.png)"
    c, k = job
    if c >= len(prompts.class_names(config.prompts)) or k >= MAX_PER_CLASS:
        return f"class {c}, sample {k} is outside the {config.prompts!r} prompt set or {MAX_PER_CLASS} samples"
    expected = image_text(config, method, c, k)
    wrong = [f"{key} {text.get(key)!r} (this call: {expected[key]!r})" for key in TEXT_KEYS if text.get(key) != expected[key]]
    return ", ".join(wrong) or None


def _scan(config, run_dir: Path) -> tuple[dict[str, int], dict[tuple[int, int], list[str]], list[str], list[str]]:
    """Per method the images adopted; the sizes seen (with some images of each); disagreements; damaged images."""
    adopted: dict[str, int] = {}
    sizes: dict[tuple[int, int], list[str]] = {}
    refused, damaged = [], []
    for method in config.methods:
        adopted[method] = 0
        for path in sorted((run_dir / method).glob("*.png")):
            name = f"{method}/{path.name}"
            try:
                size, text = read_png(path)
            except Exception as error:  # noqa: BLE001 - PIL raises many kinds for damaged files
                damaged.append(f"{name} ({error})")
                continue
            why = _disagreement(config, method, path, text)
            if why is not None:
                refused.append(f"{name}: {why}")
                continue
            sizes.setdefault(size, []).append(name)
            adopted[method] += 1
    return adopted, sizes, refused, damaged


def _check_size(config, sizes: dict[tuple[int, int], list[str]]) -> tuple[int, int] | None:
    """The run's (width, height) from its images; EvaluationError if they are mixed or the call asks another."""
    if len(sizes) > 1:
        shown = "; ".join(f"{w}x{h}: {listed(names, 3)}" for (w, h), names in sizes.items())
        raise EvaluationError(f"cannot adopt images of different sizes ({shown}); move the odd ones away")
    if not sizes:
        return None
    (width, height), = sizes
    for option, asked, found in (("--height", config.height, height), ("--width", config.width, width)):
        if asked is not None and asked != found:
            raise EvaluationError(f"cannot adopt: the images are {width}x{height}, but this call asks {option} {asked}")
    return width, height


def adopt(config, run_dir: Path, asked: dict, log) -> dict:
    """The manifest of ``run_dir`` rebuilt from its images of ``config.methods`` (not written: the caller binds the
    run once the model loaded). EvaluationError if an image disagrees with the call, or a folder holds images of
    a method the call does not name."""
    others = sorted(p.parent.name for p in run_dir.glob("*/*.png") if p.parent.name not in config.methods)
    if others:
        raise EvaluationError(
            f"cannot adopt {run_dir}: {listed(sorted(set(others)))} hold(s) images, but this call's --methods does "
            "not name it; add it to --methods, or move the folder away"
        )
    adopted, sizes, refused, damaged = _scan(config, run_dir)
    if refused:
        raise EvaluationError(
            f"cannot adopt {run_dir}: {len(refused)} image(s) disagree with this call: {listed(refused, 4)}. Re-run "
            "with the options the images were made with, or move those images away"
        )
    size = _check_size(config, sizes)
    if size is None:
        raise EvaluationError(f"cannot adopt {run_dir}: it holds no whole image of {', '.join(config.methods)}")
    jobs = [parse_image_name(n.split("/")[1]) for names in sizes.values() for n in names]
    manifest = {
        "config": {**asked, "width": size[0], "height": size[1]},
        "classes": sorted({c for c, _ in jobs}),
        "per_class": max(k for _, k in jobs) + 1,
        "methods": {m: {"seconds": 0.0, "images_timed": 0, "peak_mem_bytes": 0} for m in config.methods},
        "adopted": {"date": now(), "images": adopted, "checked": list(TEXT_KEYS) + ["size"], "unverified": list(UNVERIFIED)},
    }
    log(
        f"adopting {sum(adopted.values())} image(s) ({', '.join(f'{m}: {n}' for m, n in adopted.items())}) into a new "
        f"{MANIFEST}: their prompt, seed, method, class, model, prompt set and size match this call. Not recorded "
        f"in the images, so taken from this call unverified: {', '.join(UNVERIFIED)}"
        + (f". {len(damaged)} damaged image(s) will be re-made: {listed(damaged, 3)}" if damaged else "")
    )
    return manifest
