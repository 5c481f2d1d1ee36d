"""diffusers' step caches as methods of ``tofu-sd generate`` (``fbcache@T``, ``taylorseer@N``, ``taylorseer-lite@N``,
``magcache@T``, ``pab@N``, ``fastercache@N``, the stacks ``<cache>+<variant>`` and ``<cache>@<value>+<variant>``), on the built-in SD3-style diffusion transformer
(``--model tiny-sd3``, a random-weight copy: ``tests/test_tiny_sd3_runs.py``): each skips something (other images
than the full model's, fewer blocks or attentions run), the block counts in the manifest, the stack in either
order, the pipeline left exactly as before, and the refusals (U-Nets, bad values, the bench) before anything is
made."""

import contextlib
import re

import pytest
import torch
from PIL import Image

import tofu_sd
from evaluation.bench import parse_variants
from evaluation.block_calls import counting
from evaluation.cli import main
from evaluation.errors import EvaluationError
from evaluation.generate import GenerateConfig, generate
from evaluation.methods import REGISTRY, method_applied, method_of, method_params, parse_methods
from evaluation.methods.base import MethodOptions
from evaluation.methods.caches import CACHE_NAMES, CACHES, stacked_patch
from evaluation.methods.magcache_calibration import Calibration, calibrating
from evaluation.methods.tofu import tofu_patch
from evaluation.models import check_methods
from tests.test_tiny_sd3_runs import TINY_TRANSFORMER, tiny_sd3, tiny_sd3_folder, tiny_sd3_pipeline  # noqa: F401
from tofu_sd import TokenFusionConfig

pytestmark = pytest.mark.usefixtures("one_thread")

STEPS = 6  #: enough for every cache to skip: TaylorSeer computes the first 3 steps, MagCache the first 20%
GUIDANCE = 5.0  #: tiny-sd3's own: classifier-free guidance, batched (two rows per image)
#: Each cache at a value that skips something within 6 steps of the random model.
CACHE_METHODS = ["fbcache@0.5", "taylorseer@2", "taylorseer-lite@2", "magcache@1", "pab@2", "fastercache", "fastercache@3"]
SKIPS_BLOCKS = ("fbcache", "taylorseer-lite", "magcache")  #: the others skip attentions (and batch rows)
STACK = "taylorseer-lite+tofu@0.5"  #: a stack whose cache skips blocks at its default value (cache interval 5)
HOOK_TABLES = ("_forward_pre_hooks", "_forward_hooks", "_forward_pre_hooks_with_kwargs", "_forward_hooks_with_kwargs",
               "_forward_hooks_always_called")  # fmt: skip


def fingerprint(model):
    """What a patch could leave on a model: each module's instance attributes and torch hooks."""
    return {
        name: (sorted(vars(m)), {table: list(getattr(m, table)) for table in HOOK_TABLES})
        for name, m in model.named_modules()
    }


def _pixels(path):
    with Image.open(path) as image:
        return torch.tensor(list(image.getdata()))


@pytest.fixture(scope="module")
def run(tiny_sd3_folder, tmp_path_factory):  # noqa: F811 - a fixture
    """One run of every cache, one stack, the full model and tofu on tiny-sd3 (2 images, 6 steps), with the
    pipeline's fingerprint before and after."""
    import evaluation.generate as generate_module

    monkeypatch = pytest.MonkeyPatch()
    monkeypatch.setenv("TOFU_SD_TINY_SD3_DIR", str(tiny_sd3_folder))
    seen = {}
    real = generate_module.load_pipeline

    def load(*args, **kwargs):
        seen["pipe"] = real(*args, **kwargs)
        seen["before"] = fingerprint(seen["pipe"].transformer)
        return seen["pipe"]

    monkeypatch.setattr(generate_module, "load_pipeline", load)
    out = tmp_path_factory.mktemp("caches") / "run"
    methods = ["full", "tofu@0.5", "tofu-kv@0.75", *CACHE_METHODS, "taylorseer-lite@5", STACK]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        config = GenerateConfig(model="tiny-sd3", out=str(out), methods=methods, classes=[0, 1], per_class=1,
                                steps=STEPS, batch_size=2, device="cpu", warmup=False)  # fmt: skip
        manifest = generate(config, progress=False)
    finally:
        torch.set_num_threads(threads)
        monkeypatch.undo()
    return out, manifest, seen


