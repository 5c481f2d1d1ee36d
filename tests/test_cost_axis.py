"""The Pareto plot's cost axis: `tofu-sd evaluate --cost BENCH.json` takes x from a bench JSON (step time relative to
full, per image size), refuses a bench that lacks a method of the run, and without --cost says what its x is."""

import json

import numpy as np
import pytest
from PIL import Image

from evaluation.cli import main
from evaluation.errors import EvaluationError
from evaluation.pareto import OVERHEAD_NOTE, bench_cost, pareto_data, pareto_figure

RUN = ["full", "tofu@0.3", "tofu@0.5", "tome@0.5", "todo@0.75"]
SEC_PER_IMAGE = {"full": 2.0, "tofu@0.3": 1.8, "tofu@0.5": 1.5, "tome@0.5": 1.6, "todo@0.75": 1.3}


def timing(seconds):
    return {"median_s": sorted(seconds)[1], "min_s": min(seconds), "reps": 3, "peak_mem_gb": 1.0, "seconds": seconds}


def bench_json():
    """A hand-written bench: at 512 px with the bench's own paired ratios, at 1024 px some without (from seconds).

    The per-round ratios are chosen so that their median, the ratio of the medians and the ratio of the minimums
    all differ: only the paired median gives the numbers the test expects.
    """
    return {
        "machine": "Test GPU", "device": "cuda", "dtype": "float16", "arch": "sd15", "batch": 2, "ratio": 0.5,
        "reps": 3, "compiled": False, "torch": "2.x", "date": "2026-12-01 10:00 UTC",
        "steps": {
            "512": {
                "variants": {
                    "full": timing([1.0, 3.0, 2.0]),
                    "tofu@0.3": timing([0.95, 2.5, 1.9]),  # rounds: 0.95, 0.833, 0.95
                    "tofu@0.5": timing([0.9, 0.75, 1.4]),  # rounds: 0.9, 0.25, 0.7 -> 0.7; medians 0.45, mins 0.75
                    "tome@0.5": timing([0.5, 2.7, 1.9]),  # rounds: 0.5, 0.9, 0.95 -> 0.9; medians 0.95
                    "todo@0.75": timing([0.3, 1.5, 0.9]),  # rounds: 0.3, 0.5, 0.45 -> 0.45
                },
                "ratios": {"tofu@0.3/full": 0.95, "tofu@0.5/full": 0.7, "tofu@0.5/full (min)": 0.75,
                           "tome@0.5/full": 0.9, "todo@0.75/full": 0.45},  # fmt: skip
                "peak_mem_kind": "cuda_peak_allocated",
            },
            "1024": {
                "variants": {
                    "full": timing([10.0, 12.0, 11.0]),
                    "tofu@0.3": timing([8.0, 9.0, 8.5]),  # rounds: 0.8, 0.75, 8.5/11
                    "tofu@0.5": timing([5.0, 4.5, 6.6]),  # rounds: 0.5, 0.375, 0.6 -> 0.5; medians 5/11, mins 0.45
                    "tome@0.5": timing([6.0, 6.5, 7.5]),
                    "todo@0.75": timing([3.0, 4.5, 4.0]),  # rounds: 0.3, 0.375, 4/11
                },
                "ratios": {"tome@0.5/full": 0.6},  # the others: computed from the rounds' seconds
                "peak_mem_kind": "cuda_peak_allocated",
            },
        },
    }  # fmt: skip


#: step time relative to full, by size, worked out by hand from bench_json
EXPECTED_X = {
    "512": {"full": 1.0, "tofu@0.3": 0.95, "tofu@0.5": 0.7, "tome@0.5": 0.9, "todo@0.75": 0.45},
    "1024": {"full": 1.0, "tofu@0.3": 8.5 / 11, "tofu@0.5": 0.5, "tome@0.5": 0.6, "todo@0.75": 4 / 11},
}


def small_report(model="tiny"):
    methods = {
        name: {"fid": None, "lpips": None, "lpips_std": None, "ms_ssim": 1.0 - i / 10, "ms_ssim_std": 0.0,
               "prompt_accuracy": 0.9 - i / 20, "fd_classifier": float(i), "sec_per_image": SEC_PER_IMAGE[name],
               "peak_mem_gb": 1.0, "n_images": 2}
        for i, name in enumerate(RUN)
    }  # fmt: skip
    config = {"reference": "full", "model": model, "steps": 2, "device": "cpu", "reduction": {"ratio": 0.5},
              "prompts": "shapes"}  # fmt: skip
    return {"methods": methods, "config": config, "unavailable": {"fid": "no weights", "lpips": "no weights"}}


