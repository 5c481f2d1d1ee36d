"""Paired comparisons between methods: is one method's fidelity really different from another's?

Every method of a run makes the same (class, sample) images with the same seeds, so two methods' per-image
scores (MS-SSIM or LPIPS against the reference, prompt-classifier hits) form pairs. The mean of the per-pair
differences, with its standard error, tells a real difference from seed-to-seed noise far better than two
means with their standard deviations: most of the variation between images is shared by both methods.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Mapping, Sequence

from .errors import EvaluationError
from .methods.names import parse_name

#: Per-pair metrics: key, label, True if higher is better. Set-level metrics (FID, the classifier FD) have no
#: per-pair value and are not compared here. A video run's ``*_frames`` scores are one per video (its mean over
#: frames), so a video is one pair.
METRICS = (("ms_ssim", "MS-SSIM", True), ("lpips", "LPIPS", False), ("ms_ssim_frames", "MS-SSIM (all frames)", True),
           ("lpips_frames", "LPIPS (all frames)", False), ("prompt_accuracy", "prompt hit", True))  # fmt: skip
#: |z| at or above this counts as a clear difference (about 95% two-sided under a normal approximation).
Z_CLEAR = 2.0


def paired_difference(a: Sequence[float], b: Sequence[float]) -> dict:
    """Mean of ``a[i] - b[i]``, its standard error (sample standard deviation / sqrt(n)) and ``z = mean / se``.

    ``se`` is None for fewer than 2 pairs; ``z`` is None when ``se`` is None or 0 (identical differences).
    """
    if len(a) != len(b):
        raise ValueError(f"paired scores need equal lengths, got {len(a)} and {len(b)}")
    if not a:
        raise ValueError("no pairs to compare")
    diffs = [x - y for x, y in zip(a, b)]
    n = len(diffs)
    mean = math.fsum(diffs) / n
    se = None
    if n > 1:
        se = math.sqrt(math.fsum((d - mean) ** 2 for d in diffs) / (n - 1) / n)
    z = mean / se if se else None
    return {"mean_diff": mean, "se": se, "z": z, "n": n}


def _group(name: str) -> str:
    """Methods are compared within a ratio: the value of the name (``0.75`` for ``tofu-kv@0.75`` and
    ``deepcache@4+tofu-kv@0.75`` alike; empty for one-ratio names). A name of no known method: the text after '@'."""
    try:
        value = parse_name(name).value
    except EvaluationError:
        return name.partition("@")[2]
    return "" if value is None else f"{value:g}"


def paired_comparisons(
    per_pair: dict[str, dict[str, list[float]]],
    reference: str,
    extra: Sequence[tuple[str, str]] = (),
    names: Mapping[str, Sequence[str]] | None = None,
) -> list[dict]:
    """Every two non-reference methods with the same ratio suffix, per metric that both have, in method order,
    then the ``extra`` pairs ``(a, b)`` (any two methods, e.g. of equal cost at different ratios) not among them.

    ``per_pair`` maps a method to its per-image scores by metric. ``names``, if given, maps a method to the image
    of each of its scores, and two methods are compared on the images both have (a method of an unfinished run
    may lack some); without it every method's scores are of the same images, in the same order. Each entry has
    ``a``, ``b``, ``metric``, ``higher_is_better`` and :func:`paired_difference`'s keys for ``a - b``.
    """
    methods = [m for m in per_pair if m != reference]
    pairs = [(a, b) for a, b in itertools.combinations(methods, 2) if _group(a) == _group(b)]
    pairs += [pair for pair in dict.fromkeys(extra) if pair not in pairs and pair[::-1] not in pairs]
    out = []
    for a, b in pairs:
        for key, _, higher in METRICS:
            va, vb = _shared(per_pair, names, a, b, key)
            if va and vb:
                out.append({"a": a, "b": b, "metric": key, "higher_is_better": higher, **paired_difference(va, vb)})
    return out


def _shared(per_pair, names, a: str, b: str, key: str) -> tuple[list[float] | None, list[float] | None]:
    """Method ``a``'s and ``b``'s scores of ``key`` on the images both have, in ``a``'s image order."""
    va, vb = per_pair[a].get(key), per_pair[b].get(key)
    if not va or not vb or names is None or list(names[a]) == list(names[b]):
        return va, vb
    where = {name: i for i, name in enumerate(names[b])}
    common = [(i, where[name]) for i, name in enumerate(names[a]) if name in where]
    return [va[i] for i, _ in common], [vb[j] for _, j in common]


