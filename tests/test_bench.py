"""The step benchmark in its seconds-long smoke mode (speed is never asserted), its variants (the registry's method
names), its oracle, and what it measures with the profiler."""

import json
import os
import subprocess
import sys

import pytest
import torch

import tofu_sd
from evaluation.bench import OVERHEAD, VARIANTS, count_ops, default_variants, peak_alloc_bytes, run_bench, variant_applied
from evaluation.bench.machinery import machinery
from evaluation.bench.profiling import KINETO_LOG_LEVEL, cpu_profile
from evaluation.bench.steps import step_ratios
from evaluation.cli import build_parser, main
from evaluation.methods import REGISTRY
from evaluation.methods.oracle import OracleHook
from evaluation.tiny_random import tiny_unet, tiny_unet_inputs
from tofu_sd.partition import timestep_key


def test_bench_smoke_writes_every_variant_and_ratio(tmp_path, capsys):
    out = tmp_path / "bench.json"
    assert main(["bench", "--smoke", "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["arch"] == "tiny-random"
    variants = result["steps"]["128"]["variants"]
    assert list(variants) == list(default_variants())
    left_out = {v for v in VARIANTS if v not in variants and REGISTRY[v].in_bench_default}
    assert left_out <= {"catome", "deepcache"}  # only where ca-tome (DeepCache) is installed
    assert {"tofu+ff", "tome+mlp", "deepcache+tofu"} <= set(VARIANTS) - set(variants)  # not in the default set
    for stats in variants.values():
        assert stats["reps"] == 2 and 0 < stats["min_s"] <= stats["median_s"] and stats["peak_mem_gb"] > 0
    if "catome" in variants:  # a 50-step schedule's mean: 13 matching steps (CONFIG_3), 37 cached ones
        c = variants["catome"]
        assert c["compute_fraction"] == 13 / 50 and len(c["compute_s"]) == len(c["cached_s"]) == 2
        for mean, compute, cached in zip(c["seconds"], c["compute_s"], c["cached_s"]):
            assert mean == pytest.approx(0.26 * compute + 0.74 * cached)
    assert {"tofu/tome", "tofu/oracle", "tofu/full", "tofu-local/oracle", "tofu-local/tome"} <= set(result["steps"]["128"]["ratios"])
    overhead = result["block_overhead"]["256"]
    assert set(overhead) == set(OVERHEAD)
    # Every candidate returns a new (batch 2, 256 tokens, 32 channels) fp32 tensor, so it allocates at least that.
    output_mb = 2 * 256 * 32 * 4 / 2**20
    for name, stats in overhead.items():
        assert stats["median_s"] > 0 and stats["peak_mb"] >= output_mb, name
    ops = result["ops_per_block"]
    assert set(ops) == {"tome", "tofu", "tofu-local"}
    for counts in ops.values():  # each patch adds real work, made of matmuls, sorts and gathers
        assert counts["per_block"] > 0 and counts["by_op"].get("aten::argsort", 0) >= 5
    out = capsys.readouterr().out
    assert "tofu/oracle" in out and "ops added per patched block" in out
    assert "todo: keys and values pooled 2x2 (75% removed)" in out


def test_bad_variant_is_refused(capsys):
    assert main(["bench", "--smoke", "--variants", "full,fast"]) == 2
    assert "unknown variant(s) fast" in capsys.readouterr().err
    assert main(["bench", "--smoke", "--variants", "full,todo@0.6"]) == 2
    assert "todo@0.75 (2x2)" in capsys.readouterr().err
    assert main(["bench", "--smoke", "--ratio", "0.8", "--variants", "full,tofu"]) == 2
    assert "'tofu': ratio=0.8 removes more tokens than 2x2 cells allow" in capsys.readouterr().err


def test_arch_tiny_is_the_earlier_name_of_tiny_random():
    assert build_parser().parse_args(["bench", "--arch", "tiny"]).arch == "tiny-random"
    assert build_parser().parse_args(["bench", "--arch", "sd15-level"]).arch == "sd15-level"


def test_bench_takes_generates_names_at_their_own_ratios():
    """``tome@0.3`` runs at 0.3 whatever ``--ratio`` is; an unsuffixed name runs at ``--ratio``; ratios compare the
    variants at the same ratio only."""
    unet = tiny_unet("sd15")
    with variant_applied(unet, "tofu@0.5", 0.3):
        assert tofu_sd.get_state(unet).config.ratio == 0.5
    with variant_applied(unet, "tofu", 0.3):
        assert tofu_sd.get_state(unet).config.ratio == 0.3
    with variant_applied(unet, "tofu-P", 0.3):
        assert tofu_sd.get_state(unet).config.schedule == "P"
    with variant_applied(unet, "tome@0.25", 0.5):
        assert unet._tome_info["args"]["ratio"] == 0.25
    names = ["full", "tome@0.3", "tofu@0.5", "todo@0.75", "tofu-local", "oracle@0.5", "tome"]
    result = run_bench(
        arch="tiny-random", latents=(8,), variants=tuple(names), ratio=0.3, reps=1, warmup=0, overhead_tokens=(),
        ops=False, log=lambda msg: None,
    )  # fmt: skip
    variants = result["steps"]["64"]["variants"]
    assert list(variants) == names
    ratios = result["steps"]["64"]["ratios"]
    assert {"tofu@0.5/oracle@0.5", "tofu-local/tome@0.3", "tofu-local/tome", "tome@0.3/full"} <= set(ratios)
    assert "tofu@0.5/tome@0.3" not in ratios and "tofu-local/oracle@0.5" not in ratios


def test_step_ratios_keep_their_keys_for_the_bench_names():
    results = {v: {"seconds": [2.0, 4.0], "peak_mem_gb": 1.0} for v in ("full", "tome", "tofu", "tofu-local", "oracle")}
    results["tofu"] = {"seconds": [1.0, 3.0], "peak_mem_gb": 0.5}
    ratios = step_ratios(results, 0.5)
    assert ratios["tofu/full"] == ratios["tofu/tome"] == ratios["tofu/oracle"] == pytest.approx(0.625)
    assert ratios["tofu/tome (min)"] == 0.5 and ratios["tofu/tome memory"] == 0.5
    assert ratios["tofu-local/oracle"] == 1.0 and "tome/oracle" not in ratios


def test_oracle_runs_self_attention_on_a_strided_subset_and_copies_outputs():
    hook = OracleHook(0.5)
    x = torch.arange(10.0).view(1, 10, 1)
    (kept,), _ = hook.pre_forward(None, x)
    assert kept.flatten().tolist() == [0, 2, 4, 6, 8]
    assert hook.post_forward(None, kept).flatten().tolist() == [0, 0, 2, 2, 4, 4, 6, 6, 8, 8]
    hook = OracleHook(0.75)
    (kept,), _ = hook.pre_forward(None, x)
    assert kept.flatten().tolist() == [0, 4, 8]
    assert hook.post_forward(None, kept).flatten().tolist() == [0, 0, 0, 0, 4, 4, 4, 4, 8, 8]


@pytest.mark.parametrize("ratio,stride", [(0.5, 2), (0.75, 4)])
def test_per_block_oracle_follows_the_ratio_as_the_step_oracle(ratio, stride):
    x = torch.arange(64.0).view(1, 64, 1).expand(2, 64, 3)
    out = machinery(x, 8, ratio, timestep_key(500, x.device))["oracle"]()
    assert out.shape == x.shape
    assert torch.equal(out[0, :, 0], torch.arange(64.0) // stride * stride)


def _structure(unet):
    """What a patch could leave behind: each module's class, attributes, and torch hooks."""
    return {
        name: (type(m), set(m.__dict__), dict(m._forward_pre_hooks), dict(m._forward_hooks))
        for name, m in unet.named_modules()
    }  # fmt: skip


@pytest.mark.parametrize("variant", default_variants())
def test_variants_leave_the_unet_as_it_was(variant):
    """Applied, run and removed, every variant leaves the U-Net exactly as before: same outputs, and no hook
    registry, instance ``forward`` or other attribute left on any module."""
    unet = tiny_unet("sd15")
    inputs = tiny_unet_inputs(unet)
    before = _structure(unet)
    steps = ({**inputs, "timestep": torch.tensor(t)} for t in (500, 480))  # two steps: DeepCache's 2nd is cached
    with torch.no_grad():
        reference = [unet(**step).sample for step in steps]
        with variant_applied(unet, variant, 0.5):
            steps = ({**inputs, "timestep": torch.tensor(t)} for t in (500, 480))
            patched = [unet(step.pop("sample"), **step).sample for step in steps]
        assert torch.equal(unet(**inputs).sample, reference[0])
    if variant != "full":
        assert not torch.equal(patched[1], reference[1])
    assert _structure(unet) == before


def test_count_ops_counts_launching_ops_but_not_views():
    x = torch.randn(4, 6)

    def fn():
        y = x.view(6, 4).t().reshape(-1)  # views, and a reshape that has to copy
        z = (y + 1).to(torch.float32).contiguous()  # a no-op cast and an already contiguous tensor
        return torch.cat([z, z]).sum()

    counts = count_ops(fn)
    assert dict(counts) == {"aten::reshape": 1, "aten::add": 1, "aten::cat": 1, "aten::sum": 1}


def test_peak_alloc_bytes_is_the_peak_of_live_tensors():
    mib = 2**20

    def one_then_another():
        a = torch.ones(mib)  # 4 MiB, freed before the next one
        del a
        return torch.ones(mib // 2)  # 2 MiB

    def both_alive():
        a = torch.ones(mib)
        b = torch.ones(mib // 2)
        return a, b

    assert 4 * mib <= peak_alloc_bytes(one_then_another) < 4 * mib + 64 * 1024
    assert 6 * mib <= peak_alloc_bytes(both_alive) < 6 * mib + 64 * 1024


def test_profiling_leaves_a_users_kineto_log_level(monkeypatch):
    monkeypatch.setenv(KINETO_LOG_LEVEL, "3")
    with cpu_profile():
        assert os.environ[KINETO_LOG_LEVEL] == "3"
    monkeypatch.delenv(KINETO_LOG_LEVEL)
    with cpu_profile():
        pass
    assert KINETO_LOG_LEVEL not in os.environ


def test_profiling_prints_nothing():
    """kineto's ``USDT: ... profiler_start`` lines and, on a CUDA build without a GPU, its ``ERROR: ...
    gpuGetDeviceCount failed`` line do not reach the terminal (a fresh process: kineto starts once per process)."""
    code = (
        "import torch\n"
        "from evaluation.bench.profiling import count_ops, peak_alloc_bytes\n"
        "assert peak_alloc_bytes(lambda: torch.ones(1000)) >= 4000\n"
        "assert count_ops(lambda: torch.ones(3) + 1)['aten::add'] == 1\n"
        "print('done')\n"
    )
    env = {k: v for k, v in os.environ.items() if k != KINETO_LOG_LEVEL}
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert run.returncode == 0, run.stderr
    assert run.stdout == "done\n" and run.stderr == ""


@pytest.mark.parametrize("k", [2, 5])
def test_rematch_every_is_timed_as_a_matching_step_and_a_reusing_step(matches, k):
    """With ``--rematch-every k`` the bench times, per round, a fresh application's matching call and a call at a
    lower timestep that reuses the stored matchings (it matches nothing: counted), weighed 1/k and (k-1)/k; with
    k = 1 a variant is one call, which matches."""
    from evaluation.bench.steps import time_steps
    from evaluation.bench.variants import bench_options

    unet = tiny_unet("sd15")
    inputs = tiny_unet_inputs(unet, height=8, width=8)
    blocks = len(tofu_sd.apply(unet, 0.5) and tofu_sd.patched_blocks(unet))
    tofu_sd.remove(unet)
    summaries, _ = time_steps(unet, inputs, ["tofu-kv@0.5"], 0.5, reps=2, warmup=0, device=torch.device("cpu"),
                              compile_=False, options=bench_options(k))  # fmt: skip
    stats = summaries["tofu-kv@0.5"]
    # 1 memory call, then per round: a matching call (every block matches) and a reusing one (none does)
    assert len(matches) == blocks * (1 + 2)
    assert stats["rematch_every"] == k and len(stats["match_s"]) == len(stats["reuse_s"]) == 2
    for mean, first, rest in zip(stats["seconds"], stats["match_s"], stats["reuse_s"]):
        assert mean == pytest.approx(first / k + rest * (k - 1) / k)
    assert f"rematch_every={k}" in stats["step_mix"]
    matches.clear()
    summaries, _ = time_steps(unet, inputs, ["tofu-kv@0.5"], 0.5, reps=2, warmup=0, device=torch.device("cpu"),
                              compile_=False, options=bench_options(1))  # fmt: skip
    assert len(matches) == blocks * (1 + 2) and "match_s" not in summaries["tofu-kv@0.5"]


def test_bench_rematch_every_option_reaches_the_json(tmp_path):
    out = tmp_path / "bench.json"
    assert main(["bench", "--smoke", "--variants", "full,tofu", "--rematch-every", "3", "--no-ops", "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["rematch_every"] == 3
    assert result["steps"]["128"]["variants"]["tofu"]["rematch_every"] == 3


def test_bench_smoke_times_the_module_variants_and_deepcache(tmp_path, capsys):
    """The +<module> variants, tomesd's merge_mlp, DeepCache alone and around tofu: named as for generate, the
    DeepCache ones as an uncached and a cached step (tests/test_methods_deepcache.py checks which runs what)."""
    pytest.importorskip("DeepCache")
    out = tmp_path / "bench.json"
    names = ["full", "tofu@0.5", "tofu+ff@0.5", "tome+mlp@0.5", "deepcache@3", "deepcache+tofu@0.5"]
    assert main(["bench", "--smoke", "--variants", ",".join(names), "--no-ops", "--overhead-tokens", "", "--json", str(out)]) == 0
    variants = json.loads(out.read_text())["steps"]["128"]["variants"]
    assert list(variants) == names
    for name in ("deepcache@3", "deepcache+tofu@0.5"):
        stats = variants[name]
        assert stats["cache_interval"] == 3 and len(stats["uncached_s"]) == len(stats["cached_s"]) == 2
        for mean, uncached, cached in zip(stats["seconds"], stats["uncached_s"], stats["cached_s"]):
            assert mean == pytest.approx(uncached / 3 + 2 * cached / 3)
    table = capsys.readouterr().out
    assert "  deepcache+tofu@0.5: DeepCache interval 3: per-step mean of 1 uncached step" in table
    assert "\n  deepcache+tofu@0.5 " in table  # the name column is as wide as the longest name


def test_bench_max_downsample_patches_lower_levels_too(tmp_path, capsys):
    """``--max-downsample 2`` reaches every variant, ToFu and tomesd alike (the tiny U-Net has 5 transformer blocks at
    its highest resolution and 5 at the next), and the JSON, which --cost compares with the run's; a diffusion
    transformer refuses it before anything is built."""
    from evaluation.bench.variants import bench_options

    unet = tiny_unet("sd15")
    for levels, blocks in ((1, 5), (2, 10)):
        with variant_applied(unet, "tofu+ff@0.5", 0.5, bench_options(1, levels)):
            assert len(tofu_sd.patched_blocks(unet)) == blocks
        with variant_applied(unet, "tome+mlp@0.5", 0.5, bench_options(1, levels)):  # tomesd decides per call
            assert unet._tome_info["args"]["max_downsample"] == levels and unet._tome_info["args"]["merge_mlp"]
    out = tmp_path / "bench.json"
    argv = ["bench", "--smoke", "--variants", "full,tofu", "--no-ops", "--overhead-tokens", "", "--json", str(out)]
    assert main([*argv, "--max-downsample", "2"]) == 0
    assert json.loads(out.read_text())["max_downsample"] == 2
    assert "max_downsample 2: lower levels patched too)" in capsys.readouterr().out
    with pytest.raises(ValueError, match="tiny-sd3-random is a diffusion transformer.*leave --max-downsample at 1"):
        run_bench(arch="tiny-sd3-random", latents=(8,), reps=1, max_downsample=2, ops=False, overhead_tokens=())
