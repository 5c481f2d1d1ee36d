"""The built-in model: its procedural data, its training loop (resume), and the shipped weights (load, denoise, classify)."""

import json
import math

import numpy as np
import pytest
import torch

from evaluation.shapes import MODEL_DIR
from evaluation.shapes import data as shapes_data
from prompts import class_names, prompt
from prompts.shapes import COLOURS, SHAPES



# ---------------------------------------------------------------- data


def test_classes_and_captions():
    names = class_names("shapes")
    assert len(names) == len(COLOURS) * len(SHAPES) == shapes_data.NUM_CLASSES >= 32
    assert len(set(names)) == len(names)
    assert names[0] == "red circle" and names[len(SHAPES) + 2] == "orange triangle"
    assert prompt(len(names) - 1, "shapes") == "A high-quality photograph of a pink cross."
    assert shapes_data.caption(3) == "A high-quality photograph of a red star."


def test_pictures_are_deterministic_and_balanced():
    a, labels = shapes_data.draw_dataset(7, 2 * shapes_data.NUM_CLASSES)
    b, _ = shapes_data.draw_dataset(7, 10, start=5)
    assert a.shape == (96, 64, 64, 3) and a.dtype == np.uint8
    assert np.array_equal(a[5:15], b)  # a picture depends on (seed, index) only, not on how the set is drawn
    assert not np.array_equal(shapes_data.draw_dataset(8, 4)[0], a[:4])
    assert labels.tolist() == list(range(48)) * 2


# Closed-form areas of each shape with circumradius r (pixels), as drawn by shape_mask.
_H = 0.32  # cross arm half-width / r
AREA = {
    "circle": math.pi,
    "ring": math.pi * (1 - 0.55**2),
    "square": 2.0,
    "triangle": 3 * math.sqrt(3) / 4,
    "star": 5 * 0.42 * math.sin(math.radians(36)),
    "cross": 8 * _H - 4 * _H**2,
}


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("angle", [0.0, 0.7])
def test_shape_area_matches_geometry(shape, angle):
    r = 20.0
    mask = shapes_data.shape_mask(shape, 32.0, 32.0, r, angle)
    assert mask.min() >= 0 and mask.max() <= 1
    assert mask.sum() == pytest.approx(AREA[shape] * r * r, rel=0.03)


def test_picture_shows_its_colour():
    """Pixels well inside the shape have the class colour (within the jitter); the background is grey-ish."""
    for index in range(48):
        picture, label = shapes_data.draw_sample(3, index)
        colour = class_names("shapes")[label].split()[0]
        target = np.array(shapes_data.RGB[colour], dtype=float)
        distance = np.abs(picture.astype(float) - target).max(axis=-1)
        # at least a few dozen pixels are exactly the (jittered) colour, i.e. the shape is visible
        assert (distance <= shapes_data.JITTER + 1).sum() >= 30, (index, colour)


# ---------------------------------------------------------------- training loop


