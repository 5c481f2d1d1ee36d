"""``python -m evaluation.shapes.train --classifier-only``: the classifier trained again for a finished model (its
VAE's reconstructions are part of its training data), replacing the classifier files of the model folder."""

from __future__ import annotations

import json
import os
import shutil
import time
from dataclasses import asdict
from pathlib import Path

import torch

from ..files import temporary_sibling
from .components import to_unit
from .export import final_loss, plot_losses
from .trainer import Trainer, TrainConfig


def _encode_first_pictures(trainer) -> None:
    """The classifier stage decodes the latent means of the first 3000 pictures: encode them with the VAE."""
    with torch.no_grad():
        count = min(len(trainer.images), 3000)
        trainer.latents = {"mean": torch.cat([
            trainer.vae.encode(to_unit(trainer.images[s : min(s + 256, count)])).latent_dist.mean
            for s in range(0, count, 256)
        ])}  # fmt: skip


def _replace_classifier_files(trainer, out: Path, seconds: float, config) -> dict:
    """The new classifier, its loss plot and the updated ``training.json``, staged in a temporary folder and then
    moved into ``out`` one file at a time (each move atomic)."""
    summary = json.loads((out / "training.json").read_text())
    staging = temporary_sibling(out.with_name(f"{out.name}.classifier"))
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir()
    trainer.classifier.eval().save(staging)
    log = torch.load(trainer.work / "classifier.ckpt", weights_only=False)["log"]
    plot_losses({"classifier": log}, staging / "loss_classifier.png")
    summary["config"]["classifier_steps"] = config.classifier_steps
    summary["config"]["classifier_batch"] = config.classifier_batch
    summary["seconds"]["classifier"] = seconds
    summary["classifier_val_accuracy"] = trainer.state["classifier_val_accuracy"]
    summary["final_loss_mean_last_100"]["classifier"] = final_loss(log)
    summary["classifier_trained_separately"] = {"command": "--classifier-only", "threads": torch.get_num_threads()}
    (staging / "training.json").write_text(json.dumps(summary, indent=2) + "\n")
    for path in staging.iterdir():
        os.replace(path, out / path.name)
    staging.rmdir()
    return summary


def retrain_classifier(config, progress: bool = True) -> dict:
    """Train the classifier again for the finished model in ``config.out`` (its VAE), and replace it there."""
    from diffusers import AutoencoderKL

    out = Path(config.out)
    if not (out / "vae").is_dir() or not (out / "training.json").is_file():
        raise SystemExit(f"{out} holds no finished model (vae/ and training.json); train the whole model first")
    sub = TrainConfig(**{**asdict(config), "work_dir": str(Path(config.work_dir).expanduser() / "classifier-only")})
    trainer = Trainer(sub, progress=progress)
    trainer.vae = AutoencoderKL.from_pretrained(out / "vae").eval()
    if "data" in trainer.state["done"]:
        trainer.load_data()
    else:
        trainer.stage_data()
        trainer.state["done"].append("data")
    _encode_first_pictures(trainer)
    start = time.perf_counter()
    trainer.stage_classifier()
    seconds = time.perf_counter() - start
    trainer.save_state()
    summary = _replace_classifier_files(trainer, out, seconds, config)
    print(json.dumps({k: summary[k] for k in ("classifier_val_accuracy",)} | {"seconds": seconds}, indent=2))
    return summary
