"""The built-in SD3-style model (``--model tiny-sd3``): its training step and resume on a tiny config, its export,
and the shipped folder (loads with StableDiffusion3Pipeline, draws 64x64 pictures, fits the size limit)."""

import json

import numpy as np
import pytest
import torch
from trainer_runs import one_thread, run_trainer  # noqa: F401 - one_thread: an autouse fixture

from evaluation.shapes_sd3 import CALL_KWARGS, MAX_BYTES, MODEL_DIR, load_pipeline
from evaluation.shapes_sd3 import components as C
from evaluation.shapes_sd3.export import export_model, folder_bytes
from evaluation.shapes_sd3.train import TrainConfig, Trainer

PROMPT = "A high-quality photograph of a red star."
TINY_TEXT_2 = dict(hidden_size=16, intermediate_size=32, num_attention_heads=2, num_hidden_layers=2,
                   max_position_embeddings=C.MAX_TOKENS, projection_dim=16)  # fmt: skip
TINY_TRANSFORMER = dict(
    C.TRANSFORMER, num_layers=2, attention_head_dim=8, num_attention_heads=2, caption_projection_dim=16,
    joint_attention_dim=C.TEXT_DIM + 16, pooled_projection_dim=C.TEXT_DIM + 16, dual_attention_layers=(0,),
)  # fmt: skip


def tiny_config(work, **kw) -> TrainConfig:
    options = dict(images=8, batch=4, steps=4, minutes=0.0, warmup=1, lr=1e-3, checkpoint_minutes=0.0,
                   transformer=dict(TINY_TRANSFORMER), text_2=dict(TINY_TEXT_2))  # fmt: skip
    return TrainConfig(work_dir=str(work), **{**options, **kw})


def quiet(msg):
    pass


def test_vae_latent_is_16x16_and_pipeline_decode_is_inverted():
    vae = C.load_vae()
    assert vae.config.shift_factor == 0.0 and vae.config.latent_channels == 4
    x = torch.zeros(1, 3, 64, 64)
    assert vae.encode(x).latent_dist.mean.shape == (1, 4, 16, 16)  # patch size 1: 256 image tokens


def test_training_step_lowers_the_loss_on_a_fixed_batch(tmp_path):
    trainer = Trainer(tiny_config(tmp_path), echo=quiet)
    trainer.stage_latents()
    params = trainer.params()
    optimizer = torch.optim.Adam(params, lr=3e-3)
    losses = []
    for _ in range(15):
        loss = trainer.loss(0)  # step 0's batch, captions, noise and sigmas every time
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(float(loss.detach()))
    assert np.isfinite(losses).all()
    assert np.mean(losses[-3:]) < 0.7 * losses[0]


def test_step_matches_the_pipelines_text_encoding(tmp_path):
    trainer = Trainer(tiny_config(tmp_path), echo=quiet)
    from evaluation.shapes_sd3.export import build_pipeline

    pipe = build_pipeline(trainer)
    ids = trainer.tokenizer([PROMPT], padding="max_length", max_length=C.MAX_TOKENS, return_tensors="pt").input_ids
    with torch.no_grad():
        ours, pooled = C.encode_text(trainer.te1, trainer.te2, ids, 5)
        theirs, _, pooled_theirs, _ = pipe.encode_prompt(PROMPT, None, None, do_classifier_free_guidance=False,
                                                         max_sequence_length=5)  # fmt: skip
    assert ours.shape == (1, C.MAX_TOKENS + 5, C.TEXT_DIM + 16)
    assert torch.equal(ours, theirs) and torch.equal(pooled, pooled_theirs)


def _run(work, stop_at=None):
    return run_trainer(Trainer(tiny_config(work), echo=quiet), stop_at)


@pytest.fixture(scope="module")
def finished_run(one_thread, tmp_path_factory):  # noqa: F811 - the imported fixture
    """A whole tiny run of 4 steps: its trainer and work folder."""
    work = tmp_path_factory.mktemp("tiny-sd3") / "work"
    return _run(work), work


def test_resume_continues_from_the_saved_step(tmp_path, finished_run):
    with pytest.raises(KeyboardInterrupt):
        _run(tmp_path / "a", stop_at=2)
    ckpt = torch.load(tmp_path / "a" / "transformer.ckpt", weights_only=False)
    assert ckpt["step"] == 2 and [s for s, _ in ckpt["log"]] == [0, 1]
    assert {"optimizer", "ema", "transformer", "text_encoder", "text_encoder_2"} <= set(ckpt)
    resumed = _run(tmp_path / "a")
    whole = finished_run[0]
    ckpt = torch.load(tmp_path / "a" / "transformer.ckpt", weights_only=False)
    assert ckpt["step"] == 4 and [s for s, _ in ckpt["log"]] == [0, 1, 2, 3]
    assert (tmp_path / "a" / "loss.csv").read_text().count("\n") == 5  # header and one line a step
    for a, b in zip(resumed.params(), whole.params()):
        torch.testing.assert_close(a, b)  # the same batches as an uninterrupted run
    with pytest.raises(SystemExit, match="other options"):
        Trainer(tiny_config(tmp_path / "a", lr=3e-3), echo=quiet)


