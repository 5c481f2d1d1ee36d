"""The fine-tune of the built-in U-Net model at 128 px (:mod:`evaluation.shapes.finetune`), its export into a copy of
the shipped folder, and the quality checks of :mod:`evaluation.shapes.quality` (one shape per picture, 2x2 area
downsampling for the 64-px classifier). Tiny settings: a few pictures, batches of 2, 4 steps."""

import filecmp
import json
import shutil

import numpy as np
import pytest
import torch
from trainer_runs import one_thread, run_trainer  # noqa: F401 - one_thread: an autouse fixture

from evaluation.shapes import MODEL_DIR
from evaluation.shapes import finetune_export as FE
from evaluation.shapes import quality as Q
from evaluation.shapes.card_finetune import SECTION_START
from evaluation.shapes.data import NUM_CLASSES, RGB, draw_dataset, shape_mask
from evaluation.shapes.finetune import FinetuneConfig, Finetuner, low_steps
from evaluation.shapes.timed_loop import CHECKPOINT

PROMPT = "A high-quality photograph of a red star."
REPLACED = {"unet/diffusion_pytorch_model.safetensors", "text_encoder/model.safetensors", "training.json", "README.md",
            "loss_finetune.png"}  # the last: written by every export (the shipped model has one since its fine-tune)


def tiny(work, **kw) -> FinetuneConfig:
    options = {"images": 6, "batch": 2, "batch_64": 2, "steps": 4, "minutes": 0.0, "warmup": 1, "lr": 1e-3,
               "checkpoint_minutes": 0.0, "share_64": 0.5}
    return FinetuneConfig(work_dir=str(work), **{**options, **kw})


def _run(work, stop_at=None):
    return run_trainer(Finetuner(tiny(work), echo=lambda msg: None), stop_at)


@pytest.fixture(scope="module")
def whole(one_thread, tmp_path_factory):  # noqa: F811 - the imported fixture
    """An uninterrupted tiny run of 4 steps: its work folder."""
    work = tmp_path_factory.mktemp("finetune") / "whole"
    _run(work)
    return work


def _weights(work) -> dict:
    ckpt = torch.load(work / CHECKPOINT, weights_only=False)
    return {"unet": ckpt["unet"], "text_encoder": ckpt["text_encoder"], "ema": ckpt["ema"]["shadow_params"]}


def test_both_sizes_are_trained_and_latents_cached(whole):
    assert 0 < low_steps(tiny(whole), 4) < 4  # 64-px and 128-px batches both among the 4 steps
    for size, side in ((64, 16), (128, 32)):
        data = torch.load(whole / f"latents_{size}.pt")
        assert data["mean"].shape == (6, 4, side, side) and data["labels"].tolist() == [0, 1, 2, 3, 4, 5]
    from diffusers import UNet2DConditionModel

    shipped = UNet2DConditionModel.from_pretrained(MODEL_DIR / "unet").state_dict()
    trained = _weights(whole)["unet"]
    assert any(not torch.equal(trained[k], shipped[k].float()) for k in shipped)  # it trained
    name = "conv_in.weight"  # and it started from the shipped weights, not a fresh initialisation
    assert (trained[name] - shipped[name].float()).abs().max() < 0.05


def test_resume_ends_with_the_weights_of_an_uninterrupted_run(tmp_path, whole):
    with pytest.raises(KeyboardInterrupt):
        _run(tmp_path / "a", stop_at=2)
    assert torch.load(tmp_path / "a" / CHECKPOINT, weights_only=False)["step"] == 2
    _run(tmp_path / "a")
    ours, theirs = _weights(tmp_path / "a"), _weights(whole)
    for part in ("unet", "text_encoder"):
        assert all(torch.equal(ours[part][k], theirs[part][k]) for k in theirs[part]), part
    assert all(torch.equal(a, b) for a, b in zip(ours["ema"], theirs["ema"]))
    with pytest.raises(SystemExit, match="other options"):
        Finetuner(tiny(tmp_path / "a", share_64=0.3), echo=lambda msg: None)


def _export(whole, tmp_path, **kw):
    out = tmp_path / "model"
    shutil.copytree(MODEL_DIR, out)
    return FE.export_model(whole, out, **kw), out


def test_export_keeps_the_other_components_and_draws_at_128_and_64(tmp_path, whole):
    record, out = _export(whole, tmp_path)
    for path in MODEL_DIR.rglob("*"):
        rel = path.relative_to(MODEL_DIR).as_posix()
        if path.is_file() and rel not in REPLACED:
            assert filecmp.cmp(path, out / rel, shallow=False), rel  # VAE, classifier, tokenizer, scheduler, configs
    assert (out / "loss_finetune.png").is_file()
    shipped = json.loads((MODEL_DIR / "training.json").read_text())
    if "finetune" in shipped:  # the shipped model is fine-tuned already: its fine-tune is kept, renamed
        shipped["finetune_before"] = shipped.pop("finetune")
    assert {k: v for k, v in record.items() if k != "finetune"} == shipped
    assert record["finetune"]["step"] == 4 and record["finetune"]["steps_64"] + record["finetune"]["steps_128"] == 4
    tuner, _ = FE.load_finetuned(whole)  # the EMA weights
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(out, local_files_only=True)
    assert pipe.unet.dtype == torch.float32
    for (name, a), b in zip(tuner.unet.state_dict().items(), pipe.unet.state_dict().values()):
        assert torch.equal(a.half().float(), b), name  # stored float16, as shipped
    for (name, a), b in zip(tuner.text_encoder.state_dict().items(), pipe.text_encoder.state_dict().values()):
        assert torch.equal(a, b), name  # stored float32, as shipped
    pipe.set_progress_bar_config(disable=True)
    for size in (128, 64):
        images = pipe(PROMPT, height=size, width=size, num_inference_steps=2, output_type="np").images
        assert images.shape == (1, size, size, 3) and np.isfinite(images).all()
    card = (out / "README.md").read_text()
    hand_written = (MODEL_DIR / "README.md").read_text().split(SECTION_START)[0].rstrip("\n")
    assert card.startswith(hand_written) and card.count(SECTION_START) == 1  # the hand-written card kept
    assert "## Fine-tuned to draw at 128 px" in card and "| 1: from scratch (above) | 64-px pictures | 5,000 x 32" in card


