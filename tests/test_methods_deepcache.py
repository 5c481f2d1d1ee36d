"""DeepCache as a compared method (``deepcache@N``) and around Token Fusion (``deepcache+tofu``, ...): its names,
its patch (equal to DeepCache's helper used directly, the model left exactly as before), the steps at which the
deep blocks run, the bench's step mix, and the interval a run records."""

import json

import pytest
import torch

import tofu_sd
from evaluation.bench import parse_variants, time_steps
from evaluation.cli import main
from evaluation.errors import EvaluationError
from evaluation.methods import MethodOptions, method_applied, method_params, parse_methods
from evaluation.tiny_random import tiny_pipeline, tiny_unet, tiny_unet_inputs
from tofu_sd import TokenFusionConfig

DeepCacheSDHelper = pytest.importorskip("DeepCache").DeepCacheSDHelper

STEPS = 6
NEW = ["tofu+ff", "tofu+attn2", "tofu+attn2+ff", "tofu-kv+ff", "tome+mlp", "tome+ca+mlp", "deepcache@3", "deepcache", "deepcache+tofu-kv-local",
       "deepcache+tofu", "deepcache+tofu-kv", "deepcache+tofu+ff"]  # fmt: skip


def latents(pipe):
    """The final latents of a 6-step call of the tiny pipeline (classifier-free guidance: one batch of 2 per step)."""
    with torch.no_grad():
        return pipe(
            "a red circle", num_inference_steps=STEPS, height=32, width=32, generator=torch.Generator().manual_seed(0),
            output_type="latent",
        ).images  # fmt: skip


def structure(unet):
    """What a patch could leave behind: each module's class, attributes, instance ``forward`` and torch hooks."""
    return {
        name: (type(m), set(m.__dict__), m.__dict__.get("forward"), dict(m._forward_pre_hooks),
               dict(m._forward_pre_hooks_with_kwargs), dict(m._forward_hooks))
        for name, m in unet.named_modules()
    }  # fmt: skip


class Calls:
    """Counts the calls of some modules (torch pre-hooks on modules inside those DeepCache wraps: a cached
    module's own forward, hence its hooks, does not run), and the U-Net's timestep of each."""

    def __init__(self, unet, **modules):
        self.counts = {name: 0 for name in modules}
        self.timesteps, self.deep = [], []
        self.handles = [m.register_forward_pre_hook(lambda _, args, name=name: self.hit(name)) for name, m in modules.items()]
        self.handles.append(unet.register_forward_pre_hook(self.call, with_kwargs=True))

    def call(self, module, args, kwargs):
        timestep = kwargs["timestep"] if "timestep" in kwargs else args[1]
        self.timesteps.append(int(timestep))
        self.deep.append(False)

    def hit(self, name):
        self.counts[name] += 1
        if name == "deep":
            self.deep[-1] = True

    def remove(self):
        for handle in self.handles:
            handle.remove()


def test_names_and_their_errors_say_what_to_write():
    assert parse_methods("full,deepcache@03,deepcache") == ["full", "deepcache@3", "deepcache"]
    # --ratios sweeps the ToFu ratio of the combinations, not DeepCache's interval
    assert parse_methods("deepcache,deepcache+tofu", [0.3, 0.5]) == ["deepcache", "deepcache+tofu@0.3", "deepcache+tofu@0.5"]
    write = r"write deepcache@<interval>, an integer >= 2, e.g. deepcache@3"
    for bad, why in [("deepcache@1", "a cache interval of 1 caches nothing"), ("deepcache@0.5", "not a ratio"),
                     ("deepcache@x", "not a ratio"), ("deepcache@3.0", "not a ratio")]:  # fmt: skip
        with pytest.raises(EvaluationError, match=rf"bad method name '{bad}': .*{why}.*{write}"):
            parse_methods(f"full,{bad}")
        with pytest.raises(EvaluationError, match=write):
            parse_variants([bad], 0.5)
    with pytest.raises(EvaluationError, match="--cache-interval must be an integer >= 2 .* got 1"):
        MethodOptions(cache_interval=1)


def test_params_record_the_interval():
    run = TokenFusionConfig(ratio=0.4)
    assert method_params("deepcache", run) == {"method": "deepcache", "cache_interval": 3, "keys_removed": None}
    assert method_params("deepcache@5", run, MethodOptions(4))["cache_interval"] == 5  # the name's, not the run's
    assert method_params("deepcache+tofu", run, MethodOptions(4)) == {
        "method": "deepcache+tofu", "ratio": 0.4, "keys_removed": 0.4, "cache_interval": 4}  # fmt: skip
    assert method_params("deepcache+tofu+ff@0.5", run) == {
        "method": "deepcache+tofu+ff", "ratio": 0.5, "keys_removed": 0.5, "modules": ["attn1", "ff"], "cache_interval": 3}  # fmt: skip


