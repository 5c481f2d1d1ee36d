"""``--model tiny-sd3`` (the built-in SD3-style diffusion transformer) in ``tofu-sd generate`` and ``evaluate``: its
defaults (shapes prompts, 20 steps, guidance 5, 16 zero "T5" tokens), the methods that run on it, the U-Net-only
ones refused before anything is written, a ``--ratios`` sweep and its evaluation (prompt accuracy, classifier FD).

The runs use a random-weight model of the shipped one's make (its tokenizer and VAE, small text encoders and
MMDiT) saved as a diffusers folder, which ``$TOFU_SD_TINY_SD3_DIR`` points ``--model tiny-sd3`` at; the tests of
the shipped model itself skip until it is exported."""

import json
import re

import pytest
import torch
from PIL import Image

from evaluation import models
from evaluation.cli import _sampling_options, build_parser, main
from evaluation.errors import EvaluationError
from evaluation.generate import GenerateConfig, generate
from evaluation.sampling import SamplingOptions
from evaluation.shapes_sd3 import (
    CALL_KWARGS,
    DEFAULT_GUIDANCE,
    DEFAULT_STEPS,
    MODEL_DIR,
)

#: A small MMDiT of the shipped one's make: patch size 1 on the 16 x 16 latent (256 image tokens), SD3.5's RMS
#: q/k norm and a dual-attention first block, as ``evaluation.shapes_sd3.components.TRANSFORMER``.
TINY_TRANSFORMER = dict(
    sample_size=16, patch_size=1, in_channels=4, out_channels=4, num_layers=3, attention_head_dim=8,
    num_attention_heads=2, joint_attention_dim=64 + 16, caption_projection_dim=16, pooled_projection_dim=64 + 16,
    pos_embed_max_size=16, qk_norm="rms_norm", dual_attention_layers=(0,),
)  # fmt: skip
TINY_TEXT_2 = dict(hidden_size=16, intermediate_size=32, num_attention_heads=2, num_hidden_layers=2,
                   max_position_embeddings=16, projection_dim=16)  # fmt: skip
UNET_ONLY = ("tome", "tome+mlp", "todo", "catome", "deepcache", "deepcache@4", "deepcache+tofu")
DIT_METHODS = ["full", "tofu", "tofu-P", "tofu-A", "tofu-M", "tofu-local", "tofu-kv", "tofu-kv-local", "oracle"]


def tiny_sd3_pipeline(seed: int = 0, transformer: dict | None = None):
    """A random-weight ``StableDiffusion3Pipeline`` like the shipped model: its tokenizer and (trained) VAE, CLIP
    encoders (the first the shipped U-Net model's), no T5, a tiny MMDiT; 64 x 64 images, progress bar off."""
    from diffusers import FlowMatchEulerDiscreteScheduler, StableDiffusion3Pipeline

    from evaluation.shapes_sd3 import components as C

    tokenizer = C.load_tokenizer()
    te1, te2 = C.build_text_encoders(tokenizer, seed, TINY_TEXT_2)
    pipe = StableDiffusion3Pipeline(
        transformer=C.build_transformer(seed, transformer or TINY_TRANSFORMER).eval(),
        scheduler=FlowMatchEulerDiscreteScheduler(**C.SCHEDULER), vae=C.load_vae(), text_encoder=te1.eval(),
        tokenizer=tokenizer, text_encoder_2=te2.eval(), tokenizer_2=tokenizer, text_encoder_3=None, tokenizer_3=None,
    )  # fmt: skip
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="session")
def tiny_sd3_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny_sd3") / "model"
    tiny_sd3_pipeline().save_pretrained(folder, safe_serialization=True)
    return folder


@pytest.fixture
def tiny_sd3(tiny_sd3_folder, monkeypatch):
    """``--model tiny-sd3`` loads the random folder."""
    monkeypatch.setenv(models.TINY_SD3_DIR_ENV, str(tiny_sd3_folder))
    return tiny_sd3_folder


@pytest.fixture
def no_tiny_sd3(tmp_path, monkeypatch):
    """``--model tiny-sd3`` finds no model (as before the shipped one is exported)."""
    monkeypatch.setenv(models.TINY_SD3_DIR_ENV, str(tmp_path / "missing"))


pytestmark = pytest.mark.usefixtures("one_thread")  # the fixture is in conftest.py


def _images(folder):
    return sorted(p.name for p in folder.glob("*.png"))