def write_bench(tmp_path, bench=None, name="bench.json"):
    path = tmp_path / name
    path.write_text(json.dumps(bench or bench_json()))
    return path


def test_bench_json_drives_the_x_values(tmp_path):
    path = write_bench(tmp_path)
    pareto = pareto_data(small_report(), bench_cost(path, RUN, {m: None for m in RUN}))
    assert pareto["cost"] == {
        "kind": "bench", "file": str(path), "arch": "sd15", "sizes": [512, 1024], "device": "cuda",
        "dtype": "float16", "machine": "Test GPU", "batch": 2, "compiled": False, "date": "2026-12-01 10:00 UTC",
        "date_source": "bench", "files": {"512": str(path), "1024": str(path)},
        "dates": {"512": "2026-12-01 10:00 UTC", "1024": "2026-12-01 10:00 UTC"},
    }  # fmt: skip
    points = {p["name"]: p for series in pareto["series"].values() for p in series}
    for size, expected in EXPECTED_X.items():
        assert {name: p["step_vs_full"][size] for name, p in points.items()} == pytest.approx(expected, rel=1e-12)
    assert points["tofu@0.5"]["step_median_s"] == {"512": 0.9, "1024": 5.0}  # the absolute seconds are kept too
    assert points["tofu@0.5"]["sec_per_image"] == 1.5  # ... as is the run's own time, but it is not x
    assert [(r["x"], r["size"]) for r in pareto["rows"]] == [("step_vs_full", "512"), ("step_vs_full", "1024")]
    for row, size in zip(pareto["rows"], ("512", "1024")):
        assert all(part in row["title"] for part in ("sd15", f"{size} px", "cuda", "float16", "2026-12-01"))
    assert pareto["metrics"] == ["ms_ssim", "prompt_accuracy", "fd_classifier"]

    # The figure: a row per size, a column per metric, each panel's x from its own size.
    figure = pareto_figure(pareto)
    assert len(figure.axes) == 2 * 3
    for ax in figure.axes:
        size = "512" if "512 px" in ax.get_title() else "1024"
        lines = {line.get_label(): list(line.get_xdata()) for line in ax.lines}
        x = EXPECTED_X[size]
        expected = {"full": [1.0], "tofu": [x["tofu@0.3"], x["tofu@0.5"]], "tome": [x["tome@0.5"]], "todo": [x["todo@0.75"]]}
        assert set(lines) == set(expected)
        assert all(lines[family] == pytest.approx(xs, rel=1e-12) for family, xs in expected.items())
    assert {ax.get_title().split(", ")[1] for ax in figure.axes} == {"512 px", "1024 px"}


def test_without_cost_x_is_seconds_per_image_and_the_caption_says_it_is_overhead():
    pareto = pareto_data(small_report())
    assert pareto["cost"] == {"kind": "sec_per_image"} and pareto["caption"] == OVERHEAD_NOTE
    assert "overhead" in OVERHEAD_NOTE and "not the speed-up" in OVERHEAD_NOTE
    figure = pareto_figure(pareto)
    assert figure.get_supxlabel().replace("\n", " ") == OVERHEAD_NOTE
    ms_ssim = next(ax for ax in figure.axes if ax.get_ylabel().startswith("MS-SSIM"))
    assert {line.get_label(): list(line.get_xdata()) for line in ms_ssim.lines}["tofu"] == [1.8, 1.5]
    # A model that is not built in: seconds per image are the run's own, and nothing claims they are overhead.
    assert "overhead" not in pareto_data(small_report("some/sd-model"))["caption"]


def _one_size(size, date):
    bench = bench_json()
    bench["steps"] = {size: bench["steps"][size]}
    bench["date"] = date
    return bench


