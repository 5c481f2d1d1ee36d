"""Train the built-in text-to-image model and its classifier on procedural shape pictures, on the CPU.

    python -m evaluation.shapes.train --work-dir ~/.cache/tofu-sd/shapes-train --out evaluation/shapes/model

Stages, each resumable from its last checkpoint in ``--work-dir`` (a run can be interrupted and started again
with the same command; finished stages are skipped):

1. ``data``: draw the training pictures (:mod:`evaluation.shapes.data`), deterministic from ``--seed``.
2. ``vae``: an ``AutoencoderKL`` from 64x64 RGB to a 4x16x16 latent (loss: L1 + MSE + 1e-6 KL).
3. ``latents``: encode every picture once; set the VAE's ``scaling_factor`` to 1 / std of the latents.
4. ``unet``: a ``UNet2DConditionModel`` and a ``CLIPTextModel``, trained together with the epsilon objective
   (min-SNR weighting, 10% empty captions for classifier-free guidance), EMA weights kept.
5. ``classifier``: the CNN of :mod:`evaluation.shapes.classifier`, on pictures and VAE reconstructions.
6. ``export``: a ``StableDiffusionPipeline`` saved with ``save_pretrained`` (safetensors) into ``--out``, the
   classifier, ``training.json`` (configuration, losses, wall times) and ``loss.png``.

The classifier alone can be trained again on a finished model (its VAE's reconstructions are part of its
training data), in a ``classifier-only`` folder of ``--work-dir``; this replaces the classifier files in
``--out`` and updates ``training.json`` (the shipped classifier was made this way, 4000 steps)::

    python -m evaluation.shapes.train --classifier-only --work-dir ~/.cache/tofu-sd/shapes-train

The architectures are :data:`evaluation.archs.SHAPES_UNET`, ``SHAPES_VAE`` and ``SHAPES_TEXT``; the
stages are :mod:`.trainer`, their shared training loop :mod:`.loop`, the export :mod:`.export`,
``--classifier-only`` :mod:`.classifier_only`.
Every random choice of step ``s`` (which pictures, which noise, which timesteps) is drawn from generators seeded
with ``(seed, stage, s)``, so a resumed run takes the same batches as an uninterrupted one.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import asdict
from pathlib import Path

import torch

from .classifier_only import retrain_classifier
from .trainer import Trainer, TrainConfig


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m evaluation.shapes.train", description=__doc__.split("\n\n")[0])
    parser.add_argument("--work-dir", default="~/.cache/tofu-sd/shapes-train", help="checkpoints, data, logs (resumable)")
    parser.add_argument("--out", default=str(Path(__file__).with_name("model")), help="model folder to write")
    for name, default in asdict(TrainConfig("", "")).items():
        if name not in ("work_dir", "out"):
            parser.add_argument("--" + name.replace("_", "-"), type=type(default), default=default)
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    parser.add_argument(
        "--classifier-only", action="store_true",
        help="train only the classifier, for the finished model in --out, and replace it there",
    )  # fmt: skip
    args = vars(parser.parse_args(argv))
    quiet, classifier_only = args.pop("quiet"), args.pop("classifier_only")
    config = TrainConfig(**args)
    if config.threads:
        torch.set_num_threads(config.threads)
    if classifier_only:
        retrain_classifier(config, progress=not quiet)
    else:
        Trainer(config, progress=not quiet).run()
    return 0


if __name__ == "__main__":
    sys.exit(main())