def parse_pairs(
    text: str, methods: Sequence[str], reference: str, not_evaluated: Mapping[str, str] | None = None
) -> list[tuple[str, str]]:
    """``"a:b,c:d"`` as pairs of the evaluated ``methods``; ValueError saying what is wrong and what the run has.
    ``not_evaluated``: the run's other methods and why they are not evaluated, for a clearer message."""
    pairs = []
    for item in (part.strip() for part in text.split(",")):
        a, sep, b = (side.strip() for side in item.partition(":"))
        if not item or not sep or not a or not b or a == b:
            raise ValueError(f"bad pair {item!r} in --compare: write <method>:<method>, e.g. tofu-kv@0.75:tome@0.5")
        for name in (a, b):
            if name not in methods or name == reference:
                have = ", ".join(m for m in methods if m != reference) or "none"
                if name in (not_evaluated or {}):
                    raise ValueError(
                        f"--compare names {name!r}, which is not evaluated ({not_evaluated[name]}); evaluated: {have}"
                    )
                raise ValueError(f"--compare names {name!r}, which is not a compared method of this run ({have})")
        pairs.append((a, b))
    return pairs


def verdict(entry: dict) -> str:
    """Which method the difference favours, or that it is within noise (``|z| < Z_CLEAR``)."""
    z = entry["z"]
    if z is None:
        return "identical" if entry["mean_diff"] == 0 else "n/a"
    if abs(z) < Z_CLEAR:
        return "within noise"
    better_a = (entry["mean_diff"] > 0) == entry["higher_is_better"]
    return f"{entry['a'] if better_a else entry['b']} better"


def markdown_lines(comparisons: list[dict]) -> list[str]:
    """A report.md section for the comparisons (nothing when there are none)."""
    if not comparisons:
        return []
    labels = {key: label for key, label, _ in METRICS}
    lines = [
        "",
        "## Paired differences between methods (same seeds)",
        "",
        "| a − b | metric | pairs | mean difference | standard error | z | verdict |",
        "|---|---|---|---|---|---|---|",
    ]
    for c in comparisons:
        se = "n/a" if c["se"] is None else f"{c['se']:.4f}"
        z = "n/a" if c["z"] is None else f"{c['z']:+.2f}"
        cells = (f"{c['a']} − {c['b']}", labels[c["metric"]], c["n"], f"{c['mean_diff']:+.4f}", se, z, verdict(c))
        lines.append("| " + " | ".join(map(str, cells)) + " |")
    lines += [
        "",
        f"Per image pair (same class and seed), a's score minus b's; standard error = standard deviation of the "
        f"differences / sqrt(n). |z| >= {Z_CLEAR:g} (about 95%, normal approximation) counts as a clear "
        "difference. Prompt hit: 1 if the classifier names the prompted class, else 0. Methods are compared "
        "within the same ratio, on the images both have (pairs). FID and the classifier FD compare whole image "
        "sets and have no per-pair value, so they are not in this test.",
    ]
    if any(c["metric"].endswith("_frames") for c in comparisons):
        lines[-1] += (
            " MS-SSIM and LPIPS (all frames): one pair per video, each score the mean over the video's frames of "
            "the metric against the reference's same-seed frame; the other metrics compare the videos' middle frames."
        )
    return lines