def test_training_resumes_to_the_same_weights(tmp_path, monkeypatch):
    """An interrupted run, started again, ends with the weights of an uninterrupted one."""
    from evaluation import archs
    from evaluation.shapes import trainer as stages
    from evaluation.shapes.classifier_only import retrain_classifier

    monkeypatch.setattr(archs, "SHAPES_VAE", {**archs.SHAPES_VAE, "block_out_channels": (16, 16, 16)})
    monkeypatch.setattr(archs, "SHAPES_UNET", {**archs.SHAPES_UNET, "block_out_channels": (16, 32, 32), "attention_head_dim": 2})
    monkeypatch.setattr(stages, "VALIDATION_IMAGES", 96)
    torch.set_num_threads(1)  # bit-exact comparisons between runs
    small = dict(images=96, vae_steps=3, vae_batch=4, unet_steps=4, unet_batch=4, classifier_steps=2, checkpoint_every=2)

    def run(name, **fail_at):
        config = stages.TrainConfig(work_dir=str(tmp_path / name), out=str(tmp_path / f"{name}_model"), **small)
        trainer = stages.Trainer(config, progress=False)
        trainer.run()
        return trainer

    full = run("full")
    real_loop = stages.Trainer._loop

    def interrupted_loop(self, stage, modules, optimizer, steps, step_fn, *args, **kwargs):
        def failing(step):
            if stage == "unet" and step == 3:
                raise KeyboardInterrupt
            return step_fn(step)

        return real_loop(self, stage, modules, optimizer, steps, failing, *args, **kwargs)

    monkeypatch.setattr(stages.Trainer, "_loop", interrupted_loop)
    with pytest.raises(KeyboardInterrupt):
        run("resumed")
    monkeypatch.setattr(stages.Trainer, "_loop", real_loop)
    resumed = run("resumed")
    for a, b in zip(full.unet.state_dict().values(), resumed.unet.state_dict().values()):
        assert torch.equal(a, b)
    assert (tmp_path / "resumed_model" / "unet" / "diffusion_pytorch_model.safetensors").is_file()
    log = (tmp_path / "resumed" / "loss_unet.csv").read_text().splitlines()
    assert log[0] == "step,loss" and len(log) == 1 + small["unet_steps"]

    # --classifier-only on the finished model trains the same classifier again (same data, VAE and seeds) and
    # replaces it in the model folder, recording how.
    from evaluation.shapes.classifier import load_classifier

    model = tmp_path / "full_model"
    before = load_classifier(model).state_dict()
    (model / "classifier.safetensors").unlink()
    config = stages.TrainConfig(work_dir=str(tmp_path / "again"), out=str(model), **small)
    retrain_classifier(config, progress=False)
    for name, value in load_classifier(model).state_dict().items():
        assert torch.equal(value, before[name]), name
    summary = json.loads((model / "training.json").read_text())
    assert summary["classifier_trained_separately"]["command"] == "--classifier-only"
    assert summary["config"]["classifier_steps"] == small["classifier_steps"]
    assert (model / "loss_classifier.png").is_file() and (model / "unet" / "config.json").is_file()
    with pytest.raises(SystemExit, match="no finished model"):
        retrain_classifier(stages.TrainConfig(work_dir=str(tmp_path / "x"), out=str(tmp_path / "none")), progress=False)


def test_training_refuses_other_options_in_the_same_work_dir(tmp_path):
    from evaluation.shapes import trainer as stages

    (tmp_path / "state.json").write_text('{"config": {"seed": 1}}')
    with pytest.raises(SystemExit, match="other options"):
        stages.Trainer(stages.TrainConfig(work_dir=str(tmp_path), out=str(tmp_path / "m")), progress=False)


# ---------------------------------------------------------------- the shipped model


@pytest.fixture(scope="module")
def shipped():
    from diffusers import StableDiffusionPipeline

    return StableDiffusionPipeline.from_pretrained(MODEL_DIR, local_files_only=True)


def test_shipped_model_has_the_architectures_that_training_starts_from(shipped):
    """evaluation.archs describes the shipped model: training from its configs makes these networks."""
    from evaluation import archs

    as_saved = lambda value: list(value) if isinstance(value, tuple) else value  # noqa: E731
    for config, model in ((archs.SHAPES_UNET, shipped.unet), (archs.SHAPES_VAE, shipped.vae)):
        assert {k: model.config[k] for k in config} == {k: as_saved(v) for k, v in config.items()}
    text = shipped.text_encoder.config
    assert {k: getattr(text, k) for k in archs.SHAPES_TEXT} == archs.SHAPES_TEXT
    assert shipped.tokenizer.model_max_length == archs.SHAPES_MAX_TOKENS