def test_a_combined_name_may_give_its_own_interval():
    """``deepcache@N+<variant>``: the ``deepcache+<variant>`` entry at interval N, whatever the run's; its ratio
    sweeps, its normal form keeps the interval, and a bad interval or a variant that is no combination is refused."""
    assert parse_methods("deepcache@02+tofu-kv@.75,deepcache@4+tofu-kv-local") == [
        "deepcache@2+tofu-kv@0.75", "deepcache@4+tofu-kv-local"]  # fmt: skip
    assert parse_methods("deepcache@4+tofu-kv", [0.5, 0.75]) == ["deepcache@4+tofu-kv@0.5", "deepcache@4+tofu-kv@0.75"]
    run = TokenFusionConfig(ratio=0.4)
    params = method_params("deepcache@2+tofu-kv@0.75", run, MethodOptions(4))
    assert params["method"] == "deepcache+tofu-kv" and params["cache_interval"] == 2 and params["ratio"] == 0.75
    assert method_params("deepcache+tofu-kv@0.75", run, MethodOptions(4))["cache_interval"] == 4
    with pytest.raises(EvaluationError, match="a cache interval of 1 caches nothing"):
        parse_methods("deepcache@1+tofu")
    with pytest.raises(EvaluationError, match="unknown method"):
        parse_methods("deepcache@3+tome")  # deepcache+tome is no entry
    with pytest.raises(EvaluationError, match="unknown method"):
        parse_methods("deepcache@3+nothing")


@pytest.fixture(scope="module")
def full_latents():
    return latents(tiny_pipeline())


def test_deepcache_equals_the_helper_used_directly(full_latents):
    """Independent expectation: DeepCache's own helper on a fresh pipeline, as its README uses it."""
    pipe = tiny_pipeline()
    helper = DeepCacheSDHelper(pipe=pipe)
    helper.set_params(cache_interval=3, cache_branch_id=0)
    helper.enable()
    theirs = latents(pipe)
    helper.disable()
    pipe = tiny_pipeline()
    with method_applied(pipe, "deepcache@3", TokenFusionConfig()):
        ours = latents(pipe)
    assert torch.equal(torch.as_tensor(ours), torch.as_tensor(theirs))
    assert not torch.equal(torch.as_tensor(ours), torch.as_tensor(full_latents))  # it did cache
    assert torch.equal(torch.as_tensor(latents(pipe)), torch.as_tensor(full_latents))  # and is gone


@pytest.mark.parametrize("name,interval", [("deepcache@2", 2), ("deepcache@3", 3), ("deepcache+tofu", 4),
                                           ("deepcache@2+tofu-kv", 3)])  # the name's 2, not the run's 3
def test_the_deep_blocks_run_at_one_step_in_n(name, interval):
    """Of 6 steps, the deep blocks (the mid block's resnet) run at steps 0, N, 2N, ...; the shallow branch (the
    last resnet of the last up block) at every step."""
    pipe = tiny_pipeline()
    calls = Calls(pipe.unet, deep=pipe.unet.mid_block.resnets[0], shallow=pipe.unet.up_blocks[-1].resnets[-1])
    try:
        with method_applied(pipe, name, TokenFusionConfig(), MethodOptions(cache_interval=interval)):
            if "+" in name:
                assert tofu_sd.get_state(pipe) is not None
            latents(pipe)
    finally:
        calls.remove()
    interval = int(name[len("deepcache@")]) if name.startswith("deepcache@") else interval
    assert calls.counts == {"deep": len(range(0, STEPS, interval)), "shallow": STEPS}
    assert calls.deep == [step % interval == 0 for step in range(STEPS)]


def test_deepcache_is_enabled_around_tofu(monkeypatch):
    """ToFu is applied first and DeepCache enabled on the patched U-Net; DeepCache goes first, ToFu last."""
    from evaluation.methods import deepcache

    events = []
    unet = tiny_unet("sd15")
    real_applied = deepcache.deepcache_applied

    def applied(pipe, interval):
        events.append(("deepcache on", tofu_sd.get_state(pipe) is not None))
        with real_applied(pipe, interval) as helper:
            yield helper
        events.append(("deepcache off", tofu_sd.get_state(pipe) is not None))

    import contextlib

    monkeypatch.setattr(deepcache, "deepcache_applied", contextlib.contextmanager(applied))
    with method_applied(unet, "deepcache+tofu-kv@0.5", TokenFusionConfig()):
        assert tofu_sd.get_state(unet).config.reduce == "kv"
    assert events == [("deepcache on", True), ("deepcache off", True)] and tofu_sd.get_state(unet) is None


