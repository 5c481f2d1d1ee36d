"""Which methods of a run ``tofu-sd evaluate`` compares, and on which images.

``--methods`` picks some of the run's methods (the reference is always among them). Each method is compared on
the (class, sample) images that both it and the reference have, so a run that was interrupted, or extended for
some methods only, is still evaluated: such a *partial* method is named with its count in the report, and a
method with no image in common with the reference is named and left out.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from .errors import EvaluationError
from .manifest import load_manifest, missing_manifest_message
from .methods.names import method_of, parse_name, split_list
from .methods.registry import REGISTRY


@dataclass
class Selection:
    """The evaluated methods of a run and each one's image pairs with the reference."""

    reference: str
    run_methods: list[str]  #: every method of the run's manifest, in its order
    methods: list[str]  #: the methods evaluated, the reference among them, in the manifest's order
    pairs: dict[str, list[str]]  #: per evaluated method, the image names it shares with the reference (sorted)
    not_selected: list[str]  #: the run's methods that ``--methods`` leaves out
    left_out: dict[str, str]  #: selected methods with no image pair at all, and why
    unpaired: dict[str, list[str]]  #: per evaluated method, its images that have no reference image (not compared)

    @property
    def total(self) -> int:
        """The number of reference images: the pairs a complete method has."""
        return len(self.pairs[self.reference])

    @property
    def partial(self) -> dict[str, int]:
        """The evaluated methods with fewer pairs than the reference has images, and their count."""
        return {m: len(p) for m, p in self.pairs.items() if len(p) < self.total}

    def not_evaluated(self) -> dict[str, str]:
        """The run's methods that are not evaluated, and why (for messages naming one of them)."""
        why = {m: "--methods leaves it out; add it to --methods" for m in self.not_selected}
        return {**why, **{m: f"left out: {reason}" for m, reason in self.left_out.items()}}

    def describe(self) -> dict:
        """The report's ``selection`` entry: what was evaluated, on how many pairs, and what was left out."""
        return {
            "run_methods": self.run_methods,
            "evaluated": self.methods,
            "not_selected": self.not_selected,
            "left_out": self.left_out,
            "reference_images": self.total,
            "partial": {m: {"pairs": n, "of": self.total} for m, n in self.partial.items()},
            "unpaired": {m: len(names) for m, names in self.unpaired.items() if names},
        }


def requested_methods(text: str | Sequence[str] | None, run_methods: list[str], reference: str) -> list[str] | None:
    """``--methods`` (text or names) as the run's names, the reference added; None: every method. Names are
    accepted in any form ``generate`` accepts (``tofu@.50`` is ``tofu@0.5``); EvaluationError naming every name
    that is no method or not in this run, with the run's methods."""
    if text is None:
        return None
    names = split_list(text) if isinstance(text, str) else [n.strip() for n in text if n.strip()]
    have = f"this run has {', '.join(run_methods)}"
    if not names:
        raise EvaluationError(f"--methods {text!r} names no method; {have}")
    normal, problems = [], []
    for name in names:
        if method_of(name) not in REGISTRY:
            problems.append(f"{name!r} is no method of tofu-sd")
            continue
        try:
            full_name = str(parse_name(name))
        except EvaluationError as error:
            problems.append(str(error))
            continue
        found = full_name if full_name in run_methods else name if name in run_methods else None
        if found is None:
            problems.append(f"{name!r} is not in this run")
        else:
            normal.append(found)
    if problems:
        raise EvaluationError(f"--methods: {'; '.join(problems)}; {have}")
    if len(set(normal)) != len(normal):
        raise EvaluationError(f"--methods lists a method twice: {','.join(names)}")
    return [m for m in run_methods if m in normal or m == reference]


def method_images(run_dir: Path, method: str) -> set[str]:
    """The names of a method's PNG images (none if its folder is missing)."""
    folder = run_dir / method
    return {p.name for p in folder.glob("*.png")} if folder.is_dir() else set()


def select(run_dir: str | Path, reference: str, methods: str | Sequence[str] | None = None) -> Selection:
    """The run's methods to evaluate (``methods``: ``--methods``, None for all) and their pairs with the reference;
    EvaluationError, before anything is computed or written, for a lost manifest, a reference that is not in the
    run or has no image, and a bad ``--methods``."""
    run_dir = Path(run_dir)
    manifest = load_manifest(run_dir)
    if manifest is None:
        raise EvaluationError(missing_manifest_message(run_dir, "evaluate"))
    run_methods = list(manifest.get("methods", {}))
    if reference not in run_methods:
        raise EvaluationError(f"reference method {reference!r} is not in this run; it has {', '.join(run_methods) or 'none'}")
    chosen = requested_methods(methods, run_methods, reference) or run_methods
    ref_images = method_images(run_dir, reference)
    if not ref_images:
        raise EvaluationError(
            f"{run_dir / reference} holds no PNG images: the reference has nothing to compare with; "
            f"run `tofu-sd generate --out {run_dir}` with the run's options to make them"
        )
    pairs, left_out, unpaired = {}, {}, {}
    for method in chosen:
        images = method_images(run_dir, method)
        common = sorted(images & ref_images)
        if not common:
            left_out[method] = (
                "no image" if not images else f"none of its {len(images)} image(s) has a {reference} image to pair with"
            )
            continue
        pairs[method] = common
        unpaired[method] = sorted(images - ref_images)
    evaluated = [m for m in chosen if m in pairs]
    not_selected = [m for m in run_methods if m not in chosen]
    return Selection(reference, run_methods, evaluated, pairs, not_selected, left_out, unpaired)
