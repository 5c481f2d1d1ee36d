"""The registry of methods: one entry per method, shared by `tofu-sd generate` and `tofu-sd bench`."""

import contextlib
import re

import pytest
import torch

import tofu_sd
from evaluation.bench import parse_variants, time_steps
from evaluation.errors import EvaluationError
from evaluation.methods import REGISTRY, method_applied, method_params, parse_methods
from evaluation.methods.base import Method, StepMix
from evaluation.methods.tofu import merged_params
from evaluation.tiny_random import tiny_unet, tiny_unet_inputs
from tofu_sd import TokenFusionConfig


def test_every_entry_has_its_parameters_and_a_normal_name():
    for name, method in REGISTRY.items():
        params = method_params(name, TokenFusionConfig())
        assert list(params)[0] == "method" and params["method"] == name and "keys_removed" in params
        if method.parameter.sweeps:
            assert parse_methods(f"{name}@.50") == [f"{name}@0.5"]  # normal form (todo@0.5 is 1x2 pooling)
        if method.bench_refusal is not None:  # diffusers' step caches: generate only
            assert parse_methods(name) == [name]
            with pytest.raises(EvaluationError, match=f"variant {re.escape(name)} cannot be benched: "):
                parse_variants([name], 0.5)
        elif method.requires is None or method.requires.available():
            assert parse_variants([name], 0.5) == parse_methods(name) == [name]  # bench and generate: the same names


def test_the_bench_names_are_methods_of_generate_too(unet_sd15):
    """``tofu-P`` is tofu with schedule P (replacing the run's), ``tofu-local`` tofu with local matching, at the
    name's ratio; ``oracle`` sweeps like a ratio method."""
    run = TokenFusionConfig(ratio=0.5, schedule="MMMMM", seed=3)
    with method_applied(unet_sd15, "tofu-P@0.3", run):
        config = tofu_sd.get_state(unet_sd15).config
        assert (config.schedule, config.ratio, config.seed, config.matching) == ("P", 0.3, 3, "global")
    with method_applied(unet_sd15, "tofu-local", run):
        config = tofu_sd.get_state(unet_sd15).config
        assert (config.schedule, config.ratio, config.matching) == ("MMMMM", 0.5, "local")
    assert tofu_sd.get_state(unet_sd15) is None
    assert parse_methods("full,tofu-M,oracle", [0.3, 0.5]) == ["full", "tofu-M@0.3", "tofu-M@0.5", "oracle@0.3", "oracle@0.5"]
    assert method_params("oracle@0.75", run) == {"method": "oracle", "ratio": 0.75, "keys_removed": 0.75}
    with pytest.raises(EvaluationError, match="full takes no ratio"):
        parse_methods("full@0.5")


def test_the_oracle_in_a_pipeline_is_removed(tiny_pipe_factory):
    pipe = tiny_pipe_factory()
    call = lambda: pipe("a red circle", num_inference_steps=1, generator=torch.Generator().manual_seed(0), output_type="pt").images  # noqa: E731
    full = call()
    with method_applied(pipe, "oracle@0.75", TokenFusionConfig()):
        strided = call()
    assert not torch.equal(strided, full) and torch.equal(call(), full)
    assert not any(hasattr(m, "_diffusers_hook") or "forward" in m.__dict__ for m in pipe.unet.modules())


