"""Fine-tune the built-in U-Net model (``--model tiny``) to draw at 128 px as well as at 64 px, on the CPU.

    OMP_NUM_THREADS=1 nice -n 10 python -m evaluation.shapes.finetune --work-dir /work/ckpt/tiny-128 --threads 1
    python -m evaluation.shapes.finetune_export --work-dir /work/ckpt/tiny-128 --quality

The U-Net and the text encoder start from the exported model ``--init-from`` (default: the shipped one) and are
trained further; its VAE is frozen and its tokenizer, scheduler and classifier are not used or changed.

1. ``latents``: the training pictures (:mod:`.data`, seed 0, the first ``--images``) drawn at ``--size`` (128)
   and at 64 px, each encoded once by the frozen VAE (posterior mean and std, ``latents_128.pt`` and
   ``latents_64.pt`` in the work folder; a 128-px picture gives a 32x32 latent: 1024 tokens at the U-Net's first
   level). The same drawings: every picture is a function of (seed, index), the size only sets the resolution.
2. ``finetune``: each step is a batch of ``--batch`` 128-px latents or, with probability ``--share-64``, of
   ``--batch-64`` 64-px ones (a batch has one size), drawn from generators seeded with ``(seed, step)``; the
   objective of the original U-Net stage (:mod:`.trainer`): epsilon prediction, min-SNR-5 weighting, 10% empty
   captions; AdamW, warm-up, cosine decay to 10% over the ``--minutes`` wall-time budget (``--minutes 0``: over
   exactly ``--steps`` steps, reproducible to the bit on a resume); EMA weights kept (exported). A checkpoint
   (``transformer.ckpt``: the name of the shared loop, :mod:`.timed_loop`) every
   ``--checkpoint-minutes`` and at the end; the same command resumes, other options are refused.

Why 64-px batches in 40% of the steps: the model must keep its 64-px quality (prompt accuracy >= 0.93), and
fine-tuning on 128 px alone drifts the weights away from it; a 64-px step is cheap (batch 32, the original run's:
about 2.5 s against 7.5 s for a 128-px step of 16 on one busy CPU thread, 2026-12), so 40% of the steps are about
a fifth of the training time. A 90-minute run at that rate: about 1,000 steps, 600 of them at 128 px.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from torch.nn import functional as F

from .. import archs
from ..files import write_text_atomic
from . import MODEL_DIR
from .components import to_unit
from .data import SIZE, caption, draw_dataset
from .export import NOISE
from .loop import run_state, save_atomic

INIT_RECORD = "init_training.json"  #: the ``training.json`` of the model the run starts from
STEP_KEY = 128  #: in the step generators' seeds, apart from the original stages' keys (0-5) and tiny-sd3's (31)


@dataclass
class FinetuneConfig:
    """Options of the fine-tune (defaults: the run meant for the shipped model)."""

    work_dir: str
    init_from: str = ""  # the model folder to start from ("": the shipped one, evaluation/shapes/model)
    seed: int = 0
    images: int = 12000  # pictures 0 .. images-1 of the data set, at each size
    size: int = 128
    share_64: float = 0.4  # the probability that a step's batch is of 64-px pictures
    batch: int = 16
    batch_64: int = 32
    steps: int = 6000  # at most: with ``minutes``, the run ends when its training time reaches them
    minutes: float = 90.0  # the training's wall-time budget (0: train exactly ``steps`` steps)
    lr: float = 2e-4
    warmup: int = 100
    caption_dropout: float = 0.1
    ema_decay: float = 0.999
    checkpoint_minutes: float = 4.0
    threads: int = 0  # 0: torch's default

    def recorded(self) -> dict:
        """The options a resumed run must share."""
        return {k: v for k, v in asdict(self).items() if k not in ("work_dir", "threads", "checkpoint_minutes")}


def step_generators(seed: int, step: int) -> tuple[np.random.Generator, torch.Generator]:
    """Generators for step ``step``: the same on a resumed run as on an uninterrupted one."""
    key = [seed, STEP_KEY, step]
    rng = np.random.default_rng(key)
    return rng, torch.Generator().manual_seed(int(np.random.default_rng(key + [1]).integers(2**62)))


def low_steps(config: FinetuneConfig, steps: int) -> int:
    """How many of the first ``steps`` steps are 64-px batches (each step's first draw decides)."""
    return sum(step_generators(config.seed, s)[0].random() < config.share_64 for s in range(steps))


def file_digest(folder: Path) -> str:
    """SHA-256 of the safetensors files of a component folder (names and bytes)."""
    digest = hashlib.sha256()
    for file in sorted(Path(folder).glob("*.safetensors")):
        digest.update(file.name.encode() + file.read_bytes())
    return digest.hexdigest()


class Finetuner:
    """The fine-tune in ``config.work_dir`` (see the module docstring)."""

    def __init__(self, config: FinetuneConfig, echo=print) -> None:
        if config.size % SIZE or config.size < SIZE:
            raise SystemExit(f"--size must be a multiple of {SIZE}, got {config.size}")
        if not 0 <= config.share_64 < 1:
            raise SystemExit(f"--share-64 must be in [0, 1), got {config.share_64}")
        self.config, self.echo = config, echo
        self.work = Path(config.work_dir).expanduser()
        self.work.mkdir(parents=True, exist_ok=True)
        self.state_path = self.work / "state.json"
        self.state = run_state(self.state_path, json.loads(json.dumps(config.recorded())),
                               "use the same options or a new --work-dir")  # fmt: skip
        self.state.setdefault("seconds", {})
        self._load(Path(config.init_from).expanduser() if config.init_from else MODEL_DIR)
        self.save_state()

    def _load(self, folder: Path) -> None:
        """The model in ``folder``; its VAE must be the one the run started with (the latents were made with it)."""
        from diffusers import AutoencoderKL, UNet2DConditionModel
        from transformers import CLIPTextModel, CLIPTokenizer

        if not (folder / "model_index.json").is_file():
            raise SystemExit(f"{folder} holds no exported model (model_index.json); pass --init-from a model folder")
        vae = file_digest(folder / "vae")
        if self.state.setdefault("vae_sha256", vae) != vae:
            raise SystemExit(f"the VAE in {folder} is not the one this run started with; use a new --work-dir")
        record = self.work / INIT_RECORD
        if not record.exists() and (folder / "training.json").is_file():
            write_text_atomic(record, (folder / "training.json").read_text())
        self.tokenizer = CLIPTokenizer.from_pretrained(folder / "tokenizer")
        self.vae = AutoencoderKL.from_pretrained(folder / "vae", torch_dtype=torch.float32).eval().requires_grad_(False)
        self.unet = UNet2DConditionModel.from_pretrained(folder / "unet", torch_dtype=torch.float32)
        self.text_encoder = CLIPTextModel.from_pretrained(folder / "text_encoder", torch_dtype=torch.float32)

    def save_state(self) -> None:
        write_text_atomic(self.state_path, json.dumps(self.state, indent=2))

    def params(self) -> list:
        return [*self.unet.parameters(), *self.text_encoder.parameters()]

    def make_ema(self):
        from diffusers.training_utils import EMAModel

        return EMAModel(self.params(), decay=self.config.ema_decay, use_ema_warmup=True, power=0.75)

    # 1. latents
    @torch.no_grad()
    def encode(self, size: int) -> dict:
        """The posterior mean and std of the run's pictures drawn at ``size``, cached in the work folder."""
        path = self.work / f"latents_{size}.pt"
        if path.exists():
            return torch.load(path)
        start = time.perf_counter()
        images, labels = draw_dataset(self.config.seed, self.config.images, size=size)
        means, stds = [], []
        for s in range(0, len(images), 64):
            posterior = self.vae.encode(to_unit(images[s : s + 64])).latent_dist
            means.append(posterior.mean)
            stds.append(posterior.std)
        data = {"mean": torch.cat(means), "std": torch.cat(stds), "labels": torch.from_numpy(labels)}
        save_atomic(data, path)
        self.state["seconds"][f"latents_{size}"] = time.perf_counter() - start
        self.save_state()
        self.echo(f"latents: {len(labels)} pictures at {size} px in {self.state['seconds'][f'latents_{size}']:.0f} s")
        return data

    def stage_latents(self) -> None:
        self.latents = {size: self.encode(size) for size in (SIZE, self.config.size)}

    # 2. fine-tune
    def _tokens(self, labels, drop) -> torch.Tensor:
        texts = ["" if d else caption(int(c)) for c, d in zip(labels, drop)]
        return self.tokenizer(texts, padding="max_length", max_length=archs.SHAPES_MAX_TOKENS, truncation=True,
                              return_tensors="pt").input_ids  # fmt: skip

    def loss(self, step: int) -> torch.Tensor:
        """The min-SNR-5 epsilon loss of step ``step``'s batch (its size, pictures, captions, noise drawn from it)."""
        from diffusers import DDPMScheduler
        from diffusers.training_utils import compute_snr

        c = self.config
        rng, gen = step_generators(c.seed, step)
        low = rng.random() < c.share_64
        data, batch = (self.latents[SIZE], c.batch_64) if low else (self.latents[c.size], c.batch)
        idx = rng.integers(0, len(data["labels"]), batch)
        drop = rng.random(batch) < c.caption_dropout
        noise = DDPMScheduler(**NOISE)
        mean, std = data["mean"][idx], data["std"][idx]
        latents = (mean + std * torch.randn(mean.shape, generator=gen)) * self.vae.config.scaling_factor
        eps = torch.randn(latents.shape, generator=gen)
        t = torch.randint(0, NOISE["num_train_timesteps"], (batch,), generator=gen)
        text = self.text_encoder(self._tokens(data["labels"][idx], drop))[0]
        pred = self.unet(noise.add_noise(latents, eps, t), t, text).sample
        snr = compute_snr(noise, t)
        weight = torch.clamp(snr, max=5.0) / snr  # min-SNR-5, as the original U-Net stage
        return (weight * F.mse_loss(pred, eps, reduction="none").mean(dim=(1, 2, 3))).mean()

    def stage_finetune(self) -> dict:
        from .timed_loop import train_loop

        c = self.config
        optimizer = torch.optim.AdamW(self.params(), lr=c.lr, weight_decay=1e-2)
        state = train_loop(
            self.work, {"unet": self.unet, "text_encoder": self.text_encoder}, optimizer, c.steps, self.loss, c.lr,
            c.warmup, self.make_ema(), checkpoint_seconds=60 * c.checkpoint_minutes, echo=self.echo,
            budget_seconds=60 * c.minutes,
        )  # fmt: skip
        self.state["seconds"]["finetune"] = state["seconds"]
        self.save_state()
        return state

    def run(self) -> dict:
        self.stage_latents()
        return self.stage_finetune()


def parse(argv: list[str] | None = None) -> FinetuneConfig:
    parser = argparse.ArgumentParser(prog="python -m evaluation.shapes.finetune", description=__doc__.split("\n\n")[0])
    parser.add_argument("--work-dir", default="~/.cache/tofu-sd/shapes-finetune", help="checkpoints, latents, logs")
    for name, default in asdict(FinetuneConfig("")).items():
        if name != "work_dir":
            parser.add_argument("--" + name.replace("_", "-"), type=type(default), default=default)
    return FinetuneConfig(**vars(parser.parse_args(argv)))


def main(argv: list[str] | None = None) -> int:
    config = parse(argv)
    if config.threads:
        torch.set_num_threads(config.threads)
    Finetuner(config, echo=lambda msg: print(time.strftime("%H:%M:%S"), msg, flush=True)).run()
    return 0


if __name__ == "__main__":
    sys.exit(main())