def test_each_cache_skips_something_and_the_manifest_counts_the_blocks(run):
    out, manifest, _ = run
    stats = manifest["methods"]
    full = stats["full"]
    # full: every block at every step, two rows (conditional, unconditional) per image; SD3's first block
    # (dual attention, TINY_TRANSFORMER) has two attentions, the others one.
    blocks, attentions = TINY_TRANSFORMER["num_layers"], TINY_TRANSFORMER["num_layers"] + 1
    assert full["block_calls_per_image"] == STEPS * blocks * 2 and full["attention_calls_per_image"] == STEPS * attentions * 2
    assert full["images_counted"] == 2 and full["block_calls"] == 2 * full["block_calls_per_image"]
    assert stats["tofu@0.5"]["block_calls_per_image"] == full["block_calls_per_image"]  # tofu skips no block
    for key in ("block_calls_per_image", "attention_calls_per_image"):  # nor does kv, which runs its attention itself
        assert stats["tofu-kv@0.75"][key] == full[key], key
    pixels = {m: _pixels(out / m / "0000_0.png") for m in stats}
    for method in CACHE_METHODS:
        name = method.partition("@")[0]
        assert not torch.equal(pixels[method], pixels["full"]), method  # the cache skipped something
        counts = stats[method]
        assert counts["block_calls_per_image"] <= full["block_calls_per_image"], method
        assert counts["attention_calls_per_image"] < full["attention_calls_per_image"], method
        if name in SKIPS_BLOCKS:
            assert counts["block_calls_per_image"] < full["block_calls_per_image"], method
    assert stats["fastercache"]["block_calls_per_image"] < full["block_calls_per_image"]  # unconditional rows skipped
    assert stats["pab@2"]["params"] == {"method": "pab", "skip_range": 2, "keys_removed": None}
    assert stats["magcache@1"]["params"] == {"method": "magcache", "threshold": 1.0, "steps": STEPS, "keys_removed": None}
    assert stats["fastercache"]["params"] == {"method": "fastercache", "skip_range": 2, "guidance_scale": GUIDANCE, "keys_removed": None}
    assert stats["fastercache@3"]["params"]["skip_range"] == 3
    # below timestep 681 (4 of the 6 steps) the attentions run once every N steps: 2 skipped at N = 2, 3 at N = 3
    per_step = full["attention_calls_per_image"] / STEPS
    skipped = {m: full["attention_calls_per_image"] - stats[m]["attention_calls_per_image"] for m in ("fastercache", "fastercache@3")}
    assert skipped["fastercache@3"] - skipped["fastercache"] >= per_step / 2 - 1e-9, skipped


def test_the_stack_reduces_and_skips_as_much_as_its_cache(run):
    out, manifest, _ = run
    stats = manifest["methods"]
    assert stats[STACK]["params"] == {"method": "taylorseer-lite+tofu", "ratio": 0.5, "keys_removed": 0.5, "cache_interval": 5}
    assert stats[STACK]["block_calls_per_image"] <= stats["taylorseer-lite@5"]["block_calls_per_image"]
    assert stats["taylorseer-lite@5"]["block_calls_per_image"] < stats["full"]["block_calls_per_image"]
    pixels = {m: _pixels(out / m / "0000_0.png") for m in (STACK, "taylorseer-lite@5", "tofu@0.5")}
    assert not torch.equal(pixels[STACK], pixels["taylorseer-lite@5"]) and not torch.equal(pixels[STACK], pixels["tofu@0.5"])


