"""apply / remove on tiny U-Nets built from configs: which blocks, how many tokens reach each layer, exactness."""

import pytest
import torch
from diffusers.models.attention_processor import AttnProcessor, AttnProcessor2_0

import tofu_sd
from evaluation.tiny_random import tiny_unet, tiny_unet_inputs
from tofu_sd.reference import partition

SD15_BLOCKS = [
    "down_blocks.0.attentions.0.transformer_blocks.0",
    "down_blocks.0.attentions.1.transformer_blocks.0",
    "up_blocks.2.attentions.0.transformer_blocks.0",
    "up_blocks.2.attentions.1.transformer_blocks.0",
    "up_blocks.2.attentions.2.transformer_blocks.0",
]


def run(unet, **kw):
    with torch.no_grad():
        return unet(**tiny_unet_inputs(unet, **kw)).sample


def token_counts(unet, **kw):
    """Tokens reaching attn1.to_q, attn2.to_q and ff of every transformer block, by block name."""
    counts, handles = {}, []
    for name, module in unet.named_modules():
        if name.endswith("transformer_blocks.0") or name.endswith("transformer_blocks.1"):
            for part, sub in (("attn1", module.attn1.to_q), ("attn2", module.attn2.to_q), ("ff", module.ff)):
                def hook(_, args, name=name, part=part):
                    counts[(name, part)] = args[0].shape[1]
                handles.append(sub.register_forward_pre_hook(hook))
    try:
        run(unet, **kw)
    finally:
        for h in handles:
            h.remove()
    return counts


@pytest.mark.parametrize(
    "kind,expected",
    [
        ("sd15", SD15_BLOCKS),
        ("sd2", SD15_BLOCKS),
        ("sdxl", [f"down_blocks.1.attentions.{a}.transformer_blocks.{b}" for a in range(2) for b in range(2)]
         + [f"up_blocks.1.attentions.{a}.transformer_blocks.{b}" for a in range(3) for b in range(2)]),
    ],
)
def test_highest_transformer_resolution_is_patched(kind, expected):
    unet = tiny_unet(kind)
    tofu_sd.apply(unet)
    blocks = tofu_sd.patched_blocks(unet)
    assert [b.name for b in blocks] == expected
    n_down = sum(name.startswith("down") for name in expected)
    assert "".join(b.letter for b in blocks) == "P" * n_down + "M" * (len(expected) - n_down)


def test_max_downsample_extends_to_lower_resolutions(unet_sd15):
    tofu_sd.apply(unet_sd15, max_downsample=2)
    blocks = tofu_sd.patched_blocks(unet_sd15)
    assert len(blocks) == 10 and {b.downsample for b in blocks} == {1, 2}
    assert "".join(b.letter for b in blocks) == "PPPPMMMMMM"


