"""``tofu-sd bench`` on diffusion transformers: the tiny ones in a seconds-long run (speed is never asserted) with
the targets in the JSON; the step inputs; the oracle on SD3 / Flux / PixArt (tokens reaching each attention,
Flux's rotary positions, exact removal); the U-Net-only variants refused before any model is built; and the
real-size configs, checked on the meta device (nothing allocated)."""

import json
import math
import re
import types

import pytest
import torch
from diffusers.models.transformers import transformer_flux
from test_dit_common import flux_inputs, pixart_inputs, recording, sd3_inputs, tiny_flux, tiny_pixart, tiny_sd3

import tofu_sd
from evaluation.archs import at_timestep
from evaluation.bench import run_bench
from evaluation.bench.archs import check_fits, transformer_variants_checked
from evaluation.bench.steps import time_steps
from evaluation.bench.targets import dit_targets
from evaluation.bench.variants import bench_options, variant_applied
from evaluation.cli import main
from evaluation.dit_archs import DIT_ARCHS, FLUX_DEV, SD3_MEDIUM, DiTArch, image_ids, step_inputs
from evaluation.errors import EvaluationError
from evaluation.methods import method_applied
from evaluation.methods.strided import ORACLE_HOOK
from tofu_sd import TokenFusionConfig
from tofu_sd.families.flux import grid_from_ids

VARIANTS = ["full", "tofu", "tofu-A", "oracle"]

# --- the bench on the tiny transformers ------------------------------------------------------------------------


@pytest.mark.parametrize("arch,batch", [("tiny-sd3-random", 2), ("tiny-flux-random", 1)])
def test_bench_runs_a_tiny_transformer_and_writes_the_targets(tmp_path, capsys, arch, batch):
    out = tmp_path / "bench.json"
    args = ["bench", "--arch", arch, "--sizes", "128", "--variants", ",".join(VARIANTS), "--reps", "2", "--warmup",
            "0", "--no-ops", "--overhead-tokens", "", "--threads", "1", "--json", str(out)]  # fmt: skip
    assert main(args) == 0
    result = json.loads(out.read_text())
    assert result["arch"] == arch and result["batch"] == batch  # SD3: a CFG batch; Flux-dev: guidance-distilled
    assert result["transformer"]["class"] == DIT_ARCHS[arch].model.__name__
    assert result["targets"] == {"peak_over_full_mb": 256, "vs_oracle": 1.05}
    step = result["steps"]["128"]
    assert list(step["variants"]) == VARIANTS
    targets = step["targets"]
    assert list(targets) == ["tofu", "tofu-A", "oracle"]
    full = step["variants"]["full"]
    for name, entry in targets.items():
        stats = step["variants"][name]
        assert entry["peak_over_full_mb"] == pytest.approx((stats["peak_mem_gb"] - full["peak_mem_gb"]) * 1024)
        assert entry["vs_full"] == pytest.approx(step["ratios"][f"{name}/full"])
        assert ("vs_oracle" in entry) == ("time_ok" in entry) == (name != "oracle")
    assert targets["tofu"]["vs_oracle"] == pytest.approx(step["ratios"]["tofu/oracle"])
    table = capsys.readouterr().out
    assert f"{arch} {result['transformer']['class']} (" in table and "targets: peak above full's <= 256 MB" in table


def test_a_transformer_runs_the_variants_that_run_on_it_by_default():
    names = transformer_variants_checked("tiny-flux-random", None, 0.5, bench_options(), None)
    assert names == ["full", "tofu", "tofu-P", "tofu-A", "tofu-M", "tofu-local", "tofu-kv", "tofu-kv-local", "oracle"]
    assert transformer_variants_checked("tiny-sd3-random", ["tofu@.3", "oracle@0.3"], 0.5, bench_options(), None) == [
        "tofu@0.3", "oracle@0.3"
    ]  # fmt: skip