def test_the_run_leaves_the_pipeline_exactly_as_before(run):
    _, _, seen = run
    assert fingerprint(seen["pipe"].transformer) == seen["before"]
    assert tofu_sd.get_state(seen["pipe"]) is None
    assert not any(hasattr(m, "_diffusers_hook") for m in seen["pipe"].transformer.modules())


# --- direct pipeline calls ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def pipe():
    return tiny_sd3_pipeline()


def _call(pipe, steps=STEPS):
    return pipe(
        ["a red circle", "a blue square"], num_inference_steps=steps, guidance_scale=GUIDANCE, height=64, width=64,
        max_sequence_length=16, generator=[torch.Generator().manual_seed(k) for k in (0, 1)], output_type="pt",
    ).images  # fmt: skip


MORE = MethodOptions(steps=STEPS, guidance_scale=GUIDANCE)


@pytest.mark.parametrize("method", [*CACHE_METHODS, STACK, "fbcache@0.5+tofu-kv@0.5"])
def test_a_cache_method_leaves_the_pipeline_exactly_as_before(pipe, method):
    """Applied, run twice (the second call starts afresh: the first call's state is reset, as a CacheMixin
    pipeline resets it) and removed: no hook, registry or attribute left, and the full model's outputs again."""
    before, full = fingerprint(pipe.transformer), _call(pipe)
    calibration = Calibration(lambda steps: _call(pipe, steps))
    with calibrating(calibration), method_applied(pipe, method, TokenFusionConfig(), MORE):
        first = _call(pipe)
        assert torch.equal(_call(pipe), first)
    assert not torch.equal(first, full)
    assert fingerprint(pipe.transformer) == before and torch.equal(_call(pipe), full)
    assert bool(calibration.ratios) == method.startswith("magcache")  # calibrated once, on the model alone


def test_magcache_calibrates_once_per_step_count_and_needs_a_calibration(pipe):
    calls = []
    calibration = Calibration(lambda steps: calls.append(steps) or _call(pipe, steps))
    with calibrating(calibration):
        for _ in range(2):
            with method_applied(pipe, "magcache@1", TokenFusionConfig(), MORE):
                _call(pipe)
    assert calls == [STEPS] and [len(r) for r in calibration.ratios.values()] == [STEPS]
    before = fingerprint(pipe.transformer)
    with method_applied(pipe, "magcache", TokenFusionConfig(), MORE):  # entered and left alone: fine (check_methods)
        pass
    with pytest.raises(EvaluationError, match="magcache on a SD3Transformer2DModel: diffusers has no calibrated mag_ratios"):
        with method_applied(pipe, "magcache", TokenFusionConfig(), MORE):
            _call(pipe)
    assert fingerprint(pipe.transformer) == before


@pytest.mark.parametrize("cache", ["taylorseer-lite", "pab"])
def test_the_stack_gives_the_same_images_in_either_order(pipe, cache):
    spec = next(c for c in CACHES if c.name == cache)
    params = method_params(f"{cache}+tofu@0.5", TokenFusionConfig(), MORE)
    outputs = []
    for tofu_first in (False, True):
        with stacked_patch(spec, tofu_patch(), tofu_first)(pipe, TokenFusionConfig(), params):
            outputs.append(_call(pipe))
    with method_applied(pipe, f"{cache}+tofu@0.5", TokenFusionConfig(), MORE):  # the registry's: cache first
        outputs.append(_call(pipe))
    with method_applied(pipe, "tofu@0.5", TokenFusionConfig(), MORE):
        tofu = _call(pipe)
    assert torch.equal(outputs[0], outputs[1]) and torch.equal(outputs[0], outputs[2])
    assert not torch.equal(outputs[0], tofu)