def test_a_new_method_is_one_entry(monkeypatch):
    """An entry added to the registry is a method of generate and a variant of the bench, with its parameter, its
    patch and its step mix (timed per phase, weighted), with no other change."""
    calls = []

    @contextlib.contextmanager
    def patch(pipe, options, params):
        unet = pipe
        handle = unet.register_forward_pre_hook(lambda module, args: calls.append(params["ratio"]))
        try:
            yield
        finally:
            handle.remove()

    mix = StepMix(("first", "rest"), (0.25, 0.75), {"first_weight": 0.25}, lambda name, s: "two phases")
    monkeypatch.setitem(
        REGISTRY, "dummy", Method("dummy", "a test method", patch, merged_params, step_mix=lambda params, options: mix)
    )
    assert parse_methods("full,dummy", [0.3, 0.6]) == ["full", "dummy@0.3", "dummy@0.6"]
    assert method_params("dummy@0.3", TokenFusionConfig()) == {"method": "dummy", "ratio": 0.3, "keys_removed": 0.3}
    unet = tiny_unet("sd15")
    inputs = tiny_unet_inputs(unet, height=8, width=8)
    names = parse_variants(["dummy@0.25", "dummy"], 0.6)
    summaries, _ = time_steps(unet, inputs, names, 0.6, reps=2, warmup=0, device=torch.device("cpu"), compile_=False)
    # dummy@0.25: 1 peak-memory call, then 2 rounds of 2 phases; dummy (at the bench's --ratio) alike.
    assert calls == [0.25, 0.6] + [0.25, 0.25, 0.6, 0.6] * 2
    for stats in summaries.values():
        assert len(stats["first_s"]) == len(stats["rest_s"]) == 2 and stats["first_weight"] == 0.25
        for mean, first, rest in zip(stats["seconds"], stats["first_s"], stats["rest_s"]):
            assert mean == pytest.approx(0.25 * first + 0.75 * rest)


def test_each_entry_says_what_the_bench_and_the_report_make_of_it():
    """The entries' fields hold what the bench, the cost axis and the report once found from the names."""
    from evaluation.methods.caches import CACHE_NAMES

    for name, method in REGISTRY.items():
        assert ("rematch_every" in method.step_options) == ("tofu" in name), name
        assert ("max_downsample" in method.step_options) == (name not in ("full", "deepcache", *CACHE_NAMES)), name
        assert ("cache_interval" in method.takes) == name.startswith("deepcache+"), name
        assert ("steps" in method.takes) == name.startswith("magcache"), name  # MagCache's num_inference_steps
        assert ("guidance_scale" in method.takes) == name.startswith("fastercache"), name
        caches = name.partition("+")[0] in CACHE_NAMES
        assert (method.transformer_only is not None) == (method.bench_refusal is not None) == caches, name
        assert method.targeted == name.startswith("tofu"), name
        pairs = {"tofu": "reducer", "tofu-local": "reducer", "tome": "baseline", "oracle": "baseline"}
        assert method.bench_pairs == pairs.get(name), name
        assert method.bound == (name == "oracle"), name
        noted = ("todo", "catome", "fbcache", "taylorseer", "magcache", "pab", "fastercache")  # taylorseer's covers -lite
        assert (method.report_note is not None) == (name in noted), name
    with pytest.raises(ValueError, match="bench_pairs"):
        Method("bad", "a test method", None, merged_params, bench_pairs="other")


def test_a_new_entry_takes_its_part_in_the_bench_the_cost_and_the_report(monkeypatch):
    """The comparisons of the bench, the step options of the cost axis and the report's notes come from the entry."""
    from evaluation.bench.steps import reducer_keys, step_ratios
    from evaluation.bench.targets import dit_targets
    from evaluation.evaluate import _step_options
    from evaluation.report import _notes

    entry = Method("dummy", "a test method", None, merged_params, step_options=("rematch_every",),
                   bench_pairs="reducer", targeted=True, report_note="`dummy`: a test method.")  # fmt: skip
    monkeypatch.setitem(REGISTRY, "dummy", entry)
    results = {v: {"seconds": [1.0, 2.0], "peak_mem_gb": 1.0} for v in ("full", "dummy", "tome", "oracle")}
    assert reducer_keys(results, 0.5)[::3] == ["dummy/tome", "dummy/oracle"]
    assert set(step_ratios(results, 0.5)) >= {"dummy/full", "dummy/tome", "dummy/oracle memory"}
    assert dit_targets(results, 0.5)["dummy"]["time_ok"] is True
    manifest = {"config": {"reduction": {"max_downsample": 2, "rematch_every": 3}}, "methods": {}}
    assert _step_options(manifest, ["dummy@0.5"]) == {"dummy@0.5": {"rematch_every": 3}}
    note = _notes({"reduction": {}}, {"dummy@0.5": {}})[-1]
    assert note.startswith("`todo`: ToDo") and note.endswith(" `dummy`: a test method.")