def test_shipped_model_is_small_and_shaped_like_sd(shipped):
    sizes = sum(p.stat().st_size for p in MODEL_DIR.rglob("*.safetensors"))
    assert sizes <= 40 * 2**20
    unet = shipped.unet
    assert unet.config.down_block_types[0] == "CrossAttnDownBlock2D" and unet.config.sample_size**2 >= 256
    import tofu_sd

    tofu_sd.apply(shipped, ratio=0.5)
    try:
        assert tofu_sd.get_state(shipped).schedule == "PPMMM"  # SD 1.x's 2 + 3 highest-resolution blocks
    finally:
        tofu_sd.remove(shipped)


def test_tokenizer_makes_each_caption_word_one_token(shipped):
    for c in range(48):
        words = prompt(c, "shapes").lower().replace("-", " - ").replace(".", " .").split()
        assert len(shipped.tokenizer(prompt(c, "shapes")).input_ids) == len(words) + 2


@torch.no_grad()
@pytest.mark.parametrize("size", [64, 128])  # fine-tuned at 128 px on 2026-12-07 (a 32x32 latent, 1,024 tokens)
def test_shipped_model_denoises_and_follows_the_prompt(shipped, size):
    """At a middle timestep the U-Net's noise estimate beats the trivial one by far, and the right caption helps,
    on fresh pictures (a seed no training used) at both sizes it was trained for."""
    pictures, labels = shapes_data.draw_dataset(999, 48, size=size)
    x = torch.from_numpy(pictures).permute(0, 3, 1, 2).float() / 127.5 - 1
    latents = shipped.vae.encode(x).latent_dist.mean * shipped.vae.config.scaling_factor
    g = torch.Generator().manual_seed(0)
    noise = torch.randn(latents.shape, generator=g)
    t = torch.full((48,), 500)
    noisy = shipped.scheduler.add_noise(latents, noise, t)

    def text(classes):
        ids = shipped.tokenizer([prompt(int(c), "shapes") for c in classes], padding="max_length", return_tensors="pt")
        return shipped.text_encoder(ids.input_ids)[0]

    right = (shipped.unet(noisy, t, text(labels)).sample - noise).pow(2).mean()
    wrong = (shipped.unet(noisy, t, text((labels + 7) % 48)).sample - noise).pow(2).mean()
    # Predicting zero noise would score 1.0. The model before its 128-px fine-tune scored 0.027 at 128 px with a
    # ratio of 0.76 to the wrong caption's (it drew each shape twice there); the shipped one: 0.008 and 0.42
    # (64 px: 0.0145 and 0.40).
    assert right < 0.02
    assert right < 0.6 * wrong


def test_shipped_classifier_recognises_fresh_pictures():
    from evaluation.metrics import PromptAccuracy, load_prompt_classifier

    pictures, labels = shapes_data.draw_dataset(4242, 192)
    metric = PromptAccuracy(load_prompt_classifier())
    metric.update(torch.from_numpy(pictures).permute(0, 3, 1, 2).float() / 255, labels.tolist())
    accuracy, count = metric.compute()
    assert count == 192 and accuracy >= 0.9
    with pytest.raises(ValueError, match="one label per image"):
        metric.update(torch.zeros(2, 3, 64, 64), [1])
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        metric.update(torch.full((1, 3, 64, 64), 2.0), [1])


def test_a_non_editable_install_ships_every_model_file():
    """pyproject's package data covers each file of the model folder, so ``pip install .`` has the model too."""
    import fnmatch
    from pathlib import Path

    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10: the same parser as the tomli package (the test extra installs it)
        import tomli as tomllib

    root = Path(__file__).resolve().parents[1]
    patterns = tomllib.loads((root / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]["evaluation.shapes"]
    files = [p.relative_to(MODEL_DIR.parent).as_posix() for p in MODEL_DIR.rglob("*") if p.is_file()]
    assert len(files) >= 10
    for name in files:  # setuptools' globs: "*" never crosses a "/"
        assert any(fnmatch.fnmatch(name, pat) and name.count("/") == pat.count("/") for pat in patterns), name