@pytest.mark.parametrize("kind,h,w", [("sd15", 16, 16), ("sd15", 12, 20), ("sd2", 14, 10), ("sdxl", 16, 12)])
def test_only_self_attention_sees_fewer_tokens(kind, h, w):
    unet = tiny_unet(kind)
    tofu_sd.apply(unet, ratio=0.5)
    patched = {b.name for b in tofu_sd.patched_blocks(unet)}
    counts = token_counts(unet, height=h, width=w)
    fine = (h * w) if kind != "sdxl" else (h // 2) * (w // 2)
    for (name, part), n in counts.items():
        if name in patched:
            assert n == (fine - int(fine * 0.5) if part == "attn1" else fine), (name, part)
        else:  # unpatched blocks see all their tokens everywhere
            assert n == counts[(name, "attn2")]


def test_odd_grid_not_divisible_by_cells():
    unet = tiny_unet("sd15")
    tofu_sd.apply(unet, ratio=0.7, sx=3, sy=2)  # 15x13 grid: leftover column and row of sources
    counts = token_counts(unet, height=15, width=13)
    n = 15 * 13
    r = min(int(n * 0.7), n - (15 // 2) * (13 // 3))  # clamped to the number of sources
    assert counts[(SD15_BLOCKS[0], "attn1")] == n - r
    assert run(unet, height=15, width=13).shape == (2, 4, 15, 13)


def test_remove_and_ratio_zero_are_bit_identical(unet_sd15):
    reference = run(unet_sd15)
    tofu_sd.apply(unet_sd15, ratio=0.5)
    assert not torch.equal(run(unet_sd15), reference)
    tofu_sd.remove(unet_sd15)
    assert torch.equal(run(unet_sd15), reference)
    assert not any({"_diffusers_hook", "forward", "__deepcopy__"} & m.__dict__.keys() for m in unet_sd15.modules())
    tofu_sd.apply(unet_sd15, ratio=0.0)
    assert torch.equal(run(unet_sd15), reference)
    assert tofu_sd.get_state(unet_sd15).config.ratio == 0.0
    tofu_sd.remove(unet_sd15)
    assert tofu_sd.get_state(unet_sd15) is None and tofu_sd.patched_blocks(unet_sd15) == []


def test_apply_twice_replaces_the_first_patch(unet_sd15):
    tofu_sd.apply(unet_sd15, ratio=0.5, schedule="A")
    once = run(unet_sd15)
    tofu_sd.apply(unet_sd15, ratio=0.25, schedule="P")
    tofu_sd.apply(unet_sd15, ratio=0.5, schedule="A")
    assert torch.equal(run(unet_sd15), once)
    assert len(unet_sd15.down_blocks[0].attentions[0].transformer_blocks[0]._diffusers_hook.hooks) == 1


def test_schedule_letters_change_the_result(unet_sd15):
    outputs = {}
    for schedule in ("P", "A", "M", "PPMMM", "ppaam"):
        tofu_sd.apply(unet_sd15, schedule=schedule)
        outputs[schedule] = run(unet_sd15)
    assert torch.equal(outputs["PPMMM"], run(tofu_sd.apply(unet_sd15)))  # the default
    assert [b.letter for b in tofu_sd.patched_blocks(tofu_sd.apply(unet_sd15, schedule="ppaam"))] == list("PPAAM")
    for a, b in [("P", "A"), ("A", "M"), ("P", "PPMMM")]:
        assert not torch.allclose(outputs[a], outputs[b])


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"ratio": 1.0}, r"ratio must be in \[0, 1\)"),
        ({"ratio": -0.1}, r"ratio must be in \[0, 1\)"),
        ({"ratio": 0.8}, r"at most 1 - 1/\(sx\*sy\) = 0.75"),
        ({"ratio": 0.6, "sx": 1, "sy": 2}, r"1 - 1/\(sx\*sy\) = 0.5"),
        ({"sx": 0}, r"sx and sy must be >= 1"),
        ({"schedule": "PPXMM"}, r"unknown letter\(s\) X"),
        ({"schedule": "PPM"}, r"3 letters but 5 blocks are patched(.|\n)*up_blocks.2.attentions.2"),
        ({"max_downsample": 3}, r"power of two"),
        ({"use_rand": "false"}, r"use_rand must be True or False, got 'false'"),
        ({"use_rand": 0}, r"use_rand must be True or False, got 0"),
        ({"use_rand": None}, r"use_rand must be True or False, got None"),
    ],
)
def test_bad_options_raise_and_leave_the_model_untouched(unet_sd15, kwargs, match):
    tofu_sd.apply(unet_sd15, ratio=0.3, schedule="A")
    before = run(unet_sd15)
    with pytest.raises(ValueError, match=match):
        tofu_sd.apply(unet_sd15, **kwargs)
    assert torch.equal(run(unet_sd15), before)
    assert tofu_sd.get_state(unet_sd15).config.ratio == 0.3


def test_objects_without_a_unet_are_refused():
    class FluxLike:
        transformer = torch.nn.Linear(2, 2)

    # A `transformer` that is none of the supported families: the message names the object and every family.
    families = r"U-Net \(UNet2DConditionModel.*SD3 \(SD3Transformer2DModel\).*PixArt.*Flux \(FluxTransformer2DModel\)"
    with pytest.raises(ValueError, match=f"does not support FluxLike holding a Linear.*{families}.*register_family"):
        tofu_sd.apply(FluxLike())
    with pytest.raises(ValueError, match=f"does not support Linear. Supported.*{families}"):
        tofu_sd.apply(torch.nn.Linear(2, 2))
    for remove in (tofu_sd.remove, tofu_sd.remove_token_fusion, tofu_sd.get_state):
        with pytest.raises(ValueError, match="does not support Linear"):
            remove(torch.nn.Linear(2, 2))


def test_matches_tomesd_with_average_merging_and_no_randomness():
    """The reference test: schedule A with top-left destinations is ToMe for SD, so outputs equal tomesd's."""
    tomesd = pytest.importorskip("tomesd")
    for h, w in [(16, 16), (18, 22), (15, 13)]:
        unet = tiny_unet("sd15")
        inputs = tiny_unet_inputs(unet, height=h, width=w)
        sample = inputs.pop("sample")  # tomesd reads the size from the first positional argument
        with torch.no_grad():
            tomesd.apply_patch(unet, ratio=0.5, use_rand=False)
            theirs = unet(sample, **inputs).sample
            tomesd.remove_patch(unet)
            full = unet(sample, **inputs).sample
            tofu_sd.apply(unet, ratio=0.5, schedule="A", use_rand=False)
            ours = unet(sample, **inputs).sample
        assert (theirs - full).abs().max() > 1e-3  # tomesd really merged
        torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)