@pytest.mark.parametrize("method", ["full", "tofu@0.5", "tofu-kv@0.75", "oracle@0.5", "fbcache@0.5", "pab@2", "taylorseer-lite@2+tofu-kv@0.75"])
def test_counting_changes_no_image(pipe, method):
    with method_applied(pipe, method, TokenFusionConfig(), MORE):
        plain = _call(pipe)
    with counting(pipe) as count, method_applied(pipe, method, TokenFusionConfig(), MORE):  # as generate does
        counted = _call(pipe)
    assert torch.equal(plain, counted) and count.blocks > 0 and count.attentions > 0
    assert not any(hasattr(m, "_diffusers_hook") for m in pipe.transformer.modules())


def test_counting_sees_the_attentions_that_kv_runs_itself_and_not_those_a_cache_skips(pipe):
    """``reduce="kv"`` computes the joint attention itself instead of calling the module's forward: the counter
    must sit above it (counting entered first) and still below a cache's hooks."""
    counts = {}
    for method in ("full", "tofu-kv@0.75", "pab@2", "pab@2+tofu-kv@0.75"):
        with counting(pipe) as count, method_applied(pipe, method, TokenFusionConfig(), MORE):
            _call(pipe)
        counts[method] = (count.blocks, count.attentions)
    blocks, attentions = TINY_TRANSFORMER["num_layers"], TINY_TRANSFORMER["num_layers"] + 1
    assert counts["full"] == (STEPS * blocks * 2 * 2, STEPS * attentions * 2 * 2)  # 2 prompts x 2 CFG rows
    assert counts["tofu-kv@0.75"] == counts["full"]  # kv skips no attention
    assert counts["pab@2"][1] < counts["full"][1] and counts["pab@2+tofu-kv@0.75"] == counts["pab@2"]
    with method_applied(pipe, "tofu-kv@0.75", TokenFusionConfig(), MORE), counting(pipe) as late:
        _call(pipe)
    assert late.attentions == 0  # entered after Token Fusion the counter misses every kv attention: why the order


# --- refusals -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("method", ["fbcache", "pab@3", "fastercache", "magcache+tofu@0.5"])
def test_caches_are_refused_on_unets_before_anything_is_written(tmp_path, capsys, method):
    out = tmp_path / "run"
    with pytest.raises(EvaluationError, match=re.escape(f"--model tiny is a U-Net, and {method} runs on diffusion transformers only (diffusers' step caches hook")):
        GenerateConfig(model="tiny", out=str(out), methods=["full", method])
    args = ["generate", "--model", "tiny-random", "--out", str(out), "--methods", f"full,{method}", "--classes", "0",
            "--steps", "1", "--device", "cpu", "--quiet"]  # fmt: skip
    assert main(args) == 2
    err = capsys.readouterr().err
    assert f"--model tiny-random is a U-Net, and {method} runs on diffusion transformers only" in err and "On U-Nets give full, tome, tofu" in err
    assert not out.exists()


def test_a_loaded_unet_pipeline_refuses_the_caches_too(tiny_pipe_factory):
    """A hub model is known to be a U-Net once loaded: check_methods refuses there, before any image."""
    with pytest.raises(EvaluationError, match=r"--model some/unet is a U-Net, and fbcache\+tofu runs on diffusion transformers only"):
        check_methods(tiny_pipe_factory(), "some/unet", ["full", "fbcache+tofu"], TokenFusionConfig())


