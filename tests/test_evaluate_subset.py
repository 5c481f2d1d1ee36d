"""`tofu-sd evaluate --methods` (a subset of a run's methods) and partial methods (fewer images than the
reference), end to end on runs of the random tiny model."""

import json
import re
import shutil

import pytest
import torch

from evaluation.cli import main
from evaluation.evaluate import load_image
from evaluation.metrics import PairwiseMSSSIM, frechet_distance, load_prompt_classifier
from evaluation.paired import paired_comparisons, paired_difference

METHODS = ["full", "tome@0.5", "tofu@0.5"]
NAMES = [f"{c:04d}_{k}.png" for c in range(3) for k in range(2)]


@pytest.fixture(scope="session")
def made_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("subset") / "run"
    args = ["generate", "--model", "tiny-random", "--methods", ",".join(METHODS), "--classes", "0-2",
            "--per-class", "2", "--steps", "2", "--batch-size", "6", "--quiet", "--out", str(out)]  # fmt: skip
    assert main(args) == 0
    return out


@pytest.fixture
def run(made_run, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(made_run, out)
    return out


def _report(run):
    return json.loads((run / "report.json").read_text())


def _files(run):
    return {p.relative_to(run): p.stat().st_mtime_ns for p in run.rglob("*")}


def test_methods_evaluates_only_those_with_the_same_scores(run, empty_torch_home):  # MS-SSIM only: FID is slow
    assert main(["evaluate", str(run)]) == 0
    every = _report(run)
    assert "Methods evaluated (all of the run's methods): full, tome@0.5, tofu@0.5." in (run / "report.md").read_text()
    assert main(["evaluate", str(run), "--methods", "tofu@.50"]) == 0  # generate's forms, normalised
    report = _report(run)
    assert list(report["methods"]) == ["full", "tofu@0.5"] and list(report["per_pair"]) == ["full", "tofu@0.5"]
    assert list(report["config"]["method_params"]) == ["full", "tofu@0.5"]
    assert [p["name"] for points in report["pareto"]["series"].values() for p in points] == ["full", "tofu@0.5"]
    assert report["paired"] == []  # its only partner at 0.5 was left out
    assert report["selection"]["evaluated"] == ["full", "tofu@0.5"]
    assert report["selection"]["not_selected"] == ["tome@0.5"] and report["selection"]["partial"] == {}
    # Evaluating a subset changes no score of the methods it keeps.
    for key in ("ms_ssim", "ms_ssim_std", "n_images"):
        assert report["methods"]["tofu@0.5"][key] == pytest.approx(every["methods"]["tofu@0.5"][key])
    assert report["per_pair"]["tofu@0.5"]["ms_ssim"] == pytest.approx(every["per_pair"]["tofu@0.5"]["ms_ssim"])
    md = (run / "report.md").read_text()
    assert "Methods evaluated (2 of the run's 3): full, tofu@0.5." in md
    assert "left out by `--methods`): tome@0.5" in md and "| tome@0.5 |" not in md and "| tofu@0.5 |" in md


@pytest.mark.parametrize(
    "methods, message",
    [
        ("tofu@0.5,tomesd", "--methods: 'tomesd' is no method of tofu-sd; this run has full, tome@0.5, tofu@0.5"),
        ("todo@0.5", "'todo@0.5' is not in this run; this run has full, tome@0.5, tofu@0.5"),
        ("tofu@0.3", "'tofu@0.3' is not in this run"),
        ("tofu@2", "the ratio after '@' must lie in (0, 1)"),
        ("tofu@0.5,tofu@.5", "--methods lists a method twice"),
        (" , ", "names no method"),
    ],
)
def test_bad_methods_are_refused_before_anything_is_written(run, capsys, monkeypatch, methods, message):
    import evaluation.evaluate as evaluate_module

    monkeypatch.setattr(evaluate_module, "_load_models", lambda *a, **k: pytest.fail("metrics loaded before --methods was checked"))
    before = _files(run)
    assert main(["evaluate", str(run), "--methods", methods]) == 2
    assert message in capsys.readouterr().err
    assert _files(run) == before and not (run / "report.json").exists()


def test_compare_must_name_evaluated_methods(run, capsys, monkeypatch):
    import evaluation.evaluate as evaluate_module

    monkeypatch.setattr(evaluate_module, "_load_models", lambda *a, **k: pytest.fail("metrics loaded before --compare was checked"))
    before = _files(run)
    assert main(["evaluate", str(run), "--methods", "tofu@0.5", "--compare", "tofu@0.5:tome@0.5"]) == 2
    err = capsys.readouterr().err
    assert "--compare names 'tome@0.5', which is not evaluated (--methods leaves it out; add it to --methods); " \
        "evaluated: tofu@0.5" in err  # fmt: skip
    assert _files(run) == before


def _ms_ssim_of(run, method, names):
    """Mean MS-SSIM of ``method`` against full over ``names``, one pair at a time."""
    scores = []
    for name in names:
        metric = PairwiseMSSSIM()
        metric.update(load_image(run / method / name)[None], load_image(run / "full" / name)[None])
        scores.append(metric.compute()[0])
    return sum(scores) / len(scores)


def test_a_partial_method_is_evaluated_on_exactly_its_pairs(run, torch_home):
    # tofu@0.5 was interrupted (2 images missing); full lacks one image that both others have.
    for path in ("tofu@0.5/0002_1.png", "tofu@0.5/0001_0.png", "full/0000_1.png"):
        (run / path).unlink()
    ref_names = [n for n in NAMES if n != "0000_1.png"]
    tofu_names = ["0000_0.png", "0001_1.png", "0002_0.png"]
    assert main(["evaluate", str(run)]) == 0
    report = _report(run)
    selection = report["selection"]
    assert selection["partial"] == {"tofu@0.5": {"pairs": 3, "of": 5}} and selection["reference_images"] == 5
    assert selection["unpaired"] == {"tome@0.5": 1, "tofu@0.5": 1} and selection["left_out"] == {}
    tofu, tome = report["methods"]["tofu@0.5"], report["methods"]["tome@0.5"]
    assert (tofu["n_images"], tome["n_images"], report["methods"]["full"]["n_images"]) == (3, 5, 5)
    assert report["per_pair_names"] == {"tofu@0.5": tofu_names}
    assert tofu["ms_ssim"] == pytest.approx(_ms_ssim_of(run, "tofu@0.5", tofu_names), abs=1e-6)
    assert tome["ms_ssim"] == pytest.approx(_ms_ssim_of(run, "tome@0.5", ref_names), abs=1e-6)
    assert tofu["fid"] > 0 and tofu["lpips"] > 0  # FID on its 3 pairs (at least 2 needed)
    # The paired test of tome and tofu uses the 3 images both have, matched by name.
    (comp,) = [c for c in report["paired"] if c["metric"] == "ms_ssim"]
    tome_scores = dict(zip(ref_names, report["per_pair"]["tome@0.5"]["ms_ssim"]))
    expected = paired_difference([tome_scores[n] for n in tofu_names], report["per_pair"]["tofu@0.5"]["ms_ssim"])
    assert (comp["a"], comp["b"], comp["n"]) == ("tome@0.5", "tofu@0.5", 3)
    assert comp["mean_diff"] == pytest.approx(expected["mean_diff"]) and comp["se"] == pytest.approx(expected["se"])
    md = (run / "report.md").read_text()
    assert "tofu@0.5: 3 of 5 pairs" in md and "biased upwards at smaller counts" in md
    assert re.search(r"\| tofu@0\.5 \| \d+\.\d\d \(3 of 5 img\) \|", md)
    assert re.search(r"\| tome@0\.5 \| \d+\.\d\d \|", md)  # complete: no count
    assert "| tome@0.5 − tofu@0.5 | MS-SSIM | 3 |" in md
    assert (run / "grid.png").exists()


def test_a_method_without_images_is_named_and_left_out(run, capsys, empty_torch_home):
    shutil.rmtree(run / "tome@0.5")
    (run / "tofu@0.5" / "0000_0.png").unlink()
    assert main(["evaluate", str(run), "--compare", "tofu@0.5:tome@0.5"]) == 2
    assert "'tome@0.5', which is not evaluated (left out: no image)" in capsys.readouterr().err
    assert main(["evaluate", str(run)]) == 0
    report = _report(run)
    assert list(report["methods"]) == ["full", "tofu@0.5"] and report["selection"]["left_out"] == {"tome@0.5": "no image"}
    assert report["methods"]["tofu@0.5"]["n_images"] == 5
    assert "Left out, nothing to compare: tome@0.5 (no image)." in (run / "report.md").read_text()
    for path in (run / "full").glob("*.png"):  # without reference images there is nothing to evaluate
        path.unlink()
    assert main(["evaluate", str(run)]) == 2
    assert "holds no PNG images: the reference has nothing to compare with" in capsys.readouterr().err


def test_paired_comparisons_match_scores_by_image_name():
    """Two methods with different images are compared on the images both have, matched by name, not position; a
    DeepCache-interval name shares its ratio's group."""
    per_pair = {
        "full": {},
        "tofu-kv@0.75": {"ms_ssim": [0.9, 0.8, 0.7, 0.6]},
        "deepcache@4+tofu-kv@0.75": {"ms_ssim": [0.5, 0.25]},
    }
    names = {"full": list("abcd"), "tofu-kv@0.75": list("abcd"), "deepcache@4+tofu-kv@0.75": ["b", "d"]}
    (comp,) = paired_comparisons(per_pair, "full", names=names)
    assert (comp["a"], comp["b"], comp["n"]) == ("tofu-kv@0.75", "deepcache@4+tofu-kv@0.75", 2)
    assert comp["mean_diff"] == pytest.approx(((0.8 - 0.5) + (0.6 - 0.25)) / 2)  # b: 0.8 - 0.5, d: 0.6 - 0.25


def test_a_partial_methods_classifier_scores_are_over_its_pairs(tmp_path, empty_torch_home):
    """Prompt accuracy and the classifier FD of a partial method: over its own pairs, against the reference images
    of those pairs only (not all of the reference's)."""
    from test_fd_classifier import shapes_run

    run, names = shapes_run(tmp_path / "run", n=6)
    for name in names[:2]:
        (run / "tofu" / name).unlink()
    kept = sorted(names[2:])
    assert main(["evaluate", str(run), "--batch-size", "4"]) == 0
    report = _report(run)
    assert report["selection"]["partial"] == {"tofu": {"pairs": 4, "of": 6}}
    classifier = load_prompt_classifier()
    with torch.no_grad():
        features = {m: classifier.features(torch.stack([load_image(run / m / n) for n in kept]) * 2 - 1).mean(dim=(2, 3))
                    for m in ("full", "tofu")}  # fmt: skip
        hits = [int(classifier(load_image(run / "tofu" / n)[None]).argmax() == int(n[:4])) for n in kept]
    expected = frechet_distance(features["full"].double().numpy(), features["tofu"].double().numpy())
    tofu = report["methods"]["tofu"]
    assert tofu["fd_classifier"] == pytest.approx(expected, rel=1e-5) and tofu["n_images"] == 4
    assert report["per_pair"]["tofu"]["prompt_accuracy"] == hits and tofu["prompt_accuracy"] == pytest.approx(sum(hits) / 4)
    assert report["methods"]["tome"]["n_images"] == 6
    assert f"| {tofu['fd_classifier']:.3f} (4 of 6 img) |" in (run / "report.md").read_text()
