"""The registry of methods: one entry per method, shared by `tofu-sd generate` and `tofu-sd bench`."""

import contextlib

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
        if method.requires is None or method.requires.available():
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
