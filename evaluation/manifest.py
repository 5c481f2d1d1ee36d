"""The manifest of a run directory (``runs/NAME/manifest.json``): its name, reading it, what a new one records of
the call (library versions, the date), and what to say when a folder of images has lost it."""

from __future__ import annotations

import datetime
import json
import platform
from importlib import metadata
from pathlib import Path

from .errors import EvaluationError
from .images import parse_image_name

MANIFEST = "manifest.json"


def library_versions() -> dict[str, str]:
    versions = {"python": platform.python_version()}
    for name in ("tofu-sd", "torch", "diffusers", "transformers", "tomesd"):
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = "not installed"
    return versions


def now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def load_manifest(run_dir: Path) -> dict | None:
    path = Path(run_dir) / MANIFEST
    if not path.exists():
        return None
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as error:
        raise EvaluationError(
            f"{path} is unreadable ({error}); it is not a tofu-sd run directory. If its images are tofu-sd's, move "
            f"{MANIFEST} away and re-run `tofu-sd generate --adopt` with the run's options to rebuild it"
        ) from error


def run_images(run_dir: Path) -> int:
    """How many files named as tofu-sd names its images ``run_dir`` holds in its folders."""
    return sum(1 for p in Path(run_dir).glob("*/*.png") if parse_image_name(p.name))


def missing_manifest_message(run_dir: Path, command: str) -> str:
    """Why ``run_dir`` cannot be used without a manifest, and, if it holds images, how to keep them."""
    count = run_images(run_dir)
    if not count:
        then = "choose a new --out" if command == "generate" else "run `tofu-sd generate` first"
        return f"{run_dir} exists and is not a tofu-sd run directory (no {MANIFEST}); {then}"
    how = "re-run this command with --adopt" if command == "generate" else (
        f"run `tofu-sd generate --adopt --out {run_dir}` with the options the images were made with (--model, "
        "--methods, --seed, --classes, ...), then evaluate again"
    )
    return (
        f"{run_dir} holds {count} images but no {MANIFEST} (it was lost?). To keep the images, {how}: the "
        "manifest is rebuilt from the images' metadata, checked against the call's options"
        + (". Or choose a new --out" if command == "generate" else "")
    )