def test_benches_of_two_sizes_share_one_cost_axis(tmp_path):
    a = write_bench(tmp_path, _one_size("512", "2026-12-01 10:00 UTC"), "a.json")
    b = write_bench(tmp_path, _one_size("1024", "2026-12-02 11:00 UTC"), "b.json")
    cost = bench_cost(f"{a},{b}", RUN, {m: None for m in RUN})
    pareto = pareto_data(small_report(), cost)
    points = {p["name"]: p for series in pareto["series"].values() for p in series}
    for size, expected in EXPECTED_X.items():  # the same x as one bench of both sizes
        assert {name: p["step_vs_full"][size] for name, p in points.items()} == pytest.approx(expected, rel=1e-12)
    assert cost["cost"]["files"] == {"512": str(a), "1024": str(b)} and cost["cost"]["file"] == f"{a}, {b}"
    assert [r["title"].endswith(d) for r, d in zip(pareto["rows"], ("10:00 UTC", "11:00 UTC"))] == [True, True]
    with pytest.raises(EvaluationError, match="1024 px is timed in both"):
        bench_cost([a, b, b], RUN, {m: None for m in RUN})
    other = _one_size("1024", "x")
    other["batch"] = 1
    c = write_bench(tmp_path, other, "c.json")
    with pytest.raises(EvaluationError, match="batch: 1 in .*c.json, 2 in .*a.json"):
        bench_cost(f"{a},{c}", RUN, {m: None for m in RUN})


def test_date_falls_back_to_the_file_time(tmp_path):
    bench = bench_json()
    del bench["date"]
    cost = bench_cost(write_bench(tmp_path, bench), RUN, {m: None for m in RUN})["cost"]
    assert cost["date_source"] == "file modified" and cost["date"].endswith("UTC")


def test_methods_the_bench_lacks_are_named_with_the_bench_command(tmp_path):
    bench = bench_json()
    del bench["steps"]["1024"]["variants"]["todo@0.75"]
    path = write_bench(tmp_path, bench)
    run = [*RUN, "tofu", "catome"]
    with pytest.raises(EvaluationError) as error:
        bench_cost(path, run, {**{m: None for m in RUN}, "tofu": 0.5, "catome": None})
    message = str(error.value)
    assert "todo@0.75: not timed at 1024 px" in message and "catome: not timed at 512, 1024 px" in message
    # The run's unsuffixed tofu is not the bench's tofu@0.5: said plainly, with what the bench does have.
    assert "tofu: not timed at 512, 1024 px (the run's name has no '@<ratio>'" in message
    assert "the bench has only tofu@0.3, tofu@0.5" in message
    assert "tofu@0.5:" not in message and "tome@0.5:" not in message  # the timed ones are not listed
    assert (f"tofu-sd bench --arch sd15 --sizes 512,1024 --variants full,tofu@0.3,tofu@0.5,tome@0.5,todo@0.75,"
            f"tofu,catome --ratio 0.5 --json {path}") in message  # fmt: skip


def test_an_unsuffixed_name_must_be_at_the_same_ratio_in_run_and_bench(tmp_path):
    bench = bench_json()
    for step in bench["steps"].values():
        step["variants"]["tome"] = step["variants"]["tome@0.5"]
    path = write_bench(tmp_path, bench)
    assert bench_cost(path, ["full", "tome"], {"full": None, "tome": 0.5})["points"]["tome"]["step_vs_full"]["1024"] > 0
    with pytest.raises(EvaluationError) as error:
        bench_cost(path, ["full", "tome"], {"full": None, "tome": 0.3})
    assert "tome: the run's tome is at ratio 0.3, the bench's unsuffixed tome at --ratio 0.5" in str(error.value)
    assert "--variants full,tome --ratio 0.3 --json" in str(error.value)  # the bench that would match the run


@pytest.mark.parametrize(
    "change,match",
    [
        (lambda b: b.pop("steps"), "no step timings"),
        (lambda b: b["steps"]["512"]["variants"].pop("full"), r"steps\['512'\] has no timing of 'full'"),
        (lambda b: b.update(arch="tiny-random"), "tiny test U-Net"),
        (lambda b: b["steps"]["1024"]["variants"]["tofu@0.5"].pop("seconds"), "lacks median_s or seconds"),
    ],
)
def test_a_bad_bench_file_is_refused(tmp_path, change, match):
    bench = bench_json()
    change(bench)
    with pytest.raises(EvaluationError, match=match):
        bench_cost(write_bench(tmp_path, bench), RUN, {m: None for m in RUN})
    (tmp_path / "broken.json").write_text("{not json")
    with pytest.raises(EvaluationError, match="cannot read --cost"):
        bench_cost(tmp_path / "broken.json", RUN, {})
    with pytest.raises(EvaluationError, match="cannot read --cost"):
        bench_cost(tmp_path / "missing.json", RUN, {})


