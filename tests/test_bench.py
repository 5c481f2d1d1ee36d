"""The step benchmark in its seconds-long smoke mode (speed is never asserted), and its oracle."""

import json

import pytest
import torch

from evaluation.bench import OVERHEAD, VARIANTS, OracleHook, count_ops, default_variants, variant_applied
from evaluation.cli import main
from evaluation.tiny import tiny_unet, tiny_unet_inputs


def test_bench_smoke_writes_every_variant_and_ratio(tmp_path, capsys):
    out = tmp_path / "bench.json"
    assert main(["bench", "--smoke", "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    variants = result["steps"]["128"]["variants"]
    assert list(variants) == list(default_variants())
    assert set(VARIANTS) - set(variants) <= {"catome"}  # catome only where ca-tome is installed
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
    for stats in overhead.values():
        assert stats["median_s"] > 0 and stats["peak_mb"] >= 0
    ops = result["ops_per_block"]
    assert set(ops) == {"tome", "tofu", "tofu-local"}
    for counts in ops.values():  # each patch adds real work, made of matmuls, sorts and gathers
        assert counts["per_block"] > 0 and counts["by_op"].get("aten::argsort", 0) >= 5
    out = capsys.readouterr().out
    assert "tofu/oracle" in out and "ops added per patched block" in out


def test_bad_variant_is_refused(capsys):
    assert main(["bench", "--smoke", "--variants", "full,fast"]) == 2
    assert "unknown variant(s) fast" in capsys.readouterr().err


def test_oracle_runs_self_attention_on_a_strided_half_and_copies_outputs():
    hook = OracleHook(0.5)
    x = torch.arange(10.0).view(1, 10, 1)
    (kept,), _ = hook.pre_forward(None, x)
    assert kept.flatten().tolist() == [0, 2, 4, 6, 8]
    assert hook.post_forward(None, kept).flatten().tolist() == [0, 0, 2, 2, 4, 4, 6, 6, 8, 8]


def test_variants_leave_the_unet_as_it_was():
    unet = tiny_unet("sd15")
    inputs = tiny_unet_inputs(unet)
    with torch.no_grad():
        before = unet(**inputs).sample
        for variant in VARIANTS:
            with variant_applied(unet, variant, 0.5):
                pass
        assert torch.equal(unet(**inputs).sample, before)


def test_count_ops_counts_launching_ops_but_not_views():
    x = torch.randn(4, 6)

    def fn():
        y = x.view(6, 4).t().reshape(-1)  # views, and a reshape that has to copy
        z = (y + 1).to(torch.float32).contiguous()  # a no-op cast and an already contiguous tensor
        return torch.cat([z, z]).sum()

    counts = count_ops(fn)
    assert dict(counts) == {"aten::reshape": 1, "aten::add": 1, "aten::cat": 1, "aten::sum": 1}


def test_tofu_local_variant_uses_local_matching():
    unet = tiny_unet("sd15")
    with variant_applied(unet, "tofu-local", 0.5):
        import tofu_sd

        config = tofu_sd.get_state(unet).config
        assert config.matching == "local" and config.schedule is None