# --- options --------------------------------------------------------------------------------------------------


def test_tiny_sd3_has_its_own_defaults_and_others_keep_theirs(tiny_sd3, tmp_path):
    own = SamplingOptions(model="tiny-sd3")
    assert (own.prompts, own.steps, own.guidance_scale) == ("shapes", DEFAULT_STEPS, DEFAULT_GUIDANCE) == ("shapes", 20, 5.0)
    assert GenerateConfig(model="tiny-sd3", out=str(tmp_path), methods=["full"]).steps == 20  # not generate's 50
    given = GenerateConfig(model="tiny-sd3", out=str(tmp_path), methods=["full"], steps=7, guidance_scale=2.0, prompts="imagenet")
    assert (given.steps, given.guidance_scale, given.prompts) == (7, 2.0, "imagenet")
    for model, prompts in (("tiny", "shapes"), ("tiny-random", "imagenet")):
        config = GenerateConfig(model=model, out=str(tmp_path), methods=["full"])
        assert (config.prompts, config.steps, config.guidance_scale) == (prompts, 50, 7.5)
    # The CLI leaves them to the model too.
    args = build_parser().parse_args(["generate", "--out", str(tmp_path), "--model", "tiny-sd3"])
    built = GenerateConfig(**_sampling_options(args), out=str(tmp_path), methods=["full"])
    assert (built.prompts, built.steps, built.guidance_scale, built.classes) == ("shapes", 20, 5.0, list(range(48)))
    assert models.call_kwargs("tiny-sd3") == CALL_KWARGS == {"max_sequence_length": 16}
    assert models.call_kwargs("tiny") == {} and models.model_defaults("tiny") == {}