def test_each_sample_is_independent_of_its_batch():
    """CFG halves share one partition, and a batch of one (odd) gets the same as in a batch of two."""
    unet = tiny_unet("sd15")
    tofu_sd.apply(unet, ratio=0.5, use_rand=True, seed=7)
    inputs = tiny_unet_inputs(unet, batch=3)
    with torch.no_grad():
        together = unet(**inputs).sample
        for i in range(3):
            alone = unet(
                inputs["sample"][i : i + 1], inputs["timestep"], inputs["encoder_hidden_states"][i : i + 1]
            ).sample
            torch.testing.assert_close(alone[0], together[i], rtol=1e-4, atol=1e-5)


def test_partition_follows_seed_timestep_and_block_only_with_use_rand(unet_sd15, monkeypatch):
    """The partition each patched block's matching gets, seen through the hooks' call of ``match``."""
    seen = []
    real_match = tofu_sd.state.match
    monkeypatch.setattr(tofu_sd.state, "match", lambda x, plan: seen.append(plan.rows) or real_match(x, plan))

    def partitions(timestep, **options):
        tofu_sd.apply(unet_sd15, **options)
        seen.clear()
        with torch.no_grad():
            unet_sd15(**{**tiny_unet_inputs(unet_sd15), "timestep": timestep})
        return torch.stack(seen)  # (blocks, B, N): rows in partition order, sources then destinations

    base = partitions(torch.tensor(500))
    assert base.shape == (5, 2, 256)
    assert torch.equal(partitions(torch.tensor(500)), base) and torch.equal(partitions(500.0), base)
    assert not torch.equal(partitions(torch.tensor(400)), base)
    assert not torch.equal(partitions(torch.tensor(500), seed=1), base)
    assert not torch.equal(base[0], base[1])  # each block has its own random stream
    assert torch.equal(base[:, 1] - 256, base[:, 0])  # both halves of a CFG batch share the partition
    top_left = partitions(torch.tensor(500), use_rand=False)
    assert torch.equal(partitions(torch.tensor(400), use_rand=False), top_left)
    dst, src = partition(16, 16, 2, 2)
    assert torch.equal(top_left[:, 0], torch.cat([src, dst]).expand(5, -1))


@pytest.mark.parametrize("processor", [AttnProcessor, AttnProcessor2_0])
def test_attention_processors(processor):
    unet = tiny_unet("sd15")
    tofu_sd.apply(unet)
    expected = run(unet)
    unet.set_attn_processor(processor())
    torch.testing.assert_close(run(unet), expected, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision(dtype):
    unet = tiny_unet("sd15")
    reference = run(unet)
    unet.to(dtype)
    tofu_sd.apply(unet)  # default schedule: pruned and MLERP blocks
    inputs = {k: v.to(dtype) if v.is_floating_point() else v for k, v in tiny_unet_inputs(unet).items()}
    with torch.no_grad():
        out = unet(**inputs).sample
    assert out.dtype == dtype and torch.isfinite(out).all()
    unet.float()
    assert (out.float() - run(unet)).abs().max() < 0.1 * reference.abs().max()


def test_lora_loaded_unet():
    peft = pytest.importorskip("peft")
    unet = tiny_unet("sd15")
    unet.add_adapter(peft.LoraConfig(r=4, lora_alpha=4, target_modules=["to_q", "to_k", "to_v", "to_out.0"], init_lora_weights=False))
    with_lora = run(unet)
    tofu_sd.apply(unet)
    counts = token_counts(unet)
    assert counts[(SD15_BLOCKS[0], "attn1")] == 128
    assert not torch.equal(run(unet), with_lora)
    tofu_sd.remove(unet)
    assert torch.equal(run(unet), with_lora)


COMPILED = {  # every kind of hook: tokens / kv, global / local matching, each module
    "global": {},
    "local": {"matching": "local", "local_window": 5},
    "kv-local": {"reduce": "kv", "matching": "local", "ratio": 0.75},  # the kv hook is the same for global matching
    "modules-all": {"modules": "attn1,attn2,ff", "schedule": "PAMAP"},
    "attn2+ff-kv-local": {"modules": ("attn2", "ff"), "reduce": "kv", "matching": "local", "schedule": "PAMAP"},
}


@pytest.mark.parametrize("options", COMPILED.values(), ids=COMPILED.keys())
def test_torch_compile_without_graph_breaks(options):
    unet = tiny_unet("sd15")
    tofu_sd.apply(unet, **options)
    eager = run(unet)
    inputs = tiny_unet_inputs(unet)
    torch._dynamo.reset()
    explanation = torch._dynamo.explain(unet)(**inputs)
    assert explanation.graph_break_count == 0, explanation.break_reasons
    compiled = torch.compile(unet, backend="aot_eager")
    with torch.no_grad():
        torch.testing.assert_close(compiled(**inputs).sample, eager, rtol=1e-4, atol=1e-5)
    # Changing the patch of a compiled U-Net takes effect on the next call.
    tofu_sd.remove(compiled)
    with torch.no_grad():
        torch.testing.assert_close(compiled(**inputs).sample, run(tiny_unet("sd15")), rtol=1e-4, atol=1e-5)