# --- through the command line ------------------------------------------------------------------------------------


def make_run(folder, methods, prompts="imagenet", n=2):
    """A run directory as `tofu-sd generate` leaves it: a manifest and same-named PNGs per method."""
    rng = np.random.default_rng(0)
    base = rng.uniform(0, 255, size=(n, 16, 16, 3))
    entries = {}
    for i, name in enumerate(methods):
        (folder / name).mkdir(parents=True)
        for k in range(n):
            Image.fromarray(np.clip(base[k] + 10 * i, 0, 255).astype(np.uint8)).save(folder / name / f"0000_{k}.png")
        entries[name] = {"seconds": SEC_PER_IMAGE.get(name, 1.0) * n, "images_timed": n, "peak_mem_bytes": 2**30}
    config = {"model": "tiny-random", "prompts": prompts, "steps": 2, "reduction": {"ratio": 0.5}}
    (folder / "manifest.json").write_text(json.dumps({"config": config, "methods": entries, "classes": [0], "per_class": n}))
    return folder


def test_evaluate_cost_through_the_cli(tmp_path, empty_torch_home, capsys):
    run = make_run(tmp_path / "run", RUN)
    bench = write_bench(tmp_path)
    assert main(["evaluate", str(run), "--cost", str(bench)]) == 0
    report = json.loads((run / "report.json").read_text())
    assert report["pareto"]["cost"]["kind"] == "bench" and report["pareto"]["cost"]["sizes"] == [512, 1024]
    points = {p["name"]: p for series in report["pareto"]["series"].values() for p in series}
    assert {name: p["step_vs_full"]["1024"] for name, p in points.items()} == pytest.approx(EXPECTED_X["1024"])
    md = (run / "report.md").read_text()
    assert "| tofu@0.5 | 0.700 | 0.9 | 0.500 | 5 |" in md and "relative to full" in md

    # A method the bench lacks: a clear error, and nothing written over the last report.
    (run / "report.json").unlink()
    bench_data = bench_json()
    del bench_data["steps"]["512"]["variants"]["tome@0.5"]
    assert main(["evaluate", str(run), "--cost", str(write_bench(tmp_path, bench_data, "partial.json"))]) == 2
    err = capsys.readouterr().err
    assert "tome@0.5: not timed at 512 px" in err and "tofu-sd bench --arch sd15" in err
    assert not (run / "report.json").exists() and not list(run.glob(".*.tmp"))

    # Without --cost: seconds per image, recorded as such, with the overhead caption for a built-in model.
    assert main(["evaluate", str(run)]) == 0
    report = json.loads((run / "report.json").read_text())
    assert report["pareto"]["cost"] == {"kind": "sec_per_image"}
    points = {p["name"]: p for series in report["pareto"]["series"].values() for p in series}
    assert points["tofu@0.5"]["sec_per_image"] == pytest.approx(1.5) and "step_vs_full" not in points["tofu@0.5"]
    assert OVERHEAD_NOTE in (run / "report.md").read_text()


def test_a_method_must_be_timed_with_the_runs_rematch_every_and_cache_interval(tmp_path):
    """ToFu with rematch_every=k, or DeepCache with interval n, has another step time than the bench's default
    variant of the same name: a bench timed otherwise is refused, with the bench command that matches the run."""
    bench = bench_json()
    for step in bench["steps"].values():
        step["variants"]["deepcache+tofu@0.5"] = step["variants"]["tofu@0.5"]
    path = write_bench(tmp_path, bench)
    run = ["full", "tofu@0.5", "tome@0.5", "deepcache+tofu@0.5"]
    ratios = {"full": None, "tofu@0.5": 0.5, "tome@0.5": 0.5, "deepcache+tofu@0.5": 0.5}
    same = {"tofu@0.5": {"rematch_every": 1}, "tome@0.5": {}, "deepcache+tofu@0.5": {"rematch_every": 1, "cache_interval": 3}}
    assert bench_cost(path, run, ratios, same)["points"]["tofu@0.5"]["step_vs_full"]["512"] == pytest.approx(0.7)
    other = {**same, "tofu@0.5": {"rematch_every": 2}, "deepcache+tofu@0.5": {"rematch_every": 2, "cache_interval": 4}}
    with pytest.raises(EvaluationError) as error:
        bench_cost(path, run, ratios, other)
    message = str(error.value)
    assert "tofu@0.5: the run's rematch_every is 2, the bench's 1 (--rematch-every)" in message
    assert "deepcache+tofu@0.5: the run's cache_interval is 4, the bench's 3 (--cache-interval)" in message
    assert "tome@0.5:" not in message
    assert "--cache-interval 4 --rematch-every 2 --json" in message
    bench.update(rematch_every=2, cache_interval=4)
    assert bench_cost(write_bench(tmp_path, bench, "other.json"), run, ratios, other)["points"]


