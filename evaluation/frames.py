"""The frames of a video run's videos, as ``tofu-sd evaluate`` compares them.

``tofu-sd generate`` on a video pipeline (Wan) saves every frame of a video under ``<method>/frames/<stem>/``
(:func:`evaluation.generate.frame_path`) and its middle frame as the method's image ``<method>/<stem>.png``.
The image metrics see only that middle frame; here are the frames of each video, checked before any metric is
computed: a method's video must have as many frames as the reference's video of the same seed.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

from .errors import EvaluationError
from .generate import frame_path

#: Per-video metrics computed over every frame (a video's mean over its frames), beside the middle-frame ones.
FRAME_METRICS = ("ms_ssim_frames", "lpips_frames")


def frame_files(run_dir: Path, method: str, name: str) -> list[Path]:
    """The frame PNGs of ``method``'s video ``name`` (the name of its middle-frame image), in frame order; none
    if the video has no frames folder. EvaluationError for a folder whose files are not frames 0 to n-1."""
    image = Path(run_dir) / method / name
    folder = frame_path(image, 0).parent
    if not folder.is_dir():
        return []
    found = sorted(p.name for p in folder.glob("*.png"))
    expected = [frame_path(image, i).name for i in range(len(found))]
    if found != expected:
        stray = sorted(set(found) - set(expected))
        raise EvaluationError(
            f"{folder} holds {len(found)} frame(s) but not frames {expected[0]} to {expected[-1]} "
            f"(unexpected: {', '.join(stray[:3])}); delete {image} and that folder and re-run `tofu-sd generate` "
            "to make the video again"
        )
    return [folder / n for n in found]


def has_frames(run_dir: Path, methods: Sequence[str]) -> bool:
    """Whether any of ``methods`` saved video frames (``<method>/frames/`` exists): a video run."""
    return any(frame_path(Path(run_dir) / m / "x.png", 0).parent.parent.is_dir() for m in methods)


def frame_counts(run_dir: Path, reference: str, pairs: Mapping[str, Sequence[str]]) -> dict[str, int]:
    """The frame count of each of the reference's videos in ``pairs`` (method: its image names), after checking
    that every method's video has as many; EvaluationError naming the method, the video and both counts."""
    counts = {}
    for name in pairs[reference]:
        counts[name] = len(frame_files(run_dir, reference, name))
        if not counts[name]:
            raise EvaluationError(
                f"{reference}'s video {Path(name).stem} has no frames in "
                f"{frame_path(Path(run_dir) / reference / name, 0).parent}, but this run's methods saved frames; "
                f"delete {Path(run_dir) / reference / name} and re-run `tofu-sd generate` to make the video again"
            )
    for method, names in pairs.items():
        for name in names:
            n = len(frame_files(run_dir, method, name)) if method != reference else counts[name]
            if n != counts[name]:
                raise EvaluationError(
                    f"{method}'s video {Path(name).stem} has {n} frame(s) but {reference}'s has {counts[name]}: "
                    "frame-by-frame scores need the same frame count; delete "
                    f"{Path(run_dir) / method / name} and its frames folder and re-run `tofu-sd generate` with the "
                    "run's --frames to make it again"
                )
    return counts
