"""The cost axis of a diffusion transformer's run (``tofu-sd evaluate RUN --cost BENCH.json`` with benches of DiT
slices, :mod:`evaluation.block_cost`): each method's x from the blocks and attentions it ran (manifest.json) and
the bench's step ratio of its Token Fusion part, against numbers worked out by hand; one panel row per bench; the
refusals (a bench without a method's Token Fusion part, a run without counts); and a tiny-sd3 run holding a
stack at two cache values, evaluated."""

import json
import re

import pytest

from evaluation.block_cost import DEFAULT_ATTENTION_SHARE, dit_cost
from evaluation.cli import main
from evaluation.errors import EvaluationError
from evaluation.methods import MethodOptions, method_params
from evaluation.pareto import pareto_data
from tests.test_tiny_sd3_runs import tiny_sd3, tiny_sd3_folder  # noqa: F401 - fixtures
from tofu_sd import TokenFusionConfig

pytestmark = pytest.mark.usefixtures("one_thread")


def timing(seconds):
    return {"median_s": sorted(seconds)[len(seconds) // 2], "min_s": min(seconds), "reps": len(seconds),
            "peak_mem_gb": 1.0, "seconds": seconds}  # fmt: skip


def sd3_bench(variants=("tofu-kv@0.75", "tofu@0.5")):
    """An SD3-medium slice bench at 1024 px with its own paired ratios (they differ from the ratio of medians)."""
    own = {"tofu-kv@0.75": timing([8.5, 7.0, 9.0]), "tofu@0.5": timing([6.0, 9.0, 7.5])}
    ratios = {"tofu-kv@0.75/full": 0.8, "tofu@0.5/full": 0.7}
    return {
        "machine": "Test GPU", "device": "cuda", "dtype": "bfloat16", "arch": "sd3-medium-slice", "batch": 2,
        "ratio": 0.5, "rematch_every": 1, "max_downsample": 1, "cache_interval": 3, "reps": 3, "compiled": False,
        "date": "2026-12-01 10:00 UTC",
        "steps": {"1024": {"variants": {"full": timing([10.0, 10.0, 10.0]), **{v: own[v] for v in variants}},
                           "ratios": {k: r for k, r in ratios.items() if k.split("/")[0] in variants}}},
    }  # fmt: skip


def flux_bench():
    """A FLUX.1-dev slice bench at 1024 px without paired ratios: the cost takes the median of the rounds."""
    return {
        "machine": "Test GPU", "device": "cuda", "dtype": "bfloat16", "arch": "flux-dev-slice", "batch": 1,
        "ratio": 0.5, "rematch_every": 1, "max_downsample": 1, "cache_interval": 3, "reps": 3, "compiled": False,
        "date": "2026-12-02 10:00 UTC",
        "steps": {"1024": {"variants": {
            "full": timing([10.0, 12.0, 11.0]),
            "tofu-kv@0.75": timing([9.0, 9.0, 9.9]),  # rounds 0.9, 0.75, 0.9 -> 0.9
            "tofu@0.5": timing([6.0, 7.2, 6.6]),  # rounds 0.6, 0.6, 0.6
        }}},
    }  # fmt: skip


#: manifest.json's counts per image: full runs 100 blocks and 150 attentions.
COUNTS = {
    "full": (100, 150),
    "tofu-kv@0.75": (100, 150),
    "fbcache@0.2+tofu-kv@0.75": (40, 70),  # whole blocks skipped (the first, dual-attention block always runs)
    "fbcache@0.5": (30, 45),
    "pab@2": (100, 90),  # 60 attentions skipped inside blocks that ran
    "pab@3+tofu@0.5": (100, 80),
    "fastercache": (80, 60),  # unconditional rows skipped (blocks and attentions) and attentions
}
#: x worked out by hand with a = 0.55: r * ((1 - a) * B / 100 + a * min(A / 150, B / 100)), r per bench
EXPECTED = {
    "sd3-medium-slice 1024": {
        "full": 1.0, "tofu-kv@0.75": 0.8, "fbcache@0.2+tofu-kv@0.75": 0.8 * 0.4, "fbcache@0.5": 0.3,
        "pab@2": 0.45 + 0.55 * 0.6, "pab@3+tofu@0.5": 0.7 * (0.45 + 0.55 * 80 / 150), "fastercache": 0.45 * 0.8 + 0.55 * 0.4,
    },
    "flux-dev-slice 1024": {
        "full": 1.0, "tofu-kv@0.75": 0.9, "fbcache@0.2+tofu-kv@0.75": 0.9 * 0.4, "fbcache@0.5": 0.3,
        "pab@2": 0.78, "pab@3+tofu@0.5": 0.6 * (0.45 + 0.55 * 80 / 150), "fastercache": 0.58,
    },
}  # fmt: skip


def stats(counts=COUNTS):
    return {m: {"block_calls_per_image": b, "attention_calls_per_image": a} for m, (b, a) in counts.items()}


def write(tmp_path, name, data):
    path = tmp_path / name
    path.write_text(json.dumps(data))
    return path


def cost_of(tmp_path, share=None, benches=None, counts=COUNTS):
    benches = benches or [sd3_bench(), flux_bench()]
    paths = ",".join(str(write(tmp_path, f"bench{i}.json", b)) for i, b in enumerate(benches))
    methods = list(counts)
    ratios = {m: None for m in methods}
    steps = {m: {"rematch_every": 1} for m in methods if "tofu" in m}
    return dit_cost(paths, stats(counts), methods, ratios, steps, share)


def test_each_methods_cost_is_its_blocks_times_its_token_fusion_parts_step_ratio(tmp_path):
    cost = cost_of(tmp_path)
    assert DEFAULT_ATTENTION_SHARE == 0.55
    assert [row["size"] for row in cost["rows"]] == list(EXPECTED)  # one panel row per bench (arch and size)
    for row, expected in EXPECTED.items():
        got = {m: cost["points"][m]["step_vs_full"][row] for m in COUNTS}
        assert got == pytest.approx(expected, abs=1e-12), row
    assert cost["points"]["pab@3+tofu@0.5"]["tofu_part"] == "tofu@0.5" and cost["points"]["pab@2"]["tofu_part"] is None
    assert cost["points"]["fbcache@0.2+tofu-kv@0.75"]["tofu_step_vs_full"] == {"sd3-medium-slice 1024": 0.8, "flux-dev-slice 1024": 0.9}


def test_the_attention_share_is_an_option_and_the_caption_says_how_x_was_computed(tmp_path):
    cost = cost_of(tmp_path, share=0.3)
    assert cost["points"]["pab@2"]["step_vs_full"]["sd3-medium-slice 1024"] == pytest.approx(0.7 + 0.3 * 0.6)
    assert cost["points"]["fbcache@0.5"]["step_vs_full"]["sd3-medium-slice 1024"] == pytest.approx(0.3)  # no attention skipped
    assert "r x ((1 - a) x B/B_full + a x min(A/A_full, B/B_full))" in cost["caption"] and "a = 0.3" in cost["caption"]
    assert cost["cost"]["attention_share"] == 0.3 and cost["cost"]["attention_share_source"] == "--attention-share"
    with pytest.raises(EvaluationError, match=re.escape("--attention-share 1.5: the attention's share of a block's time lies in [0, 1]")):
        cost_of(tmp_path, share=1.5)


def test_the_plot_and_the_report_take_the_rows_of_this_cost(tmp_path):
    from evaluation.report import _pareto_lines

    cost = cost_of(tmp_path)
    methods = {m: {"ms_ssim": 1.0 - i / 10, "sec_per_image": 1.0} for i, m in enumerate(COUNTS)}
    params = {m: method_params(m, TokenFusionConfig(), MethodOptions(steps=4, guidance_scale=5.0)) for m in COUNTS}
    config = {"reference": "full", "reduction": {"ratio": 0.5}, "method_params": params}
    report = {"methods": methods, "config": config, "unavailable": {}}
    pareto = pareto_data(report, cost)
    assert pareto["rows"] == cost["rows"] and pareto["caption"] == cost["caption"]
    point = next(p for p in pareto["series"]["pab+tofu"] if p["name"] == "pab@3+tofu@0.5")
    stack = next(p for p in pareto["series"]["fbcache+tofu-kv"] if p["name"] == "fbcache@0.2+tofu-kv@0.75")
    assert stack["label"] == "T=0.2, 0.75"  # the cache's value the name gives, with the variant's ratio
    assert point["label"] == "N=3, 0.5" and point["step_vs_full"]["flux-dev-slice 1024"] == pytest.approx(EXPECTED["flux-dev-slice 1024"]["pab@3+tofu@0.5"])
    text = "\n".join(_pareto_lines(pareto, "full"))
    assert "transformer compute relative to full" in text and cost["caption"] in text
    assert "| pab@3+tofu@0.5 | 100 | 80 | tofu@0.5 | 0.700 | 0.520 | 0.600 | 0.446 |" in text


def test_a_bench_without_a_methods_token_fusion_part_is_refused_with_the_command_that_times_it(tmp_path):
    with pytest.raises(EvaluationError) as error:
        cost_of(tmp_path, benches=[sd3_bench(variants=("tofu@0.5",))])
    said = str(error.value)
    assert "tofu-kv@0.75: not timed at 1024 px" in said
    assert "(the Token Fusion parts of stacks: tofu-kv@0.75 in tofu-kv@0.75, fbcache@0.2+tofu-kv@0.75; tofu@0.5 in pab@3+tofu@0.5)" in said
    assert "tofu-sd bench --arch sd3-medium-slice --sizes 1024 --variants full,tofu-kv@0.75,tofu@0.5 --json" in said
    # a cache alone needs no timing
    assert cost_of(tmp_path, benches=[sd3_bench(variants=())], counts={m: COUNTS[m] for m in ("full", "pab@2")})


def test_a_run_without_counts_and_a_bench_of_no_transformer_are_refused(tmp_path):
    counts = dict(COUNTS)
    with pytest.raises(EvaluationError, match="manifest.json has no block_calls_per_image / attention_calls_per_image for pab@2"):
        dit_cost(str(write(tmp_path, "b.json", sd3_bench())), {**stats(counts), "pab@2": {}}, list(counts), {}, {})
    tiny = {**sd3_bench(), "arch": "tiny-sd3-random"}
    with pytest.raises(EvaluationError, match="timed 'tiny-sd3-random', not a diffusion transformer's blocks"):
        cost_of(tmp_path, benches=[tiny])
    with pytest.raises(EvaluationError, match="sd3-medium-slice at 1024 px is timed in both"):
        cost_of(tmp_path, benches=[sd3_bench(), sd3_bench()])


# --- a tiny-sd3 run ------------------------------------------------------------------------------------------

STACKS = ["fbcache@0.2+tofu@0.5", "fbcache@0.6+tofu@0.5"]  #: one stack at two cache values


def test_a_run_with_a_stack_at_two_cache_values_evaluates_against_a_dit_bench(tiny_sd3, tmp_path, empty_torch_home, capsys):  # noqa: F811
    out = tmp_path / "run"
    args = ["generate", "--model", "tiny-sd3", "--out", str(out), "--methods", ",".join(["full", *STACKS]),
            "--classes", "0-1", "--per-class", "1", "--steps", "4", "--device", "cpu", "--quiet", "--no-warmup"]  # fmt: skip
    assert main(args) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert [manifest["methods"][m]["params"]["threshold"] for m in STACKS] == [0.2, 0.6]
    blocks = [manifest["methods"][m]["block_calls_per_image"] for m in ("full", *STACKS)]
    assert blocks[0] > blocks[2], blocks  # at 0.6 the cache skips blocks (the x below must show it)
    bench = write(tmp_path, "sd3.json", sd3_bench(variants=("tofu@0.5",)))
    assert main(["evaluate", str(out), "--device", "cpu", "--cost", str(bench)]) == 0
    report = json.loads((out / "report.json").read_text())
    full = manifest["methods"]["full"]
    for name in STACKS:  # each paired with full's images, its x from its own counts
        assert report["methods"][name]["n_images"] == 2 and len(report["per_pair"][name]["ms_ssim"]) == 2
        own = manifest["methods"][name]
        blocks = own["block_calls_per_image"] / full["block_calls_per_image"]
        attentions = own["attention_calls_per_image"] / full["attention_calls_per_image"]
        point = next(p for p in report["pareto"]["series"]["fbcache+tofu"] if p["name"] == name)
        assert point["step_vs_full"]["sd3-medium-slice 1024"] == pytest.approx(0.7 * (0.45 * blocks + 0.55 * min(attentions, blocks)))
    assert {(p["a"], p["b"]) for p in report["paired"]} >= {tuple(STACKS)}  # the same ratio: compared with each other
    text = (out / "report.md").read_text()
    assert all(f"| {name} |" in text for name in STACKS) and "transformer compute relative to full" in text