def test_missing_model_fails_clearly_before_anything_is_written(no_tiny_sd3, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["generate", "--model", "tiny-sd3", "--out", str(out), "--methods", "full", "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "--model tiny-sd3: the built-in SD3-style model is not in" in err and "--model tiny" in err
    assert not out.exists()
    with pytest.raises(EvaluationError, match="not exported there yet|has not been exported"):
        models.load_pipeline("tiny-sd3", torch.device("cpu"), torch.float32)


@pytest.mark.parametrize("method", UNET_ONLY)
def test_unet_only_methods_are_refused_by_name(tiny_sd3, tmp_path, method):
    out = tmp_path / "run"
    with pytest.raises(EvaluationError, match=re.escape(f"--model tiny-sd3 is a diffusion transformer, and {method} runs on U-Nets only (")):
        GenerateConfig(model="tiny-sd3", out=str(out), methods=["full", method])
    assert not out.exists()


# --- runs -----------------------------------------------------------------------------------------------------


def _recording_loader(monkeypatch, seen: dict):
    """generate's load_pipeline, also recording the pipeline and the text tokens of each transformer call."""
    import evaluation.generate as generate_module

    real = generate_module.load_pipeline

    def load(*args, **kwargs):
        pipe = real(*args, **kwargs)
        seen["pipe"] = pipe
        hook = lambda module, args, kwargs: seen.setdefault("text_tokens", set()).add(kwargs["encoder_hidden_states"].shape[1])
        pipe.transformer.register_forward_pre_hook(hook, with_kwargs=True)
        return pipe

    monkeypatch.setattr(generate_module, "load_pipeline", load)


def test_generate_runs_every_tofu_method_on_the_transformer(tiny_sd3, tmp_path, monkeypatch):
    seen = {}
    _recording_loader(monkeypatch, seen)
    out = tmp_path / "run"
    config = GenerateConfig(model="tiny-sd3", out=str(out), methods=DIT_METHODS, classes=[0, 1], per_class=1, steps=2,
                            batch_size=2, device="cpu", warmup=False)  # fmt: skip
    manifest = generate(config, progress=False)
    assert manifest["config"]["model_class"] == "StableDiffusion3Pipeline"
    assert (manifest["config"]["height"], manifest["config"]["width"]) == (64, 64)  # sample size 16 x VAE factor 4
    assert manifest["config"]["guidance_scale"] == 5.0 and manifest["config"]["prompts"] == "shapes"
    assert seen["text_tokens"] == {16 + 16}  # 16 CLIP tokens and max_sequence_length=16 zero "T5" tokens
    pixels = {}
    for method in DIT_METHODS:
        assert _images(out / method) == ["0000_0.png", "0001_0.png"]
        with Image.open(out / method / "0000_0.png") as image:
            assert image.size == (64, 64)
            pixels[method] = torch.tensor(list(image.getdata()))
    for method in DIT_METHODS[1:]:  # each reduces: other pixels than the full model's
        assert not torch.equal(pixels[method], pixels["full"]), method
    assert manifest["methods"]["tofu-P"]["params"] == {"method": "tofu-P", "ratio": 0.5, "keys_removed": 0.5}
    import tofu_sd

    assert tofu_sd.get_state(seen["pipe"]) is None  # every method restored the model


@pytest.mark.parametrize(("method", "why"), [
    ("tofu+ff", "modules=.* chooses sub-modules of U-Net blocks"),
])  # fmt: skip
def test_tofu_variants_that_tofu_sd_refuses_stop_before_any_image(tiny_sd3, tmp_path, method, why):
    out = tmp_path / "run"
    config = GenerateConfig(model="tiny-sd3", out=str(out), methods=["full", method], classes=[0], steps=1, device="cpu")
    with pytest.raises(EvaluationError, match=re.escape(f"method {method} cannot run on --model tiny-sd3 (a SD3Transformer2DModel)") + f".*{why}"):
        generate(config, progress=False)
    assert not (out / "manifest.json").exists() and not (out / "full").exists()


def test_blocks_are_taken_on_the_transformer_and_refused_on_a_unet(tiny_sd3, tmp_path, capsys):
    out = tmp_path / "run"
    args = ["generate", "--model", "tiny-sd3", "--out", str(out), "--methods", "full,tofu", "--classes", "0",
            "--per-class", "1", "--steps", "1", "--device", "cpu", "--quiet", "--no-warmup"]  # fmt: skip
    assert main([*args, "--blocks", "1-2", "--schedule", "PM"]) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["config"]["reduction"]["blocks"] == "1-2" and manifest["config"]["reduction"]["schedule"] == "PM"
    assert main([*args, "--out", str(tmp_path / "bad"), "--blocks", "5"]) == 2  # 3 blocks: 0-2
    assert "names block(s) 5, but the model has 3 patchable blocks" in capsys.readouterr().err
    unet = ["generate", "--model", "tiny-random", "--out", str(tmp_path / "unet"), "--methods", "full,tofu",
            "--classes", "0", "--steps", "1", "--device", "cpu", "--quiet", "--blocks", "0"]  # fmt: skip
    assert main(unet) == 2
    assert "--blocks 0 chooses blocks of a diffusion transformer" in capsys.readouterr().err
    assert not (tmp_path / "unet" / "manifest.json").exists()


def test_pareto_sweep_and_evaluate(tiny_sd3, tmp_path, torch_home, capsys):
    out = tmp_path / "sweep"
    args = ["generate", "--model", "tiny-sd3", "--out", str(out), "--methods", "full,tofu", "--ratios", "0.3,0.5,0.7",
            "--classes", "0-1", "--per-class", "1", "--steps", "2", "--device", "cpu", "--quiet", "--no-warmup"]  # fmt: skip
    assert main(args) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert list(manifest["methods"]) == ["full", "tofu@0.3", "tofu@0.5", "tofu@0.7"]
    assert main(["evaluate", str(out), "--device", "cpu"]) == 0
    report = json.loads((out / "report.json").read_text())
    assert "prompt_accuracy" not in report.get("unavailable", {}) and "fd_classifier" not in report.get("unavailable", {})
    for method in ("tofu@0.3", "tofu@0.5", "tofu@0.7"):
        entry = report["methods"][method]
        assert 0 < entry["ms_ssim"] < 1 and 0 <= entry["prompt_accuracy"] <= 1 and entry["fd_classifier"] > 0
    assert report["methods"]["full"]["ms_ssim"] == 1.0 and report["methods"]["full"]["fd_classifier"] == 0.0
    assert (out / "report.md").exists() and (out / "pareto.png").exists()
    assert "tiny-sd3" in (out / "report.md").read_text()


# --- the shipped model ----------------------------------------------------------------------------------------

shipped = pytest.mark.skipif(
    not (MODEL_DIR / "model_index.json").is_file(), reason="the built-in tiny-sd3 model is not exported yet"
)


@shipped
def test_shipped_tiny_sd3_generates_with_tofu(tmp_path, monkeypatch):
    monkeypatch.delenv(models.TINY_SD3_DIR_ENV, raising=False)
    out = tmp_path / "run"
    config = GenerateConfig(model="tiny-sd3", out=str(out), methods=["full", "tofu"], classes=[0], per_class=1,
                            steps=4, device="cpu", warmup=False)  # fmt: skip
    manifest = generate(config, progress=False)
    assert manifest["config"]["model_class"] == "StableDiffusion3Pipeline"
    for method in ("full", "tofu"):
        with Image.open(out / method / "0000_0.png") as image:
            assert image.size == (64, 64)


def test_report_notes_name_the_defaults_of_the_backbone():
    from evaluation.report import _notes

    reduction = {"ratio": 0.5, "schedule": None, "max_downsample": 1, "blocks": None, "sx": 2, "sy": 2, "use_rand": True}
    dit = " ".join(_notes({"model_class": "StableDiffusion3Pipeline", "reduction": reduction}, {}))
    unet = " ".join(_notes({"model_class": "StableDiffusionPipeline", "reduction": reduction}, {}))
    assert "M in every patched block" in dit and "blocks all" in dit
    assert "P down" not in dit and "max_downsample" not in dit
    assert "default (P down, M up)" in unet and "max_downsample 1" in unet and "blocks" not in unet
    chosen = " ".join(_notes({"model_class": "FluxPipeline", "reduction": {**reduction, "blocks": "0-3", "schedule": "PM"}}, {}))
    assert "schedule PM" in chosen and "blocks 0-3" in chosen
    for pipeline in ("WanPipeline", "QwenImagePipeline", "SanaPipeline", "ChromaPipeline", "ZImagePipeline", "Flux2Pipeline"):
        notes = " ".join(_notes({"model_class": pipeline, "reduction": reduction}, {}))
        assert "blocks all" in notes and "max_downsample" not in notes, pipeline


def _edit_manifest(out, change):
    path = out / "manifest.json"
    manifest = json.loads(path.read_text())
    change(manifest["config"])
    path.write_text(json.dumps(manifest))


def test_a_run_records_its_default_letters_and_refuses_to_mix_another_default(tiny_sd3, tmp_path, capsys):
    """A run binds the letters tofu_sd's default schedule gave its model; extending it with a tofu_sd whose default
    differs (here: the recorded letters edited, as an older version would have left them) is refused before any
    image is written, as is a DiT run recorded before the letters were. Methods with their own schedule
    (tofu-M) and --schedule runs record nothing; a U-Net run without the record is extended (its default never
    changed)."""
    out = tmp_path / "run"
    args = ["generate", "--model", "tiny-sd3", "--out", str(out), "--methods", "full,tofu,tofu-M", "--classes", "0",
            "--steps", "1", "--device", "cpu", "--quiet", "--no-warmup"]  # fmt: skip
    assert main([*args, "--per-class", "1"]) == 0
    assert json.loads((out / "manifest.json").read_text())["config"]["default_schedule"] == "MMM"
    before = {m: _images(out / m) for m in ("full", "tofu", "tofu-M")}
    for change, said in ((lambda c: c.update(default_schedule="PMM"), "default schedule PMM;"),
                         (lambda c: c.pop("default_schedule"), "from before 2026-12-01")):  # fmt: skip
        _edit_manifest(out, change)
        assert main([*args, "--per-class", "2"]) == 2
        err = capsys.readouterr().err
        assert said in err and "tofu were made with" in err and "default on this model is MMM" in err
        assert {m: _images(out / m) for m in before} == before
    _edit_manifest(out, lambda c: c.update(default_schedule="MMM"))
    assert main([*args, "--per-class", "2"]) == 0 and len(_images(out / "tofu")) == 2
    own = tmp_path / "own"
    assert main([*args, "--out", str(own), "--per-class", "1", "--schedule", "PAM"]) == 0
    assert "default_schedule" not in json.loads((own / "manifest.json").read_text())["config"]
    unet = tmp_path / "unet"
    uargs = ["generate", "--model", "tiny-random", "--out", str(unet), "--methods", "full,tofu", "--classes", "0",
             "--steps", "1", "--device", "cpu", "--quiet", "--no-warmup"]  # fmt: skip
    assert main([*uargs, "--per-class", "1"]) == 0
    assert json.loads((unet / "manifest.json").read_text())["config"]["default_schedule"] == "PPMMM"
    _edit_manifest(unet, lambda c: c.pop("default_schedule"))
    assert main([*uargs, "--per-class", "2"]) == 0 and len(_images(unet / "tofu")) == 2