@pytest.mark.parametrize("name", NEW)
def test_every_new_method_leaves_the_unet_exactly_as_before(name):
    """Applied to a bare U-Net, called at two steps and removed, even when the block raises: the same structure
    (no instance ``forward``, hook or attribute left) and bitwise the same outputs; patched, the second step differs."""
    unet = tiny_unet("sd15")
    inputs = tiny_unet_inputs(unet, height=8, width=8)
    before = structure(unet)

    def two_steps():
        return [unet(inputs["sample"], torch.tensor(t), inputs["encoder_hidden_states"]).sample for t in (500, 480)]

    with torch.no_grad():
        reference = two_steps()
        with method_applied(unet, name, TokenFusionConfig()):
            patched = two_steps()
        assert structure(unet) == before
        assert all(torch.equal(a, b) for a, b in zip(two_steps(), reference))
        with pytest.raises(RuntimeError, match="inside"), method_applied(unet, name, TokenFusionConfig()):
            raise RuntimeError("inside")
        assert structure(unet) == before
        assert all(torch.equal(a, b) for a, b in zip(two_steps(), reference))
    assert not torch.equal(patched[1], reference[1])


@pytest.mark.parametrize("name", ["deepcache@3", "deepcache+tofu+ff"])
def test_a_pipeline_is_left_exactly_as_before(name, full_latents):
    pipe = tiny_pipeline()
    before = structure(pipe.unet)
    with method_applied(pipe, name, TokenFusionConfig()):
        patched = latents(pipe)
    assert structure(pipe.unet) == before
    assert torch.equal(torch.as_tensor(latents(pipe)), torch.as_tensor(full_latents))
    assert not torch.equal(torch.as_tensor(patched), torch.as_tensor(full_latents))


@pytest.mark.parametrize("interval", [2, 3])
def test_the_bench_times_an_uncached_and_a_cached_step(interval):
    """Per round, a fresh application's call at 500 (the deep blocks run) and at 480 (they do not), weighed 1/N
    and (N-1)/N; before the rounds, one peak-memory call (uncached)."""
    unet = tiny_unet("sd15")
    inputs = tiny_unet_inputs(unet, height=8, width=8)
    calls = Calls(unet, deep=unet.mid_block.resnets[0])
    try:
        summaries, _ = time_steps(unet, inputs, [f"deepcache@{interval}"], 0.5, reps=2, warmup=0,
                                  device=torch.device("cpu"), compile_=False)  # fmt: skip
    finally:
        calls.remove()
    assert calls.timesteps == [500] + [500, 480] * 2
    assert calls.deep == [True] + [True, False] * 2
    stats = summaries[f"deepcache@{interval}"]
    assert stats["cache_interval"] == interval and len(stats["uncached_s"]) == len(stats["cached_s"]) == 2
    for mean, uncached, cached in zip(stats["seconds"], stats["uncached_s"], stats["cached_s"]):
        assert mean == pytest.approx(uncached / interval + cached * (interval - 1) / interval)
    assert f"DeepCache interval {interval}: per-step mean of 1 uncached step" in stats["step_mix"]


def test_the_bench_times_deepcache_at_several_intervals_once():
    """deepcache@2 and deepcache@5 (and ToFu inside DeepCache at 2 and 4) run the same two calls, uncached then
    cached: one peak-memory call and one pair of calls per round for each, weighed per interval."""
    unet = tiny_unet("sd15")
    inputs = tiny_unet_inputs(unet, height=8, width=8)
    variants = ["deepcache@2", "deepcache@5", "deepcache@2+tofu", "deepcache@4+tofu", "deepcache@2+tofu-kv"]
    calls = Calls(unet, deep=unet.mid_block.resnets[0])
    try:
        summaries, _ = time_steps(unet, inputs, variants, 0.5, reps=2, warmup=0, device=torch.device("cpu"),
                                  compile_=False)  # fmt: skip
    finally:
        calls.remove()
    groups = 3  # deepcache, deepcache+tofu, deepcache+tofu-kv
    assert calls.timesteps == [500] * groups + [500, 480] * groups * 2
    for a, b, n in [("deepcache@2", "deepcache@5", 5), ("deepcache@2+tofu", "deepcache@4+tofu", 4)]:
        sa, sb = summaries[a], summaries[b]
        assert sa["uncached_s"] == sb["uncached_s"] and sa["cached_s"] == sb["cached_s"]
        assert sa["peak_mem_gb"] == sb["peak_mem_gb"] and sb["cache_interval"] == n
        for mean, uncached, cached in zip(sb["seconds"], sb["uncached_s"], sb["cached_s"]):
            assert mean == pytest.approx(uncached / n + cached * (n - 1) / n)
    assert summaries["deepcache@2+tofu-kv"]["uncached_s"] != summaries["deepcache@2+tofu"]["uncached_s"]