def test_export_loads_and_draws_64x64(tmp_path, finished_run):
    info = export_model(finished_run[1], tmp_path / "model")
    assert info["step"] == 4 and info["finished"]
    assert json.loads((tmp_path / "model" / "vae" / "config.json").read_text())["shift_factor"] == 0.0
    assert (tmp_path / "model" / "loss.png").is_file()
    pipe = load_pipeline("cpu", folder=tmp_path / "model")
    images = pipe(PROMPT, num_inference_steps=2, output_type="np", **CALL_KWARGS).images
    assert images.shape == (1, 64, 64, 3) and np.isfinite(images).all()



def test_init_from_an_exported_model_starts_from_its_weights_and_draws_other_batches(tmp_path, finished_run):
    """A run continuing an exported model (``init_from``) starts from the exported weights (float16 on disk), not a
    fresh initialisation, and its steps draw other batches than the first run's steps of the same index."""
    export_model(finished_run[1], tmp_path / "model")
    trainer = Trainer(tiny_config(tmp_path / "more", init_from=str(tmp_path / "model")), echo=quiet)
    fresh = Trainer(tiny_config(tmp_path / "fresh"), echo=quiet)
    exported = load_pipeline("cpu", folder=tmp_path / "model")
    for ours, theirs, new in ((trainer.transformer, exported.transformer, fresh.transformer),
                              (trainer.te2, exported.text_encoder_2, fresh.te2)):  # fmt: skip
        for (name, a), b, c in zip(ours.state_dict().items(), theirs.state_dict().values(), new.state_dict().values()):
            assert torch.equal(a, b.float()), name
        assert any(not torch.equal(a, c) for a, c in zip(ours.state_dict().values(), new.state_dict().values()))
    for a, b in zip(fresh.params(), trainer.params()):
        a.data.copy_(b.data)  # the same weights: a different loss then means a different batch or noise
    trainer.stage_latents()
    fresh.stage_latents()
    with torch.no_grad():
        assert not torch.equal(trainer.loss(0), fresh.loss(0))
        assert torch.equal(trainer.loss(0), trainer.loss(0))  # drawn from the step: the same on a resume


def test_a_continued_run_exports_a_card_with_every_stage(tmp_path, finished_run):
    from evaluation.shapes import MODEL_DIR as UNET_DIR

    export_model(finished_run[1], tmp_path / "first")
    first = json.loads((tmp_path / "first" / "training.json").read_text())
    work = tmp_path / "more"
    Trainer(tiny_config(work, init_from=str(tmp_path / "first")), echo=quiet).run()
    info = export_model(work, tmp_path / "first")  # over the model it started from, as the shipped one is
    assert info["continues"] == first and info["step"] == 4
    card = (tmp_path / "first" / "README.md").read_text()
    assert "Run, in 2 stages" in card and "Stage 1: 4 steps x 4 (" in card and "from scratch" in card
    assert "In all: 8 steps, 32 samples (4.0 epochs)" in card  # 8 pictures in the tiny data set
    third = tmp_path / "third"  # a third stage, with the U-Net teacher's targets
    Trainer(tiny_config(third, init_from=str(tmp_path / "first"), teacher=str(UNET_DIR)), echo=quiet).run()
    info = export_model(third, tmp_path / "first")
    assert info["continues"]["continues"] == first and info["config"]["teacher"] == str(UNET_DIR)
    card = (tmp_path / "first" / "README.md").read_text()
    lines = [line for line in card.splitlines() if line.startswith("  - Stage")]
    assert len(lines) == 3 and "`--teacher`" in lines[2] and "`--teacher`" not in lines[1]
    assert "In all: 12 steps, 48 samples (6.0 epochs)" in card


shipped = pytest.mark.skipif(not (MODEL_DIR / "model_index.json").is_file(), reason="the model is not exported yet")


@shipped
def test_shipped_model_loads_and_draws_64x64():
    from diffusers import SD3Transformer2DModel, StableDiffusion3Pipeline

    pipe = StableDiffusion3Pipeline.from_pretrained(MODEL_DIR, text_encoder_3=None, tokenizer_3=None)
    assert isinstance(pipe.transformer, SD3Transformer2DModel) and pipe.text_encoder_3 is None
    config = pipe.transformer.config
    assert config.num_layers >= 8 and (config.sample_size // config.patch_size) ** 2 >= 256
    assert pipe.vae.config.shift_factor == 0.0
    pipe.set_progress_bar_config(disable=True)
    images = pipe([PROMPT, ""], num_inference_steps=2, output_type="np", **CALL_KWARGS).images
    assert images.shape == (2, 64, 64, 3) and np.isfinite(images).all()


@shipped
def test_shipped_model_size_and_format():
    assert folder_bytes(MODEL_DIR) <= MAX_BYTES
    assert not list(MODEL_DIR.rglob("*.bin")) and list(MODEL_DIR.rglob("*.safetensors"))
    assert (MODEL_DIR / "README.md").is_file() and (MODEL_DIR / "loss.png").is_file()
    assert json.loads((MODEL_DIR / "training.json").read_text())["finished"]
