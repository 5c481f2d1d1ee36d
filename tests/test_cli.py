"""`tofu-sd generate` and `tofu-sd evaluate` end to end on the offline tiny model."""

import json
import re
import shutil

import numpy as np
import pytest
from PIL import Image

from evaluation import generate as generate_module
from evaluation.cli import main
from evaluation.sampling import image_seed

GENERATE = ["generate", "--model", "tiny-random", "--methods", "full,tome,tofu", "--classes", "0-2", "--per-class", "2",
            "--steps", "2", "--batch-size", "4", "--quiet"]  # fmt: skip
NAMES = [f"{c:04d}_{k}.png" for c in range(3) for k in range(2)]


@pytest.fixture(scope="session")
def generated_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "tiny"
    assert main([*GENERATE, "--out", str(out)]) == 0
    return out


@pytest.fixture
def run_copy(generated_run, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(generated_run, out)
    return out


def test_generate_writes_images_metadata_and_manifest(generated_run):
    for method in ("full", "tome", "tofu"):
        assert sorted(p.name for p in (generated_run / method).iterdir()) == NAMES
    with Image.open(generated_run / "tofu" / "0001_1.png") as image:
        assert image.size == (64, 64)
        assert image.text["prompt"] == "A high-quality photograph of a goldfish."
        assert image.text["method"] == "tofu" and image.text["seed"] == str(1 * 1000 + 1)
    with Image.open(generated_run / "full" / "0001_1.png") as full:
        assert full.text["seed"] == image.text["seed"]
    manifest = json.loads((generated_run / "manifest.json").read_text())
    assert manifest["config"]["model"] == "tiny-random" and manifest["config"]["reduction"]["ratio"] == 0.5
    assert manifest["classes"] == [0, 1, 2] and manifest["per_class"] == 2
    assert {"torch", "diffusers", "tomesd", "tofu-sd"} <= set(manifest["versions"])
    for stats in manifest["methods"].values():
        assert stats["images_timed"] == 6 and stats["seconds"] > 0 and stats["peak_mem_bytes"] > 0


def test_methods_really_differ_and_share_seeds(generated_run):
    pixels = {m: Image.open(generated_run / m / "0000_0.png").tobytes() for m in ("full", "tome", "tofu")}
    assert len(set(pixels.values())) == 3
    # The seed each image records is image_seed's for its class and sample, the same for every method...
    for name in NAMES:
        c, k = (int(part) for part in name.removesuffix(".png").split("_"))
        seeds = {m: Image.open(generated_run / m / name).text["seed"] for m in ("full", "tome", "tofu")}
        assert set(seeds.values()) == {str(image_seed(0, c, k))}, (name, seeds)
    # ... and the one its pixels were drawn from: a reduced image is far nearer to full's image of the same seed
    # than to any other (on the random-weight model the initial noise dominates the image).
    array = lambda m, n: np.asarray(Image.open(generated_run / m / n), dtype=np.float32)  # noqa: E731
    for method in ("tome", "tofu"):
        for name in NAMES:
            distances = {other: np.abs(array(method, name) - array("full", other)).mean() for other in NAMES}
            nearest, *rest = sorted(distances, key=distances.get)
            assert nearest == name and distances[name] < 0.2 * min(distances[o] for o in rest), (method, distances)


def test_methods_help_names_every_method():
    from evaluation.cli import build_parser
    from evaluation.methods import METHODS

    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command").choices["generate"]
    helptext = next(a.help for a in sub._actions if a.dest == "methods")
    named = {name.strip() for name in helptext.split(":", 1)[1].split(";")[0].split(",")}  # "full, tome, ..."
    assert named == set(METHODS), helptext


def test_generate_and_analyze_share_the_sampling_options_and_their_defaults(tmp_path):
    from dataclasses import fields

    from evaluation.analyze import AnalyzeConfig
    from evaluation.cli import _sampling_options, build_parser
    from evaluation.generate import GenerateConfig
    from evaluation.sampling import SamplingOptions

    parser = build_parser()
    for command, config_class, per_class, steps in (("generate", GenerateConfig, 2, 50), ("analyze", AnalyzeConfig, 1, 20)):
        args = parser.parse_args([command, "--out", str(tmp_path)])
        options = _sampling_options(args)
        assert set(options) == {f.name for f in fields(SamplingOptions)}
        built = config_class(**options, out=str(tmp_path), **({"methods": ["full"]} if command == "generate" else {}))
        assert (built.per_class, built.steps, built.guidance_scale, built.batch_size) == (per_class, steps, 7.5, 4)
        assert built.model == "stable-diffusion-v1-5/stable-diffusion-v1-5" and built.classes == list(range(1000))
        flags = parser.parse_args([command, "--out", "x", "--model", "tiny", "--classes", "3,5", "--per-class", "7",
                                   "--steps", "9", "--seed", "4", "--batch-size", "3", "--height", "56", "--width",
                                   "48", "--guidance-scale", "2", "--scheduler", "ddim", "--dtype", "fp32",
                                   "--device", "cpu"])  # fmt: skip
        assert _sampling_options(flags) == dict(
            model="tiny", prompts="shapes", classes=[3, 5], per_class=7, steps=9, seed=4, batch_size=3, device="cpu",
            dtype="fp32", height=56, width=48, guidance_scale=2.0, scheduler="ddim", frames=None,
        )  # fmt: skip


def test_evaluate_report(run_copy, torch_home, capsys):
    assert main(["evaluate", str(run_copy)]) == 0
    report = json.loads((run_copy / "report.json").read_text())
    assert set(report["methods"]) == {"full", "tome", "tofu"}
    assert report["methods"]["full"] | {"sec_per_image": 0, "peak_mem_gb": 0} == {
        "fid": 0.0, "lpips": 0.0, "lpips_std": 0.0, "ms_ssim": 1.0, "ms_ssim_std": 0.0, "prompt_accuracy": None,
        "fd_classifier": None, "sec_per_image": 0, "peak_mem_gb": 0, "n_images": 6,
    }  # fmt: skip
    for method in ("tome", "tofu"):
        m = report["methods"][method]
        assert m["fid"] > 0 and 0 < m["lpips"] and 0 < m["ms_ssim"] < 1 and m["n_images"] == 6
        assert m["sec_per_image"] > 0 and m["peak_mem_gb"] > 0
    assert report["config"]["reference"] == "full" and report["config"]["prompts"] == "imagenet"
    # ImageNet prompts: the shipped classifier knows only the shapes, so no prompt accuracy, and the report says why.
    assert list(report["unavailable"]) == ["prompt_accuracy", "fd_classifier"]
    assert "'shapes'" in report["unavailable"]["prompt_accuracy"] and "'shapes'" in report["unavailable"]["fd_classifier"]
    table = (run_copy / "report.md").read_text()
    assert "| tofu |" in table and "Speed-up" in table and "| full | 0.00 | 0.0000 ± 0.0000 | 1.0000" in table
    with Image.open(run_copy / "grid.png") as grid:
        assert grid.size[0] > 6 * 64 and grid.size[1] > 3 * 64
    assert "| tome |" in capsys.readouterr().out


def test_evaluate_without_metric_weights_marks_them_unavailable(run_copy, empty_torch_home):
    assert main(["evaluate", str(run_copy)]) == 0
    report = json.loads((run_copy / "report.json").read_text())
    assert set(report["unavailable"]) == {"fid", "lpips", "prompt_accuracy", "fd_classifier"}
    assert "pt_inception-2015-12-05-6726825d.pth" in report["unavailable"]["fid"]
    for m in report["methods"].values():
        assert m["fid"] is None and m["lpips"] is None and m["ms_ssim"] is not None
    assert "FID unavailable" in (run_copy / "report.md").read_text()


def test_rerun_generates_nothing(run_copy, monkeypatch):
    before = {p: p.stat().st_mtime_ns for p in run_copy.rglob("*.png")}
    calls = []
    monkeypatch.setattr(generate_module, "save_png_atomic", lambda *a, **k: calls.append(a))
    assert main([*GENERATE, "--out", str(run_copy)]) == 0
    assert calls == [] and before == {p: p.stat().st_mtime_ns for p in run_copy.rglob("*.png")}


def test_interrupted_run_completes_without_duplicates(tmp_path, monkeypatch, generated_run):
    out = tmp_path / "run"
    real_save, saved = generate_module.save_png_atomic, []

    def save_then_stop(image, path, text):
        if len(saved) == 5:  # part way through a batch: the rest of it is never written
            raise KeyboardInterrupt
        real_save(image, path, text)
        saved.append(path)

    monkeypatch.setattr(generate_module, "save_png_atomic", save_then_stop)
    assert main([*GENERATE, "--out", str(out)]) == 130
    assert len(list(out.rglob("*.png"))) == 5 and not list(out.rglob(".*.tmp"))
    monkeypatch.setattr(generate_module, "save_png_atomic", real_save)
    assert main([*GENERATE, "--out", str(out)]) == 0
    for method in ("full", "tome", "tofu"):
        assert sorted(p.name for p in (out / method).iterdir()) == NAMES
    # Resumed images are the same as those of an uninterrupted run.
    for name in NAMES:
        for method in ("full", "tofu"):
            assert Image.open(out / method / name).tobytes() == Image.open(generated_run / method / name).tobytes()


def test_extending_a_run_with_more_classes(run_copy):
    assert main([*GENERATE, "--classes", "0-3", "--out", str(run_copy)]) == 0
    assert len(list((run_copy / "tofu").glob("0003_*.png"))) == 2
    assert json.loads((run_copy / "manifest.json").read_text())["classes"] == [0, 1, 2, 3]


def test_changed_options_are_refused(run_copy, capsys):
    assert main([*GENERATE, "--steps", "3", "--ratio", "0.4", "--out", str(run_copy)]) == 2
    err = capsys.readouterr().err
    assert "steps: run has 2, this call asks 3" in err and "'ratio': 0.5" in err
    assert len(list(run_copy.rglob("*.png"))) == 18


@pytest.mark.parametrize(
    "args,match",
    [
        (["--model", "no-such-folder-or-id"], "could not load --model 'no-such-folder-or-id'"),
        (["--methods", "full,fast"], "unknown method.*fast.*full, tome, tofu"),
        (["--classes", "998-1000"], "bad --classes"),
        (["--ratio", "0.9"], "ratio=0.9 removes more tokens"),
        (["--schedule", "PXM"], "unknown letter"),
        (["--per-class", "0"], "--per-class must be in 1-1000"),
    ],
)
def test_bad_generate_input(tmp_path, capsys, monkeypatch, args, match):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert main([*GENERATE, "--out", str(tmp_path / "x"), *args]) == 2
    assert re.search(match, capsys.readouterr().err)


def test_foreign_directory_is_refused(tmp_path, capsys):
    (tmp_path / "notes.txt").write_text("mine")
    assert main([*GENERATE, "--out", str(tmp_path)]) == 2
    assert "is not a tofu-sd run directory" in capsys.readouterr().err
    assert main(["evaluate", str(tmp_path)]) == 2
    assert "no manifest.json" in capsys.readouterr().err


def test_missing_pairs_are_named(run_copy, capsys, empty_torch_home):
    """Methods that lack images are evaluated on the pairs they have (tests/test_evaluate_subset.py checks the
    scores), and the report names them with their count."""
    (run_copy / "tofu" / "0002_1.png").unlink()
    (run_copy / "full" / "0001_0.png").unlink()
    assert main(["evaluate", str(run_copy)]) == 0
    selection = json.loads((run_copy / "report.json").read_text())["selection"]
    assert selection["partial"] == {"tofu": {"pairs": 4, "of": 5}} and selection["unpaired"] == {"tome": 1, "tofu": 1}
    assert "tofu: 4 of 5 pairs" in capsys.readouterr().out


def test_corrupt_png_and_mismatched_sizes(run_copy, capsys, empty_torch_home):
    (run_copy / "tome" / "0001_0.png").write_bytes(b"\x89PNG\r\n\x1a\nbroken")
    assert main(["evaluate", str(run_copy)]) == 2
    err = capsys.readouterr().err
    assert "cannot read" in err and "tome/0001_0.png" in err and "re-run `tofu-sd generate`" in err
    shutil.copy(run_copy / "full" / "0001_0.png", run_copy / "tome" / "0001_0.png")
    Image.new("RGB", (32, 32)).save(run_copy / "tofu" / "0002_0.png")
    assert main(["evaluate", str(run_copy)]) == 2
    assert "is 32x32 but the reference images are 64x64" in capsys.readouterr().err


def test_unknown_reference_and_empty_method(run_copy, capsys):
    assert main(["evaluate", str(run_copy), "--reference", "tomesd"]) == 2
    assert "reference method 'tomesd' is not in this run; it has full, tome, tofu" in capsys.readouterr().err
    for p in (run_copy / "full").iterdir():
        p.unlink()
    assert main(["evaluate", str(run_copy)]) == 2
    assert "holds no PNG images" in capsys.readouterr().err  # (another empty method is left out: test_evaluate_subset.py)


def test_model_from_a_local_diffusers_folder(tmp_path, tiny_pipe_factory):
    """The real loading path (AutoPipelineForText2Image.from_pretrained) on a saved pipeline, offline."""
    folder = tmp_path / "my-model"
    tiny_pipe_factory().save_pretrained(folder)
    out = tmp_path / "run"
    args = ["generate", "--model", str(folder), "--methods", "full,tofu", "--classes", "5", "--per-class", "1",
            "--steps", "1", "--quiet", "--out", str(out)]  # fmt: skip
    assert main(args) == 0
    assert (out / "tofu" / "0005_0.png").exists()
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["config"]["model"] == str(folder) and manifest["config"]["model_class"] == "StableDiffusionPipeline"


def test_evaluate_reports_paired_differences(run_copy):
    assert main(["evaluate", str(run_copy)]) == 0
    report = json.loads((run_copy / "report.json").read_text())
    n = report["methods"]["tome"]["n_images"]
    assert [len(report["per_pair"][m]["ms_ssim"]) for m in ("tome", "tofu")] == [n, n]
    (comp,) = [c for c in report["paired"] if c["metric"] == "ms_ssim"]
    assert (comp["a"], comp["b"], comp["n"]) == ("tome", "tofu", n)
    tome, tofu = report["per_pair"]["tome"]["ms_ssim"], report["per_pair"]["tofu"]["ms_ssim"]
    assert comp["mean_diff"] == pytest.approx(sum(tome) / n - sum(tofu) / n)
    assert sum(tome) / n == pytest.approx(report["methods"]["tome"]["ms_ssim"])
    assert "## Paired differences between methods" in (run_copy / "report.md").read_text()


def test_evaluate_compare_is_checked_before_any_metric(run_copy, capsys, monkeypatch):
    import evaluation.evaluate as evaluate_module

    monkeypatch.setattr(evaluate_module, "_load_models", lambda *a, **k: pytest.fail("metrics loaded before --compare was checked"))
    assert main(["evaluate", str(run_copy), "--compare", "tofu:tomesd"]) == 2
    assert "--compare names 'tomesd', which is not a compared method of this run (tome, tofu)" in capsys.readouterr().err