def test_targets_pair_each_tofu_variant_with_the_oracle_at_its_ratio():
    gb = 1 / 1024  # 1 MB in GB
    results = {
        "full": {"seconds": [2.0, 4.0], "peak_mem_gb": 1.0},
        "tofu": {"seconds": [1.0, 2.1], "peak_mem_gb": 1.0 + 256 * gb},  # exactly at the memory target
        "tofu-A@0.3": {"seconds": [1.5, 3.0], "peak_mem_gb": 1.0 + 257 * gb},
        "oracle": {"seconds": [1.0, 2.0], "peak_mem_gb": 1.0 - 10 * gb},
        "oracle@0.3": {"seconds": [1.5, 2.5], "peak_mem_gb": 1.0},
    }
    targets = dit_targets(results, 0.5)
    assert targets["tofu"] == pytest.approx(
        {"peak_over_full_mb": 256, "vs_full": 0.5125, "vs_oracle": 1.025, "memory_ok": True, "time_ok": True}
    )
    tofu_a = targets["tofu-A@0.3"]
    assert tofu_a["vs_oracle"] == pytest.approx(1.1) and not tofu_a["time_ok"] and not tofu_a["memory_ok"]
    assert targets["oracle"] == pytest.approx({"peak_over_full_mb": -10, "vs_full": 0.5})
    without_full = dit_targets({k: v for k, v in results.items() if k != "full"}, 0.5)
    assert without_full["tofu"] == pytest.approx({"vs_oracle": 1.025, "time_ok": True})


# --- step inputs -----------------------------------------------------------------------------------------------


def test_step_inputs_are_those_the_pipelines_give_at_1024_px():
    sd3 = DIT_ARCHS["sd3-medium"].build(device="meta")
    inputs = step_inputs(sd3, 2, 128, text_tokens=DIT_ARCHS["sd3-medium"].text_tokens)
    assert {k: tuple(v.shape) for k, v in inputs.items()} == {
        "hidden_states": (2, 16, 128, 128), "encoder_hidden_states": (2, 77 + 256, 4096),
        "pooled_projections": (2, 2048), "timestep": (2,),
    }  # fmt: skip
    assert inputs["timestep"].tolist() == [500.0, 500.0]  # StableDiffusion3Pipeline: the scheduler's 0-1000 scale
    flux = DIT_ARCHS["flux-dev"].build(device="meta")
    inputs = step_inputs(flux, 1, 128, text_tokens=DIT_ARCHS["flux-dev"].text_tokens)
    assert {k: tuple(v.shape) for k, v in inputs.items()} == {
        "hidden_states": (1, 64 * 64, 64), "encoder_hidden_states": (1, 512, 4096), "pooled_projections": (1, 768),
        "img_ids": (64 * 64, 3), "txt_ids": (512, 3), "guidance": (1,), "timestep": (1,),
    }  # fmt: skip
    assert grid_from_ids(inputs["img_ids"]) == (64, 64) and not inputs["txt_ids"].any()
    assert inputs["timestep"].tolist() == [0.5] and inputs["guidance"].tolist() == [3.5]  # FluxPipeline: t / 1000
    half = step_inputs(flux, 1, 16, text_tokens=5, dtype=torch.bfloat16)
    assert half["timestep"].dtype == half["hidden_states"].dtype == torch.bfloat16 and half["guidance"].dtype == torch.float32


def test_image_ids_are_flux_pipelines():
    from diffusers import FluxPipeline

    assert torch.equal(image_ids(5, 7), FluxPipeline._prepare_latent_image_ids(1, 5, 7, "cpu", torch.float32))


def test_other_timesteps_are_given_as_each_model_takes_them():
    flux = tiny_flux()
    inputs = step_inputs(flux, 2, 8, text_tokens=3)
    assert at_timestep(inputs, 480)["timestep"].tolist() == pytest.approx([0.48, 0.48])
    sd3 = step_inputs(tiny_sd3(), 2, 8, text_tokens=3)
    assert at_timestep(sd3, 480)["timestep"].tolist() == [480.0, 480.0]
    assert at_timestep({"sample": torch.zeros(1)}, 480)["timestep"].ndim == 0  # a U-Net's: a scalar