def test_quality_goes_into_the_card_and_a_second_export_replaces_the_section(tmp_path, whole, monkeypatch):
    record, out = _export(whole, tmp_path)
    fake = {"images": 48, "seed": 1, "steps": 20, "guidance": 7.5, "prompt_accuracy": 0.9375, "colour_accuracy": 1.0,
            "shape_accuracy": 0.9375, "one_shape": 0.875}  # fmt: skip
    monkeypatch.setattr(Q, "measure", lambda folder, size, per_class: {**fake, "size": size})
    record = FE.export_model(whole, out, quality=True)
    assert set(record["finetune"]["quality"]) == {"64", "128"}
    card = (out / "README.md").read_text()
    assert card.count("## Fine-tuned to draw at 128 px") == 1
    assert "| 128 px | 48 | **93.8%** | 100.0% | 93.8% | 87.5% |" in card


def test_export_over_the_size_limit_is_refused_and_writes_nothing(tmp_path, whole, monkeypatch):
    out = tmp_path / "model"
    shutil.copytree(MODEL_DIR, out)
    monkeypatch.setattr(FE, "MAX_BYTES", 10**6)
    with pytest.raises(SystemExit, match="over the 1 MB limit"):
        FE.export_model(whole, out)
    assert not filecmp.dircmp(out, MODEL_DIR).diff_files  # the loss picture too, where the shipped model has one
    assert (out / "loss_finetune.png").exists() == (MODEL_DIR / "loss_finetune.png").exists()
    unet = "unet/diffusion_pytorch_model.safetensors"
    assert filecmp.cmp(out / unet, MODEL_DIR / unet, shallow=False)


# quality checks


@pytest.mark.parametrize("size", [64, 128])
def test_drawn_pictures_have_one_shape_and_two_side_by_side_have_two(size):
    images = draw_dataset(3, 96, size=size)[0] / 255.0
    assert Q.one_shape_fraction(images) == 1.0
    tiled = np.concatenate([images[:48], images[48:]], axis=2)  # two pictures side by side
    assert [Q.count_shapes(x) for x in tiled] == [2] * 48
    assert Q.one_shape_fraction(tiled) == 0.0


def test_count_shapes_on_one_background():
    background = np.full((128, 128, 3), 0.5)
    assert Q.count_shapes(background) == 0
    two = background.copy()
    for cx, colour in ((35, "red"), (95, "blue")):
        mask = shape_mask("star", cx, 64, 22, 0.3, 128)[..., None]
        two = two * (1 - mask) + np.array(RGB[colour]) / 255 * mask
    assert Q.count_shapes(two) == 2
    speck = background.copy()
    speck[10:13, 10:13] = (1.0, 0.0, 0.0)  # 9 pixels: below the minimum area
    assert Q.count_shapes(speck) == 0


def test_area_downsample_averages_blocks_and_the_classifier_names_128px_pictures():
    x = np.random.default_rng(0).random((2, 8, 8, 3))
    small = Q.area_downsample(x, 4)
    assert small.shape == (2, 4, 4, 3)
    assert np.allclose(small[1, 2, 3], x[1, 4:6, 6:8].mean(axis=(0, 1)))
    with pytest.raises(ValueError, match="multiple of 64"):
        Q.area_downsample(np.zeros((1, 100, 100, 3)))
    images, labels = draw_dataset(4, NUM_CLASSES, size=128)
    scores = Q.score(images / 255.0, labels)
    assert scores["prompt_accuracy"] >= 0.95 and scores["one_shape"] == 1.0


def test_export_refuses_another_vae_or_architecture(tmp_path, whole):
    from safetensors.torch import load_file, save_file

    out = tmp_path / "model"
    shutil.copytree(MODEL_DIR, out)
    vae = out / "vae" / "diffusion_pytorch_model.safetensors"
    tensors = load_file(vae)
    name = next(iter(tensors))
    tensors[name] = tensors[name] + 1
    save_file(tensors, vae, metadata={"format": "pt"})
    with pytest.raises(SystemExit, match="VAE"):
        FE.export_model(whole, out)
    tuner, _ = FE.load_finetuned(whole)
    unet = out / "unet" / "diffusion_pytorch_model.safetensors"
    with pytest.raises(ValueError, match="another architecture"):
        FE.replace_weights(tuner.text_encoder, unet)
    assert filecmp.cmp(unet, MODEL_DIR / "unet" / unet.name, shallow=False)