def test_the_bench_times_a_whole_period_with_rematch_every(matches):
    """deepcache+tofu with N = 3 and rematch_every = 2: six calls per round at falling timesteps. The deep blocks
    run at steps 0 and 3; ToFu's blocks match at step 0 (all), at the cached matching steps 2 and 4 (the one
    patched block of the shallow branch) and at step 3 (the deep ones, whose matchings step 2 dropped)."""
    from evaluation.bench.variants import bench_options

    unet = tiny_unet("sd15")
    inputs = tiny_unet_inputs(unet, height=8, width=8)
    blocks = len(tofu_sd.apply(unet, 0.5) and tofu_sd.patched_blocks(unet))
    tofu_sd.remove(unet)
    calls = Calls(unet, deep=unet.mid_block.resnets[0])
    try:
        summaries, _ = time_steps(unet, inputs, ["deepcache+tofu"], 0.5, reps=1, warmup=0, device=torch.device("cpu"),
                                  compile_=False, options=bench_options(2), more=MethodOptions(3))  # fmt: skip
    finally:
        calls.remove()
    assert calls.timesteps == [500] + [500, 480, 460, 440, 420, 400]
    assert calls.deep == [True] + [True, False, False, True, False, False]
    shallow = 1  # up_blocks.2.attentions.2, the tiny U-Net's last transformer
    assert len(matches) == blocks + (blocks + shallow + (blocks - shallow) + shallow)
    stats = summaries["deepcache+tofu"]
    assert (stats["cache_interval"], stats["rematch_every"], stats["period"]) == (3, 2, 6)
    phases = [key[:-2] for key in stats if key.startswith("step") and key[4].isdigit()]
    assert phases == ["step0_uncached+match", "step1_cached+reuse", "step2_cached+match", "step3_uncached+reuse",
                      "step4_cached+match", "step5_cached+reuse"]  # fmt: skip
    assert stats["seconds"][0] == pytest.approx(sum(stats[f"{p}_s"][0] for p in phases) / 6)
    with pytest.raises(EvaluationError, match=r"lcm\(3, 5\) = 15 steps .* --rematch-every 1"):
        parse_variants(["deepcache+tofu"], 0.5, bench_options(5), MethodOptions(3))


def test_bench_cli_takes_the_cache_interval(tmp_path):
    out = tmp_path / "bench.json"
    args = ["bench", "--smoke", "--variants", "full,deepcache@2,deepcache+tofu,deepcache@5+tofu", "--cache-interval", "4", "--no-ops",
            "--overhead-tokens", "", "--json", str(out)]  # fmt: skip
    assert main(args) == 0
    result = json.loads(out.read_text())
    variants = result["steps"]["128"]["variants"]
    assert result["cache_interval"] == 4
    assert variants["deepcache@2"]["cache_interval"] == 2 and variants["deepcache+tofu"]["cache_interval"] == 4
    assert variants["deepcache@5+tofu"]["cache_interval"] == 5  # the name's own interval weighs its phases
    stats = variants["deepcache@5+tofu"]
    for mean, uncached, cached in zip(stats["seconds"], stats["uncached_s"], stats["cached_s"]):
        assert mean == pytest.approx(uncached / 5 + cached * 4 / 5)


def test_a_run_refuses_another_cache_interval(tmp_path, capsys):
    out = tmp_path / "run"
    base = ["generate", "--model", "tiny-random", "--methods", "full,deepcache+tofu", "--classes", "0", "--per-class",
            "1", "--steps", "2", "--no-warmup", "--quiet", "--out", str(out)]  # fmt: skip
    assert main(base) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["methods"]["deepcache+tofu"]["params"]["cache_interval"] == 3
    assert main([*base, "--per-class", "2"]) == 0  # the same options: extended
    capsys.readouterr()
    assert main([*base, "--per-class", "2", "--cache-interval", "4"]) == 2
    err = capsys.readouterr().err
    assert "deepcache+tofu was generated with" in err and "'cache_interval': 3" in err and "'cache_interval': 4" in err
    assert main([*base, "--cache-interval", "1"]) == 2
    assert "--cache-interval must be an integer >= 2" in capsys.readouterr().err