def test_rematch_every_on_flux_gives_the_second_call_the_next_timestep():
    """tofu with --rematch-every 2 is timed as a matching call and a reusing one at the next (lower) timestep,
    which Flux takes in [0, 1]."""
    model = tiny_flux()
    seen = []
    model.register_forward_pre_hook(lambda m, args, kwargs: seen.append(kwargs["timestep"].tolist()), with_kwargs=True)
    inputs = step_inputs(model, 1, 8, text_tokens=3)
    summaries, _ = time_steps(model, inputs, ["tofu"], 0.5, reps=1, warmup=0, device=torch.device("cpu"),
                              compile_=False, options=bench_options(2))  # fmt: skip
    assert seen == [[0.5], [0.5], [pytest.approx(0.48)]]  # the peak-memory call, then the round's two phases
    assert len(summaries["tofu"]["match_s"]) == len(summaries["tofu"]["reuse_s"]) == 1


# --- the oracle ------------------------------------------------------------------------------------------------


def oracle_blocks(model):
    """The blocks (``transformer_blocks.3``) with a module that carries one of the oracle's hooks."""
    names = set()
    for name, module in model.named_modules():
        registry = module.__dict__.get("_diffusers_hook")
        if registry is not None and registry.get_hook(ORACLE_HOOK) is not None:
            names.add(".".join(name.split(".")[:2]))
    return names


def _kept(n, ratio):
    return math.ceil(n / round(1 / (1 - ratio)))


@pytest.mark.parametrize("ratio", [0.5, 0.75])
@pytest.mark.parametrize("blocks", [None, "0,2"])
def test_oracle_on_sd3_subsets_the_image_tokens_of_tofus_blocks_only(ratio, blocks):
    model = tiny_sd3(num_layers=3, dual_attention_layers=(0,))
    inputs = sd3_inputs(model, height=10, width=14, text=5)  # a 5 x 7 grid: 35 tokens, an odd count
    n, options = 35, TokenFusionConfig(blocks=blocks)
    modules = {}
    for i, block in enumerate(model.transformer_blocks):
        modules.update({(i, "image"): block.attn.to_q, (i, "text"): block.attn.add_q_proj, (i, "ff"): block.ff})
        if block.attn2 is not None:
            modules[(i, "attn2")] = block.attn2.to_q
    tofu_sd.apply(model, blocks=blocks)
    patched = {b.name for b in tofu_sd.patched_blocks(model)}
    tofu_sd.remove(model)
    with method_applied(model, f"oracle@{ratio}", options), recording(modules) as seen, torch.no_grad():
        assert oracle_blocks(model) == patched  # the blocks of tofu_sd.apply, and no other
        model(**inputs)
    got = {key: [args[0].shape[1] for args, _ in calls] for key, calls in seen.items()}
    for (i, part), counts in got.items():
        hit = part in ("image", "attn2") and (blocks is None or i in (0, 2))
        assert counts == [_kept(n, ratio) if hit else 5 if part == "text" else n], (i, part)


def test_oracle_keeps_the_text_tokens_and_copies_the_kept_image_outputs():
    model = tiny_sd3(num_layers=2)
    inputs = sd3_inputs(model, height=8, width=8, text=5)
    attn = model.transformer_blocks[0].attn
    with recording({"attn": attn}) as given, recording({"attn": attn}, kind="post") as returned, torch.no_grad():
        with method_applied(model, "oracle@0.5", TokenFusionConfig()):
            model(**inputs)
        (_, kwargs), = given["attn"]
        image, text = attn.processor(attn, kwargs["hidden_states"][:, ::2], kwargs["encoder_hidden_states"])
    (out_image, out_text), = returned["attn"]
    assert out_image.shape == kwargs["hidden_states"].shape and out_text.shape == kwargs["encoder_hidden_states"].shape
    assert torch.equal(out_image, image.repeat_interleave(2, dim=1)) and torch.equal(out_text, text)