@pytest.mark.parametrize(
    "name,modules,reduce",
    [("tofu+ff", ("attn1", "ff"), "tokens"), ("tofu+attn2", ("attn1", "attn2"), "tokens"),
     ("tofu+attn2+ff", ("attn1", "attn2", "ff"), "tokens"), ("tofu-kv+ff", ("attn1", "ff"), "kv")],
)  # fmt: skip
def test_the_module_variants_apply_and_record_their_modules(unet_sd15, name, modules, reduce):
    """``tofu+ff`` and the like: tofu_sd.apply with those modules (whatever the run's), recorded in the parameters
    as the manifest's JSON reads them back (a list); ``keys_removed`` is the ratio, with ``reduce="kv"`` too."""
    run = TokenFusionConfig(ratio=0.5, schedule="M", seed=2)
    assert method_params(f"{name}@0.3", run) == {"method": name, "ratio": 0.3, "keys_removed": 0.3, "modules": list(modules)}
    with method_applied(unet_sd15, f"{name}@0.3", run):
        config = tofu_sd.get_state(unet_sd15).config
        assert (config.modules, config.reduce, config.ratio, config.schedule, config.seed) == (modules, reduce, 0.3, "M", 2)
    assert tofu_sd.get_state(unet_sd15) is None
    assert method_params("tofu", run) == {"method": "tofu", "ratio": 0.5, "keys_removed": 0.5}  # as before


@pytest.mark.parametrize("name,flags", [("tome", {}), ("tome+mlp", {"merge_mlp": True}),
                                        ("tome+ca+mlp", {"merge_crossattn": True, "merge_mlp": True})])  # fmt: skip
@pytest.mark.parametrize("use_rand", [False, True])
def test_the_tome_variants_equal_tomesds_own_flags(unet_sd15, name, flags, use_rand):
    """Independent expectation: tomesd.apply_patch with merge_mlp (and merge_crossattn) on the same U-Net, the same
    global RNG state (tomesd draws its random partition from it)."""
    tomesd = pytest.importorskip("tomesd")
    inputs = tiny_unet_inputs(unet_sd15, height=8, width=8)
    sample = inputs.pop("sample")  # tomesd reads the size from the first positional argument

    def call():
        torch.manual_seed(0)
        return unet_sd15(sample, **inputs).sample

    with torch.no_grad():
        tomesd.apply_patch(unet_sd15, ratio=0.5, use_rand=use_rand, **flags)
        theirs = call()
        tomesd.remove_patch(unet_sd15)
        with method_applied(unet_sd15, f"{name}@0.5", TokenFusionConfig(use_rand=use_rand)):
            args = unet_sd15._tome_info["args"]
            assert (args["merge_attn"], args["merge_crossattn"], args["merge_mlp"]) == (
                True, flags.get("merge_crossattn", False), flags.get("merge_mlp", False))  # fmt: skip
            ours = call()
        tomesd.apply_patch(unet_sd15, ratio=0.5, use_rand=use_rand)
        plain = call()
        tomesd.remove_patch(unet_sd15)
    assert torch.equal(ours, theirs)
    assert torch.equal(ours, plain) == (name == "tome")  # the flags change the output


def test_a_run_refuses_other_modules_for_a_name(tmp_path, capsys):
    """A run whose tofu+ff images were made with other modules (its manifest says so) is not extended."""
    import json

    from evaluation.cli import main

    out = tmp_path / "run"
    base = ["generate", "--model", "tiny-random", "--methods", "full,tofu+ff", "--classes", "0", "--per-class", "1",
            "--steps", "1", "--no-warmup", "--quiet", "--out", str(out)]  # fmt: skip
    assert main(base) == 0
    path = out / "manifest.json"
    manifest = json.loads(path.read_text())
    assert manifest["methods"]["tofu+ff"]["params"]["modules"] == ["attn1", "ff"]
    assert main([*base, "--per-class", "2"]) == 0  # the same modules: extended
    manifest = json.loads(path.read_text())
    manifest["methods"]["tofu+ff"]["params"]["modules"] = ["attn1"]
    path.write_text(json.dumps(manifest))
    capsys.readouterr()
    assert main([*base, "--per-class", "3"]) == 2
    err = capsys.readouterr().err
    assert "tofu+ff was generated with" in err and "'modules': ['attn1']}" in err and "'modules': ['attn1', 'ff']" in err
