"""The last stage of the built-in model's training: the diffusers folder, the classifier, ``training.json`` and the
loss plots, written to a temporary folder that then replaces the model folder."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import torch

from ..files import atomic_path
from ..weights import halve_components
from .classifier import ShapeClassifier
from .data import NUM_CLASSES

# The noise schedule of Stable Diffusion 1.x.
NOISE = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")
#: Panel titles of the loss plots (the VAE: L1 + MSE, i.e. squared L2, + 1e-6 KL).
LOSS_TITLES = {"vae": "VAE (L1 + L2 + KL)", "unet": "U-Net + text encoder (min-SNR eps)", "classifier": "classifier (CE)",
               "finetune": "fine-tune at 128 + 64 px (min-SNR eps)"}  # the last: evaluation.shapes.finetune


def final_loss(log: list[tuple[int, float]]) -> float:
    """The mean loss of the last 100 steps."""
    return float(np.mean([v for _, v in log[-100:]]))


def plot_losses(losses: dict[str, list[tuple[int, float]]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(losses), figsize=(4.2 * len(losses), 3.2), squeeze=False)
    for ax, (stage, log) in zip(axes[0], losses.items()):
        steps = np.array([s for s, _ in log])
        values = np.array([v for _, v in log])
        ax.plot(steps, values, color="0.8", lw=0.6, label="per step")
        if len(values) >= 50:
            smooth = np.convolve(values, np.ones(50) / 50, mode="valid")
            ax.plot(steps[49:], smooth, color="C0", lw=1.5, label="mean of 50")
        ax.set_yscale("log")
        ax.set_title(LOSS_TITLES[stage])
        ax.set_xlabel("step")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _summary(trainer, classifier: ShapeClassifier, losses: dict) -> dict:
    state = trainer.state
    return {
        "config": state["config"],
        "seconds": state["seconds"],
        "scaling_factor": state.get("scaling_factor"),
        "vae_recon_l1": state.get("vae_recon_l1"),
        "classifier_val_accuracy": state.get("classifier_val_accuracy"),
        "final_loss_mean_last_100": {s: final_loss(log) for s, log in losses.items()},
        "parameters": {
            "unet": sum(p.numel() for p in trainer.unet.parameters()),
            "vae": sum(p.numel() for p in trainer.vae.parameters()),
            "text_encoder": sum(p.numel() for p in trainer.text_encoder.parameters()),
            "classifier": sum(p.numel() for p in classifier.parameters()),
        },
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
    }


def export_model(trainer, out: Path) -> dict:
    """Write ``trainer``'s trained model to ``out`` (replacing it; its hand-written model card ``README.md`` is
    kept) and return the summary written as ``training.json``."""
    from diffusers import DPMSolverMultistepScheduler, StableDiffusionPipeline

    work = trainer.work
    classifier = ShapeClassifier(NUM_CLASSES)
    classifier.load_state_dict(torch.load(work / "classifier.ckpt", weights_only=False)["model"])
    scheduler = DPMSolverMultistepScheduler(**NOISE, steps_offset=1)
    pipe = StableDiffusionPipeline(
        vae=trainer.vae, text_encoder=trainer.text_encoder, tokenizer=trainer.tokenizer, unet=trainer.unet,
        scheduler=scheduler, safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )  # fmt: skip
    with atomic_path(out) as tmp:
        pipe.save_pretrained(tmp, safe_serialization=True)
        halve_components(tmp, ("unet", "vae"))  # stored as float16, loaded as float32: see evaluation.weights
        classifier.eval().save(tmp)
        losses = {stage: torch.load(work / f"{stage}.ckpt", weights_only=False)["log"] for stage in ("vae", "unet", "classifier")}
        plot_losses(losses, tmp / "loss.png")
        summary = _summary(trainer, classifier, losses)
        (tmp / "training.json").write_text(json.dumps(summary, indent=2) + "\n")
        card = out / "README.md"
        if card.exists():  # the model card is written by hand; keep it
            shutil.copy(card, tmp / "README.md")
    return summary