def test_oracle_on_flux_subsets_both_streams_and_their_rotary_positions(monkeypatch):
    """In double- and single-stream blocks alike, the attention sees the text and every 2nd image token, rotated
    at those tokens' own positions (the model's position embedding of the kept ids); unpatched blocks see all."""
    model = tiny_flux(num_layers=2, num_single_layers=2)
    h, w, T = 5, 6, 4
    inputs = flux_inputs(model, batch=2, h=h, w=w, text=T)
    n, kept = h * w, _kept(h * w, 0.5)
    double, single = model.transformer_blocks, model.single_transformer_blocks
    modules = {
        ("d0", "image"): double[0].attn.to_q, ("d0", "text"): double[0].attn.add_q_proj, ("d0", "ff"): double[0].ff,
        ("d1", "image"): double[1].attn.to_q, ("s0", "joint"): single[0].attn.to_q, ("s0", "mlp"): single[0].proj_mlp,
        ("s1", "joint"): single[1].attn.to_q,
    }  # fmt: skip
    tables = []
    real = transformer_flux.apply_rotary_emb
    monkeypatch.setattr(transformer_flux, "apply_rotary_emb", lambda x, emb, **kw: tables.append(emb) or real(x, emb, **kw))
    with method_applied(model, "oracle", TokenFusionConfig(blocks="0,2")), recording(modules) as seen, torch.no_grad():
        model(**inputs)
    got = {key: [args[0].shape[1] for args, _ in calls] for key, calls in seen.items()}
    assert got == {
        ("d0", "image"): [kept], ("d0", "text"): [T], ("d0", "ff"): [n], ("d1", "image"): [n],
        ("s0", "joint"): [T + kept], ("s0", "mlp"): [T + n], ("s1", "joint"): [T + n],
    }  # fmt: skip
    with torch.no_grad():
        all_ids = model.pos_embed(torch.cat([inputs["txt_ids"], inputs["img_ids"]]))
        kept_ids = model.pos_embed(torch.cat([inputs["txt_ids"], inputs["img_ids"][::2]]))
    assert len(tables) == 2 * 4  # queries and keys, in each of the four blocks
    for block, expected in zip(range(4), (kept_ids, all_ids, kept_ids, all_ids)):
        for table in tables[2 * block : 2 * block + 2]:
            assert all(torch.equal(a, b) for a, b in zip(table, expected)), block


def test_oracle_on_a_flux_single_stream_block_is_a_direct_computation():
    model = tiny_flux(num_layers=1, num_single_layers=1)
    inputs = flux_inputs(model, batch=2, h=4, w=4, text=3)
    attn = model.single_transformer_blocks[0].attn
    with recording({"a": attn}) as given, recording({"a": attn}, kind="post") as returned, torch.no_grad():
        with method_applied(model, "oracle@0.75", TokenFusionConfig(blocks="1")):
            model(**inputs)
        (_, kwargs), = given["a"]
        x, (cos, sin) = kwargs["hidden_states"], kwargs["image_rotary_emb"]
        sub = torch.cat([x[:, :3], x[:, 3::4]], dim=1)
        table = (torch.cat([cos[:3], cos[3::4]]), torch.cat([sin[:3], sin[3::4]]))
        direct = attn.processor(attn, sub, None, None, table)
    (out,) = returned["a"]
    assert torch.equal(out[:, :3], direct[:, :3])
    assert torch.equal(out[:, 3:], direct[:, 3:].repeat_interleave(4, dim=1))


def test_oracle_on_pixart_subsets_the_self_attention_only():
    model = tiny_pixart(num_layers=2)
    inputs = pixart_inputs(model, height=12, width=8, text=6)  # 6 x 4 patches
    block = model.transformer_blocks[0]
    modules = {"attn1": block.attn1.to_q, "attn2": block.attn2.to_q, "attn2 kv": block.attn2.to_k}
    with method_applied(model, "oracle", TokenFusionConfig()), recording(modules) as seen, torch.no_grad():
        model(**inputs)
    assert {k: [a[0].shape[1] for a, _ in calls] for k, calls in seen.items()} == {"attn1": [12], "attn2": [24], "attn2 kv": [6]}


@pytest.mark.parametrize("build,make_inputs", [(tiny_sd3, sd3_inputs), (tiny_flux, flux_inputs), (tiny_pixart, pixart_inputs)])
@pytest.mark.parametrize("variant", ["oracle", "oracle@0.75", "tofu", "tofu-A"])
def test_variants_on_transformers_are_removed_exactly(build, make_inputs, variant):
    """Applied (to the model, or to a pipeline holding it), run and removed, the variant leaves the transformer
    exactly as before: the same bits out, and no hook, registry or instance ``forward`` left on any module."""
    model = build()
    inputs = make_inputs(model)

    def structure():
        return {n: (set(m.__dict__), dict(m._forward_pre_hooks), dict(m._forward_hooks)) for n, m in model.named_modules()}

    before = structure()
    with torch.no_grad():
        reference = model(**inputs).sample
        with variant_applied(types.SimpleNamespace(transformer=model), variant, 0.5):
            patched = model(**inputs).sample
        assert torch.equal(model(**inputs).sample, reference)
    assert not torch.equal(patched, reference)
    assert structure() == before