def test_a_method_must_be_timed_at_the_runs_max_downsample(tmp_path):
    """Patching a U-Net's lower levels too (--max-downsample 2) changes every reducing method's step time, not
    full's nor DeepCache's: a bench timed at another level count is refused with the command that matches the run,
    and a bench written before the option existed counts as 1. Benches of different levels share no cost axis."""
    path = write_bench(tmp_path)  # no max_downsample key: an old bench, which timed the highest resolution only
    ratios = {m: None for m in RUN}
    one = {m: ({} if m == "full" else {"max_downsample": 1}) for m in RUN}
    assert bench_cost(path, RUN, ratios, one)["points"]["tome@0.5"]["step_vs_full"]["512"] == pytest.approx(0.9)
    two = {m: ({} if m == "full" else {"max_downsample": 2}) for m in RUN}
    with pytest.raises(EvaluationError) as error:
        bench_cost(path, RUN, ratios, two)
    message = str(error.value)
    assert "todo@0.75: the run's max_downsample is 2, the bench's 1 (--max-downsample)" in message
    assert "full:" not in message and "--max-downsample 2 --json" in message
    bench = bench_json()
    bench["max_downsample"] = 2
    assert bench_cost(write_bench(tmp_path, bench, "two.json"), RUN, ratios, two)["points"]
    a = write_bench(tmp_path, _one_size("512", "x"), "a.json")
    b = _one_size("1024", "y")
    b["max_downsample"] = 2
    with pytest.raises(EvaluationError, match="max_downsample: 2 in .*b.json, 1 in .*a.json"):
        bench_cost(f"{a},{write_bench(tmp_path, b, 'b.json')}", RUN, ratios)


def test_evaluate_takes_max_downsample_from_the_run():
    """What evaluate hands bench_cost: the run's max_downsample for every method that patches levels."""
    from evaluation.evaluate import _step_options

    methods = ["full", "tofu@0.5", "tome+mlp@0.5", "todo@0.75", "deepcache@3", "deepcache+tofu@0.5", "oracle@0.5"]
    manifest = {"config": {"reduction": {"max_downsample": 2, "rematch_every": 1}},
                "methods": {"deepcache+tofu@0.5": {"params": {"cache_interval": 3}}}}  # fmt: skip
    got = _step_options(manifest, methods)
    assert {m for m in methods if got[m].get("max_downsample") == 2} == {
        "tofu@0.5", "tome+mlp@0.5", "todo@0.75", "deepcache+tofu@0.5", "oracle@0.5"}
    assert got["full"] == {} and got["deepcache@3"] == {}


def test_a_name_with_its_own_cache_interval_is_checked_against_its_own_timing(tmp_path):
    """``deepcache@4+tofu-kv@0.75`` was timed at interval 4 whatever the bench's --cache-interval: accepted for a
    run where it ran at 4, refused (naming the bench's 4) where the run's entry says 2."""
    bench = bench_json()
    for step in bench["steps"].values():
        step["variants"]["deepcache@4+tofu-kv@0.75"] = {**timing([0.3, 0.4, 0.35]), "cache_interval": 4}
    path = write_bench(tmp_path, bench)
    run = ["full", "deepcache@4+tofu-kv@0.75"]
    ratios = {"full": None, "deepcache@4+tofu-kv@0.75": 0.75}
    cost = bench_cost(path, run, ratios, {"deepcache@4+tofu-kv@0.75": {"cache_interval": 4}})
    assert cost["points"]["deepcache@4+tofu-kv@0.75"]["step_vs_full"]["512"] > 0
    with pytest.raises(EvaluationError, match="the run's cache_interval is 2, the bench's 4"):
        bench_cost(path, run, ratios, {"deepcache@4+tofu-kv@0.75": {"cache_interval": 2}})