@pytest.mark.parametrize(("name", "said"), [
    ("pab@0", "bad method name 'pab@0': at 0 it would compute at every step and cache nothing (its spatial attention skip range"),
    ("pab@1", "at 1 it would compute at every step"),
    ("fbcache@-1", "bad method name 'fbcache@-1': a threshold must be a number > 0 (at -1 it never skips anything); write fbcache@<threshold>"),
    ("magcache@0", "a threshold must be a number > 0"),
    ("fbcache@nan", "a threshold must be a number > 0"),
    ("taylorseer@x", "bad method name 'taylorseer@x': taylorseer's value after '@' is its cache interval (the attentions are computed once every N steps), not a ratio; write taylorseer@<N>, an integer >= 2, e.g. taylorseer@5"),
    ("taylorseer-lite@2.5", "write taylorseer-lite@<N>, an integer >= 2"),
    ("magcache@x", "magcache's value after '@' is its threshold"),
    ("fastercache@1", "bad method name 'fastercache@1': at 1 it would compute at every step and cache nothing (its spatial attention skip range"),
    ("fastercache@0.5", "fastercache's value after '@' is its spatial attention skip range"),
    ("fbcache+tofu@2", "the ratio after '@' must lie in (0, 1)"),
    # a stack's cache value: the cache's own message, naming the whole name
    ("fbcache@-1+tofu-kv@0.75", "bad method name 'fbcache@-1+tofu-kv@0.75': a threshold must be a number > 0 (at -1 it never skips anything); write fbcache@<threshold>"),
    ("pab@1+tofu@0.5", "bad method name 'pab@1+tofu@0.5': at 1 it would compute at every step and cache nothing"),
    ("taylorseer-lite@2.5+tofu-M@0.5", "bad method name 'taylorseer-lite@2.5+tofu-M@0.5': taylorseer-lite's value after '@' is its cache interval"),
    ("magcache@x+tofu-kv-local@0.5", "bad method name 'magcache@x+tofu-kv-local@0.5': magcache's value after '@' is its threshold"),
    ("fastercache@1+tofu@0.5", "bad method name 'fastercache@1+tofu@0.5': at 1 it would compute at every step"),
    ("fbcache@0.2+tofu-kv@1.5", "bad method name 'fbcache@0.2+tofu-kv@1.5': the ratio after '@' must lie in (0, 1)"),
    ("fbcache@0.2+tofu-P@0.5", "unknown method(s) fbcache@0.2+tofu-P@0.5; choose from"),
])  # fmt: skip
def test_bad_values_are_refused_clearly(tmp_path, name, said):
    with pytest.raises(EvaluationError, match=re.escape(said)):
        parse_methods(f"full,{name}")
    with pytest.raises(EvaluationError, match=re.escape(said)):
        GenerateConfig(model="tiny-sd3-missing", out=str(tmp_path / "run"), methods=["full", name])
    assert not (tmp_path / "run").exists()


def test_names_values_and_sweeps():
    assert parse_methods("full,fbcache,fbcache@.10,taylorseer@3,pab,magcache@0.1,fastercache") == [
        "full", "fbcache", "fbcache@0.1", "taylorseer@3", "pab", "magcache@0.1", "fastercache"
    ]  # fmt: skip
    # --ratios sweeps the stacks (tofu's ratio), not the caches' own values
    assert parse_methods("fbcache,pab+tofu", [0.3, 0.5]) == ["fbcache", "pab+tofu@0.3", "pab+tofu@0.5"]
    assert method_params("fbcache", TokenFusionConfig()) == {"method": "fbcache", "threshold": 0.05, "keys_removed": None}
    assert method_params("taylorseer-lite", TokenFusionConfig()) == {"method": "taylorseer-lite", "cache_interval": 5, "keys_removed": None}
    assert method_params("fastercache@3", TokenFusionConfig(), MORE)["skip_range"] == 3
    assert method_params("magcache+tofu@0.3", TokenFusionConfig(), MORE) == {
        "method": "magcache+tofu", "ratio": 0.3, "keys_removed": 0.3, "threshold": 0.06, "steps": STEPS
    }  # fmt: skip
    for name in CACHE_NAMES:
        assert {name, *(f"{name}+{v}" for v in ("tofu", "tofu-M", "tofu-kv", "tofu-kv-local"))} <= set(REGISTRY)


