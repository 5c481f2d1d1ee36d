"""Paired comparisons between methods: closed-form statistics, grouping by ratio, verdicts, and the report."""

import math
import re

import pytest

from evaluation.paired import markdown_lines, paired_comparisons, paired_difference, verdict


def test_paired_difference_closed_form():
    # differences 1, 2, 3: mean 2, sample sd 1, se 1/sqrt(3), z 2 sqrt(3)
    d = paired_difference([1.5, 2.5, 3.5], [0.5, 0.5, 0.5])
    assert d["n"] == 3 and d["mean_diff"] == pytest.approx(2.0)
    assert d["se"] == pytest.approx(1 / math.sqrt(3)) and d["z"] == pytest.approx(2 * math.sqrt(3))
    # A shift shared by every pair has no spread: nothing to estimate noise from, no z.
    same = paired_difference([0.9, 0.8], [0.9, 0.8])
    assert same["mean_diff"] == 0 and same["se"] == 0 and same["z"] is None
    assert paired_difference([1.0], [0.0])["se"] is None
    with pytest.raises(ValueError, match="equal lengths"):
        paired_difference([1.0, 2.0], [1.0])
    with pytest.raises(ValueError, match="no pairs"):
        paired_difference([], [])


def test_pairing_removes_the_noise_that_both_methods_share():
    # Per-image scores vary a lot between images, but b is always 0.01 above a: paired, that is certain.
    a = [0.5, 0.9, 0.7, 0.6, 0.95, 0.55]
    b = [x + 0.01 + (0.001 if i % 2 else -0.001) for i, x in enumerate(a)]
    d = paired_difference(a, b)
    assert d["mean_diff"] == pytest.approx(-0.01) and abs(d["z"]) > 20


def test_comparisons_group_by_ratio_and_skip_the_reference():
    per_pair = {
        "full": {},
        "tome@0.3": {"ms_ssim": [0.75, 0.5, 0.25], "prompt_accuracy": [1, 1, 0]},
        "tofu@0.3": {"ms_ssim": [0.875, 0.625, 0.375], "prompt_accuracy": [1, 1, 1]},
        "tofu@0.5": {"ms_ssim": [0.5, 0.5, 0.5]},
        "catome": {"ms_ssim": [0.6, 0.6, 0.7]},
    }
    comps = paired_comparisons(per_pair, "full")
    assert [(c["a"], c["b"], c["metric"]) for c in comps] == [
        ("tome@0.3", "tofu@0.3", "ms_ssim"),
        ("tome@0.3", "tofu@0.3", "prompt_accuracy"),
    ]
    ms = comps[0]
    assert ms["mean_diff"] == -0.125 and ms["z"] is None and verdict(ms) == "n/a"  # exact, zero spread
    hits = comps[1]
    assert hits["mean_diff"] == pytest.approx(-1 / 3) and hits["se"] == pytest.approx(1 / 3)  # sd of (0, 0, -1)


def test_verdict_follows_the_metric_direction():
    base = {"a": "x", "b": "y", "se": 0.01, "n": 50}
    assert verdict({**base, "metric": "ms_ssim", "higher_is_better": True, "mean_diff": 0.05, "z": 5.0}) == "x better"
    assert verdict({**base, "metric": "lpips", "higher_is_better": False, "mean_diff": 0.05, "z": 5.0}) == "y better"
    assert verdict({**base, "metric": "lpips", "higher_is_better": False, "mean_diff": -0.01, "z": -1.0}) == "within noise"
    assert verdict({**base, "metric": "ms_ssim", "higher_is_better": True, "mean_diff": 0.0, "z": None}) == "identical"
    assert markdown_lines([]) == []


def test_set_level_metrics_stay_out_of_the_paired_test():
    # Even given per-image lists under their keys, FID and the classifier FD (one number per image set) are not paired.
    per_pair = {"full": {}, "tome": {"fid": [1.0, 2.0], "fd_classifier": [1.0, 2.0]},
                "tofu": {"fid": [0.0, 1.0], "fd_classifier": [0.0, 1.5]}}  # fmt: skip
    assert paired_comparisons(per_pair, "full") == []
    comps = paired_comparisons({**per_pair, "tofu": {**per_pair["tofu"], "ms_ssim": [0.5, 0.6]},
                                "tome": {**per_pair["tome"], "ms_ssim": [0.4, 0.6]}}, "full")  # fmt: skip
    assert [c["metric"] for c in comps] == ["ms_ssim"]
    assert "FID and the classifier FD compare whole image sets" in " ".join(markdown_lines(comps))


def test_extra_pairs_compare_across_ratios_once():
    """``--compare``'s pairs join the same-ratio ones (equal-cost methods often differ in ratio), each pair once,
    with the closed-form paired difference."""
    from evaluation.paired import parse_pairs

    per_pair = {
        "full": {},
        "tome@0.5": {"ms_ssim": [0.5, 0.75, 1.0]},
        "tofu@0.5": {"ms_ssim": [0.5, 0.5, 0.5]},
        "tofu-kv@0.75": {"ms_ssim": [1.0, 1.0, 1.0]},
    }
    pairs = parse_pairs("tofu-kv@0.75:tome@0.5, tofu@0.5:tome@0.5", list(per_pair), "full")
    comps = paired_comparisons(per_pair, "full", pairs + [("tofu-kv@0.75", "tome@0.5")])
    assert [(c["a"], c["b"]) for c in comps] == [("tome@0.5", "tofu@0.5"), ("tofu-kv@0.75", "tome@0.5")]
    cross = comps[1]
    assert cross["mean_diff"] == pytest.approx(0.25) and cross["se"] == pytest.approx(0.25 / 3**0.5)  # diffs .5, .25, 0


@pytest.mark.parametrize(
    "text, message",
    [("tofu@0.5", "write <method>:<method>"), ("tofu@0.5:", "write <method>:<method>"),
     ("tofu@0.5:tofu@0.5", "write <method>:<method>"), ("tofu@0.5:full", "'full', which is not a compared method"),
     ("tofu@0.5:todo@0.5", "'todo@0.5', which is not a compared method of this run (tome@0.5, tofu@0.5)")],
)  # fmt: skip
def test_bad_compare_pairs_say_what_to_write(text, message):
    from evaluation.paired import parse_pairs

    with pytest.raises(ValueError, match=re.escape(message)):
        parse_pairs(text, ["full", "tome@0.5", "tofu@0.5"], "full")
