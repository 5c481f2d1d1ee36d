"""The step benchmark in its seconds-long smoke mode (speed is never asserted), and its oracle."""

import json

import torch

from evaluation.bench import VARIANTS, OracleHook, variant_applied
from evaluation.cli import main
from evaluation.tiny import tiny_unet, tiny_unet_inputs


def test_bench_smoke_writes_every_variant_and_ratio(tmp_path, capsys):
    out = tmp_path / "bench.json"
    assert main(["bench", "--smoke", "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    variants = result["steps"]["128"]["variants"]
    assert list(variants) == list(VARIANTS)
    for stats in variants.values():
        assert stats["reps"] == 2 and 0 < stats["min_s"] <= stats["median_s"] and stats["peak_mem_gb"] > 0
    assert {"tofu/tome", "tofu/oracle", "tofu/full"} <= set(result["steps"]["128"]["ratios"])
    assert set(result["block_overhead_s"]["256"]) == {"tofu-P", "tofu-A", "tofu-M", "tome", "oracle"}
    assert "tofu/oracle" in capsys.readouterr().out


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