def test_a_stack_gives_its_caches_value_after_the_caches_name():
    names = "full,fbcache@.20+tofu-kv@.75,taylorseer-lite@2+tofu@0.25,magcache@0.06+tofu-kv-local@0.5,pab@3+tofu-M@0.5,fbcache+tofu-kv@0.5"
    assert parse_methods(names) == [
        "full", "fbcache@0.2+tofu-kv@0.75", "taylorseer-lite@2+tofu@0.25", "magcache@0.06+tofu-kv-local@0.5",
        "pab@3+tofu-M@0.5", "fbcache+tofu-kv@0.5",
    ]  # fmt: skip
    options = TokenFusionConfig()
    assert method_params("fbcache@0.2+tofu-kv@0.75", options) == {"method": "fbcache+tofu-kv", "ratio": 0.75, "keys_removed": 0.75, "threshold": 0.2}
    assert method_params("fbcache+tofu-kv@0.75", options)["threshold"] == 0.05  # unsuffixed: the cache's default
    assert method_params("taylorseer-lite@2+tofu@0.25", options) == {"method": "taylorseer-lite+tofu", "ratio": 0.25, "keys_removed": 0.25, "cache_interval": 2}
    assert method_params("pab@3+tofu-M@0.5", options)["skip_range"] == 3
    assert method_params("magcache@0.1+tofu-kv-local@0.5", options, MORE) == {
        "method": "magcache+tofu-kv-local", "ratio": 0.5, "keys_removed": 0.5, "threshold": 0.1, "steps": STEPS
    }  # fmt: skip
    assert method_of("magcache@0.1+tofu-kv-local@0.5") == "magcache+tofu-kv-local" and method_of("pab@3") == "pab"
    # one run holds the stack at several values (each its own name); --ratios sweeps the variant's ratio only
    assert parse_methods("full,fbcache@0.2+tofu@0.5,fbcache@0.3+tofu@0.5") == ["full", "fbcache@0.2+tofu@0.5", "fbcache@0.3+tofu@0.5"]
    assert parse_methods("fbcache@0.2+tofu-kv", [0.5, 0.75]) == ["fbcache@0.2+tofu-kv@0.5", "fbcache@0.2+tofu-kv@0.75"]
    with pytest.raises(EvaluationError, match="lists a method twice"):
        parse_methods("fbcache@0.2+tofu@0.5,fbcache@.2+tofu@.5")


@pytest.mark.parametrize(("name", "value", "reduce", "matching", "letter"), [
    ("fbcache@0.3+tofu-kv@0.5", 0.3, "kv", "global", None), ("fbcache+tofu-kv@0.5", 0.05, "kv", "global", None),
    ("pab@4+tofu-M@0.5", 4, "tokens", "global", "M"), ("fastercache+tofu-kv-local@0.5", 2, "kv", "local", None),
    ("fastercache@4+tofu@0.5", 4, "tokens", "global", None),
])  # fmt: skip
def test_the_stack_applies_its_cache_at_the_names_value_and_its_variant(pipe, monkeypatch, name, value, reduce, matching, letter):
    """The stack's patch hands the cache the name's value (else its default) and applies the named variant."""
    from evaluation.methods import caches as caches_module

    seen = []
    monkeypatch.setattr(caches_module, "cache_applied", lambda pipe, cache, value, *rest: seen.append((cache.name, value)) or contextlib.nullcontext())
    with method_applied(pipe, name, TokenFusionConfig(), MORE):
        config = tofu_sd.get_state(pipe).config
        letters = {block.letter for block in tofu_sd.patched_blocks(pipe)}
    assert seen == [(method_of(name).partition("+")[0], value)]
    assert (config.ratio, config.reduce, config.matching) == (0.5, reduce, matching)
    assert letter is None or letters == {letter}
    assert tofu_sd.get_state(pipe) is None


@pytest.mark.parametrize("variant", ["fbcache", "pab@2", "fastercache", "magcache+tofu@0.5"])
def test_the_bench_refuses_the_caches(variant):
    with pytest.raises(EvaluationError, match=re.escape(f"variant {variant} cannot be benched: a step cache skips work across the steps")):
        parse_variants(["full", variant], 0.5)