# --- refused before anything is built ---------------------------------------------------------------------------


@pytest.fixture
def nothing_built(monkeypatch):
    """Building a model other than on the meta device fails the test."""
    real = DiTArch.build

    def build(self, seed=0, device=None, dtype=torch.float32):
        assert str(device) == "meta", "a model was built"
        return real(self, seed, device, dtype)

    monkeypatch.setattr(DiTArch, "build", build)


@pytest.mark.parametrize("arch", ["tiny-sd3-random", "flux-dev"])
def test_unet_only_variants_are_refused_by_name_before_building(nothing_built, capsys, arch):
    assert main(["bench", "--arch", arch, "--variants", "full,tome,todo@0.75,tofu", "--no-ops"]) == 2
    err = capsys.readouterr().err
    assert f"--arch {arch} is a diffusion transformer, and tome, todo@0.75 run on U-Nets only (tome: the tomesd" in err
    assert "On diffusion transformers give full, tofu, tofu-P, tofu-A, tofu-M, tofu-local, tofu-kv, tofu-kv-local, oracle" in err
    for variant in ("deepcache+tofu", "catome", "tome+mlp"):
        with pytest.raises(EvaluationError, match=re.escape(f"and {variant} runs on U-Nets only ({variant}: ")):
            run_bench(arch=arch, variants=("full", variant), ops=False, overhead_tokens=(), log=lambda m: None)


@pytest.mark.parametrize("variant,why", [("tofu+ff@0.5", "chooses sub-modules of U-Net blocks")])
def test_variants_whose_patch_refuses_the_transformer_are_refused_before_building(nothing_built, variant, why):
    start = re.escape(f"variant {variant} cannot run on --arch sd3-medium (a SD3Transformer2DModel): ")
    with pytest.raises(EvaluationError, match=f"{start}.*{why}.* Variants that run on it: full, tofu, "):
        run_bench(arch="sd3-medium", variants=("full", variant), ops=False, overhead_tokens=(), log=lambda m: None)


def test_sizes_and_weights_that_do_not_fit_are_refused_before_building(nothing_built, monkeypatch):
    with pytest.raises(ValueError, match="--arch flux-dev-slice at 1000 px: Flux packs 2 x 2 latent pixels"):
        run_bench(arch="flux-dev-slice", latents=(125,), variants=("full",), ops=False, overhead_tokens=())
    with pytest.raises(ValueError, match=r"covers 192 x 192 patches \(3072 px\)"):
        run_bench(arch="sd3-medium", latents=(400,), variants=("full",), ops=False, overhead_tokens=())
    import evaluation.bench.archs as bench_archs

    monkeypatch.setattr(bench_archs.os, "sysconf", lambda name: 2**15 if name == "SC_PHYS_PAGES" else 4096)  # 128 MiB
    with pytest.raises(EvaluationError, match=r"--arch flux-dev has 11.9B parameters, 44.3 GiB of float32 weights: "
                                              r"more than the 0.1 GiB of memory on this machine. Use a slice of it \(--arch flux-dev-slice\)"):  # fmt: skip
        check_fits("flux-dev", torch.device("cpu"), torch.float32)
    check_fits("tiny-flux-random", torch.device("cpu"), torch.float32)


# --- the real-size configs, on the meta device ------------------------------------------------------------------


