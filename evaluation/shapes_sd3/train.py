"""Train the built-in SD3-style model (``--model tiny-sd3``) on the built-in shape pictures, on the CPU.

    OMP_NUM_THREADS=1 nice -n 10 python -m evaluation.shapes_sd3.train --work-dir /work/ckpt/tiny-sd3 --threads 1

Stages, both resumable (the same command continues an interrupted run; other options are refused):

1. ``latents``: draw the ``--model tiny`` training pictures (:mod:`evaluation.shapes.data`, seed 0, 24,000) and
   encode them once with the shipped, frozen VAE (posterior mean and std kept, ``latents.pt``).
2. ``transformer``: the ``SD3Transformer2DModel`` and both CLIP text encoders (:mod:`.components`), trained
   together with SD3's rectified-flow objective: ``x_t = (1 - sigma) x_0 + sigma noise``, target
   ``noise - x_0``, ``sigma`` logit-normal (0, 1), timestep ``1000 sigma``; latents ``x_0 = (z - shift_factor)
   * scaling_factor``, the inverse of the pipeline's decode; 10% empty captions (classifier-free guidance); each
   step a number of zero "T5" tokens like the pipeline's ``max_sequence_length`` (mostly 0-16, sometimes up to
   256), so any small value works and the default 256 too; EMA weights kept. Checkpoint ``transformer.ckpt``
   every ``--checkpoint-minutes`` and at the end; one line per step in ``loss.csv``. The run trains for
   ``--minutes`` of wall time (summed over resumes; the cosine learning-rate decay runs over that time), at most
   ``--steps`` steps; ``--minutes 0`` trains exactly ``--steps`` steps (reproducible to the bit on a resume).
   With ``--teacher <the --model tiny folder>`` the target is the U-Net model's estimate of ``noise - x_0``
   (:mod:`.teacher`: far less variance than the drawn one, so the shapes are learnt in fewer steps), mixed with
   the drawn target by ``--teacher-weight``.

Then :mod:`.export` writes the diffusers folder from the checkpoint's EMA weights::

    python -m evaluation.shapes_sd3.export --work-dir /work/ckpt/tiny-sd3 --out evaluation/shapes_sd3/model
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch.nn import functional as F

from ..files import write_text_atomic
from ..shapes.data import caption, draw_dataset
from ..shapes.loop import run_state, save_atomic
from . import components as C
from .loop import step_generators, train_loop
from .teacher import UNetTeacher

#: Numbers of zero "T5" tokens a training step appends, and how often: mostly few, sometimes the default 256.
INIT_RECORD = "init_training.json"  #: the ``training.json`` of the model an ``init_from`` run continues
ZERO_TOKENS_FEW = (0, 1, 2, 4, 8, 16)
ZERO_TOKENS_MANY = (32, 64, 128, 256)
P_MANY = 0.1


@dataclass
class TrainConfig:
    """Options of the training command (defaults: the shipped model)."""

    work_dir: str
    seed: int = 0
    images: int = 24000
    steps: int = 4000  # at most: with ``minutes``, the run ends when its training time reaches them
    minutes: float = 88.0  # the training's wall-time budget (0: train exactly ``steps`` steps)
    batch: int = 16
    lr: float = 5e-4
    warmup: int = 150
    caption_dropout: float = 0.1
    ema_decay: float = 0.999
    checkpoint_minutes: float = 4.0
    threads: int = 0  # 0: torch's default
    init_from: str = ""  # an exported model folder whose transformer and text encoders start the run ("": new)
    teacher: str = ""  # a ``--model tiny`` folder whose U-Net gives the flow targets (:mod:`.teacher`; "": data)
    teacher_weight: float = 1.0  # the target: this share of the teacher's, the rest the data's
    transformer: dict = field(default_factory=lambda: dict(C.TRANSFORMER))
    text_2: dict = field(default_factory=lambda: dict(C.TEXT_2))

    def recorded(self) -> dict:
        """The options a resumed run must share."""
        return {k: v for k, v in asdict(self).items() if k not in ("work_dir", "threads", "checkpoint_minutes")}


def _jsonable(obj):
    return json.loads(json.dumps(obj))


class Trainer:
    def __init__(self, config: TrainConfig, echo=print) -> None:
        self.config = config
        self.echo = echo
        self.work = Path(config.work_dir).expanduser()
        self.work.mkdir(parents=True, exist_ok=True)
        self.state_path = self.work / "state.json"
        self.state = run_state(self.state_path, _jsonable(config.recorded()), "use the same options or a new --work-dir")
        self.state.setdefault("seconds", {})
        self.save_state()  # the run's options, for a resume and for an export midway
        self.tokenizer = C.load_tokenizer()
        self.vae = C.load_vae()
        self.te1, self.te2 = C.build_text_encoders(self.tokenizer, config.seed, config.text_2)
        self.transformer = C.build_transformer(config.seed, config.transformer)
        if config.init_from:
            self.load_exported(Path(config.init_from).expanduser())
        self.teacher = UNetTeacher(Path(config.teacher).expanduser()) if config.teacher else None

    def load_exported(self, folder: Path) -> None:
        """Start from an exported model's weights (a checkpoint in the work dir, if any, still overrides them), and
        keep that model's ``training.json`` as ``init_training.json`` for the card (the folder may be overwritten
        by this run's export)."""
        from diffusers import SD3Transformer2DModel
        from transformers import CLIPTextModelWithProjection

        record = self.work / INIT_RECORD
        if not record.exists() and (folder / "training.json").is_file():
            write_text_atomic(record, (folder / "training.json").read_text())
        self.transformer.load_state_dict(SD3Transformer2DModel.from_pretrained(folder / "transformer").float().state_dict())
        for module, sub in ((self.te1, "text_encoder"), (self.te2, "text_encoder_2")):
            module.load_state_dict(CLIPTextModelWithProjection.from_pretrained(folder / sub).float().state_dict())

    def save_state(self) -> None:
        write_text_atomic(self.state_path, json.dumps(self.state, indent=2))

    # 1. latents
    def stage_latents(self) -> None:
        path = self.work / "latents.pt"
        if path.exists():
            data = torch.load(path)
        else:
            start = time.perf_counter()
            images, labels = draw_dataset(self.config.seed, self.config.images)
            means, stds = [], []
            with torch.no_grad():
                for s in range(0, len(images), 256):
                    posterior = self.vae.encode(C.to_unit(images[s : s + 256])).latent_dist
                    means.append(posterior.mean)
                    stds.append(posterior.std)
            data = {"mean": torch.cat(means), "std": torch.cat(stds), "labels": torch.from_numpy(labels)}
            save_atomic(data, path)
            self.state["seconds"]["latents"] = time.perf_counter() - start
            self.save_state()
            self.echo(f"latents: {len(labels)} pictures in {self.state['seconds']['latents']:.0f} s")
        self.latents = data

    def _tokens(self, labels, drop) -> torch.Tensor:
        texts = ["" if d else caption(int(c)) for c, d in zip(labels, drop)]
        return self.tokenizer(texts, padding="max_length", max_length=C.MAX_TOKENS, truncation=True,
                              return_tensors="pt").input_ids  # fmt: skip

    def params(self) -> list:
        return [*self.transformer.parameters(), *self.te1.parameters(), *self.te2.parameters()]

    def make_ema(self):
        from diffusers.training_utils import EMAModel

        return EMAModel(self.params(), decay=self.config.ema_decay, use_ema_warmup=True, power=0.75)

    def loss(self, step: int) -> torch.Tensor:
        """The rectified-flow loss of step ``step``'s batch (its pictures, captions and noise drawn from the step)."""
        c = self.config
        rng, gen = step_generators(c.seed, step, stage=1 if c.init_from else 0)
        idx = rng.integers(0, len(self.latents["labels"]), c.batch)
        drop = rng.random(c.batch) < c.caption_dropout
        choices = ZERO_TOKENS_MANY if rng.random() < P_MANY else ZERO_TOKENS_FEW
        zero_tokens = int(choices[rng.integers(len(choices))])
        mean, std = self.latents["mean"][idx], self.latents["std"][idx]
        z = mean + std * torch.randn(mean.shape, generator=gen)
        x0 = (z - self.vae.config.shift_factor) * self.vae.config.scaling_factor  # the pipeline's decode inverted
        noise = torch.randn(x0.shape, generator=gen)
        sigma = torch.sigmoid(torch.randn(c.batch, generator=gen))  # logit-normal (0, 1), as SD3
        s = sigma.view(-1, 1, 1, 1)
        xt = (1 - s) * x0 + s * noise
        ids = self._tokens(self.latents["labels"][idx], drop)
        prompt_embeds, pooled = C.encode_text(self.te1, self.te2, ids, zero_tokens)
        pred = self.transformer(
            xt, encoder_hidden_states=prompt_embeds, pooled_projections=pooled, timestep=sigma * 1000
        ).sample  # fmt: skip
        target = noise - x0
        if self.teacher is not None:
            w = c.teacher_weight
            target = w * self.teacher.target(xt, sigma, ids, target) + (1 - w) * target
        return F.mse_loss(pred, target)

    # 2. transformer
    def stage_transformer(self) -> dict:
        c = self.config
        optimizer = torch.optim.AdamW(self.params(), lr=c.lr, weight_decay=1e-2)
        ema = self.make_ema()
        modules = {"transformer": self.transformer, "text_encoder": self.te1, "text_encoder_2": self.te2}
        state = train_loop(
            self.work, modules, optimizer, c.steps, self.loss, c.lr, c.warmup, ema,
            checkpoint_seconds=60 * c.checkpoint_minutes, echo=self.echo, budget_seconds=60 * c.minutes,
        )  # fmt: skip
        self.state["seconds"]["transformer"] = state["seconds"]
        self.save_state()
        return state

    def run(self) -> dict:
        self.stage_latents()
        return self.stage_transformer()


def parse(argv: list[str] | None = None) -> TrainConfig:
    parser = argparse.ArgumentParser(prog="python -m evaluation.shapes_sd3.train", description=__doc__.split("\n\n")[0])
    parser.add_argument("--work-dir", default="~/.cache/tofu-sd/shapes-sd3-train", help="checkpoints, latents, logs")
    for name, default in asdict(TrainConfig("")).items():
        if name != "work_dir" and not isinstance(default, dict):
            parser.add_argument("--" + name.replace("_", "-"), type=type(default), default=default)
    return TrainConfig(**vars(parser.parse_args(argv)))


def main(argv: list[str] | None = None) -> int:
    config = parse(argv)
    if config.threads:
        torch.set_num_threads(config.threads)
    Trainer(config, echo=lambda msg: print(time.strftime("%H:%M:%S"), msg, flush=True)).run()
    return 0


if __name__ == "__main__":
    sys.exit(main())