def test_real_configs_are_sd3_mediums_and_flux_devs():
    """The values of the models' published transformer configs, and their published sizes (2.0B, 11.9B)."""
    assert SD3_MEDIUM == {
        "sample_size": 128, "patch_size": 2, "in_channels": 16, "out_channels": 16, "num_layers": 24,
        "attention_head_dim": 64, "num_attention_heads": 24, "joint_attention_dim": 4096,
        "caption_projection_dim": 1536, "pooled_projection_dim": 2048, "pos_embed_max_size": 192,
    }  # fmt: skip
    assert FLUX_DEV == {
        "patch_size": 1, "in_channels": 64, "num_layers": 19, "num_single_layers": 38, "attention_head_dim": 128,
        "num_attention_heads": 24, "joint_attention_dim": 4096, "pooled_projection_dim": 768, "guidance_embeds": True,
        "axes_dims_rope": (16, 56, 56),
    }  # fmt: skip
    assert DIT_ARCHS["sd3-medium"].num_params() == 2_028_328_000
    assert DIT_ARCHS["flux-dev"].num_params() == 11_901_408_320
    sd3 = DIT_ARCHS["sd3-medium"].build(device="meta")
    assert all(p.device.type == "meta" for p in sd3.parameters()) and sd3.config.caption_projection_dim == 1536
    assert sd3.pos_embed.pos_embed_max_size == 192 and len(sd3.transformer_blocks) == 24
    flux = DIT_ARCHS["flux-dev"].build(device="meta")
    assert flux.inner_dim == 3072 and flux.time_text_embed.guidance_embedder is not None
    assert (DIT_ARCHS["sd3-medium"].batch, DIT_ARCHS["flux-dev"].batch) == (2, 1)


def test_slices_are_the_real_configs_with_fewer_blocks():
    for whole, layers in (("sd3-medium", {"num_layers": 2}), ("flux-dev", {"num_layers": 1, "num_single_layers": 1})):
        arch, real = DIT_ARCHS[f"{whole}-slice"], DIT_ARCHS[whole]
        assert arch.config == {**real.config, **layers} and arch.model is real.model
        assert (arch.batch, arch.text_tokens) == (real.batch, real.text_tokens)
    # As in the whole SD3, the slice's last block's text stream stops before the feed-forward.
    blocks = DIT_ARCHS["sd3-medium-slice"].build(device="meta").transformer_blocks
    assert [b.context_pre_only for b in blocks] == [False, True]
    # The slices get the letters the whole models give every block: M.
    for name, expected in (("sd3-medium-slice", "MM"), ("flux-dev-slice", "MM"), ("flux-dev", "M" * 57)):
        model = DIT_ARCHS[name].build(device="meta")
        tofu_sd.apply(model)
        assert "".join(b.letter for b in tofu_sd.patched_blocks(model)) == expected
        tofu_sd.remove(model)


@pytest.mark.parametrize("name,text,per_block", [("sd3-medium", 333, "attn.to_q"), ("flux-dev", 512, "attn.to_q")])
def test_the_oracle_on_the_whole_real_models_at_1024_px(name, text, per_block):
    """A meta-device step of the whole model at 1024 px (nothing computed): every block's attention sees half of
    the 4096 image tokens, and the model's output has the latent's shape."""
    arch = DIT_ARCHS[name]
    model = arch.build(device="meta")
    inputs = step_inputs(model, arch.batch, 128, text_tokens=arch.text_tokens, device="meta")
    blocks = [*model.transformer_blocks, *getattr(model, "single_transformer_blocks", [])]
    modules = {i: block.get_submodule(per_block) for i, block in enumerate(blocks)}
    with method_applied(model, "oracle", TokenFusionConfig()), recording(modules) as seen, torch.no_grad():
        out = model(**inputs, return_dict=False)[0]
    assert out.shape == inputs["hidden_states"].shape
    joint = len(model.transformer_blocks)  # Flux's single-stream blocks see [text, image]
    counts = [args[0].shape[1] for i in range(len(blocks)) for args, _ in seen[i]]
    assert counts == [2048] * joint + [text + 2048] * (len(blocks) - joint)


@pytest.mark.parametrize("arch", ["qwen-image-slice", "wan-slice-17f"])
def test_oracle_is_checked_before_timing_on_qwen_image_and_wan(arch):
    """On Qwen-Image's separate image and text tables the slice once crashed mid-bench (2026-12-07); its oracle and
    Wan's (:mod:`evaluation.methods.oracle_dit_families`) are now checked on the meta model and in the defaults.
    The families still refused (FLUX.2, Chroma, Z-Image) have no bench arch: tests/test_oracle_dit_families.py."""
    assert transformer_variants_checked(arch, ["full", "tofu", "oracle"], 0.5, bench_options(), None)[-1] == "oracle"
    assert "oracle" in transformer_variants_checked(arch, None, 0.5, bench_options(), None)
