"""The stages of the built-in model's training (:mod:`.train`, which runs them from the command line), each
resumable from its last checkpoint in the run's work folder: :class:`TrainConfig`, :class:`Trainer`."""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from torch.nn import functional as F

from .. import archs
from ..files import atomic_path, write_text_atomic
from .classifier import ShapeClassifier
from .components import build_models, build_tokenizer, to_unit
from .data import NUM_CLASSES, caption, draw_dataset
from .export import NOISE, export_model
from .loop import STAGES, run_state, save_atomic, step_generators, train_loop

VALIDATION_IMAGES = 2400  # fresh pictures (seed + 1) on which the classifier's accuracy is reported


@dataclass
class TrainConfig:
    """Options of the training command (defaults: the shipped model)."""

    work_dir: str
    out: str
    seed: int = 0
    images: int = 24000
    vae_steps: int = 1500
    vae_batch: int = 16
    unet_steps: int = 5000
    unet_batch: int = 32
    unet_lr: float = 6e-4
    classifier_steps: int = 4000
    classifier_batch: int = 64
    caption_dropout: float = 0.1
    checkpoint_every: int = 100
    threads: int = 0  # 0: torch's default


class Trainer:
    """The stages of one training run in ``config.work_dir``, each resumable (see the module docstring)."""

    def __init__(self, config: TrainConfig, progress: bool = True) -> None:
        self.config = config
        self.work = Path(config.work_dir).expanduser()
        self.work.mkdir(parents=True, exist_ok=True)
        self.progress = progress
        self.state_path = self.work / "state.json"
        current = {k: v for k, v in asdict(config).items() if k not in ("work_dir", "out", "threads", "checkpoint_every")}
        self.state = run_state(self.state_path, current, "resume with the same options or use a new --work-dir")
        self.state.setdefault("done", [])
        self.state.setdefault("seconds", {})
        self.tokenizer = build_tokenizer(self.work / "tokenizer")
        self.vae, self.unet, self.text_encoder = build_models(self.tokenizer, config.seed)

    def save_state(self) -> None:
        write_text_atomic(self.state_path, json.dumps(self.state, indent=2))

    def _bar(self, stage: str, total: int, initial: int):
        from tqdm.auto import tqdm

        return tqdm(total=total, initial=initial, desc=stage, disable=not self.progress, dynamic_ncols=True)

    def run(self) -> None:
        for stage in STAGES:
            if stage in self.state["done"] and stage != "export":
                self._load_result(stage)
                continue
            start = time.perf_counter()
            getattr(self, f"stage_{stage}")()
            if stage == "vae":
                self._vae_as_shipped()
            self.state["seconds"][stage] = self.state["seconds"].get(stage, 0.0) + time.perf_counter() - start
            if stage not in self.state["done"]:
                self.state["done"].append(stage)
            self.save_state()

    def _load_result(self, stage: str) -> None:
        """Bring a finished stage's result back into memory for the stages after it."""
        if stage == "data":
            self.load_data()
        elif stage == "vae":
            self.vae.load_state_dict(torch.load(self.work / "vae.ckpt", weights_only=False)["model"])
            self.vae.register_to_config(scaling_factor=self.state.get("scaling_factor", 1.0))
            self._vae_as_shipped()
        elif stage == "latents":
            self.latents = torch.load(self.work / "latents.pt")
        elif stage == "unet":
            ckpt = torch.load(self.work / "unet.ckpt", weights_only=False)
            self._restore_ema(ckpt)
        # the classifier is read from its checkpoint at export

    @torch.no_grad()
    def _vae_as_shipped(self) -> None:
        """Round the trained VAE's weights to float16 values, as the model folder stores them (evaluation.weights),
        so that the latents, the U-Net and the classifier are made with the VAE that ships."""
        for param in self.vae.parameters():
            param.copy_(param.to(torch.float16).to(param.dtype))

    def _loop(self, stage: str, modules: dict, optimizer, steps: int, step_fn, lr: float, warmup: int, ema=None):
        """The shared training loop (:func:`.loop.train_loop`) in this run's work folder."""
        return train_loop(
            self.work, stage, modules, optimizer, steps, step_fn, lr, warmup, ema,
            checkpoint_every=self.config.checkpoint_every, make_bar=self._bar,
        )  # fmt: skip

    # 1. data
    def load_data(self) -> None:
        data = np.load(self.work / "data.npz")
        self.images, self.labels = data["images"], data["labels"]

    def stage_data(self) -> None:
        images, labels = draw_dataset(self.config.seed, self.config.images)
        with atomic_path(self.work / "data.npz") as tmp, open(tmp, "wb") as f:
            np.savez(f, images=images, labels=labels)
        self.images, self.labels = images, labels

    # 2. vae
    def stage_vae(self) -> None:
        c = self.config
        vae = self.vae
        optimizer = torch.optim.Adam(vae.parameters(), lr=1e-3)

        def step_fn(step: int):
            rng, gen = step_generators(c.seed, "vae", step)
            x = to_unit(self.images[rng.integers(0, len(self.images), c.vae_batch)])
            posterior = vae.encode(x).latent_dist
            z = posterior.mean + posterior.std * torch.randn(posterior.mean.shape, generator=gen)
            recon = vae.decode(z).sample
            # L1 + MSE (mean squared error) reconstruction, plus a light KL term
            return F.l1_loss(recon, x) + F.mse_loss(recon, x) + 1e-6 * posterior.kl().mean()

        self._loop("vae", {"model": vae}, optimizer, c.vae_steps, step_fn, 1e-3, 100)

    # 3. latents
    @torch.no_grad()
    def stage_latents(self) -> None:
        means, stds = [], []
        bar = self._bar("latents", len(self.images), 0)
        for start in range(0, len(self.images), 256):
            posterior = self.vae.encode(to_unit(self.images[start : start + 256])).latent_dist
            means.append(posterior.mean)
            stds.append(posterior.std)
            bar.update(len(means[-1]))
        bar.close()
        mean, std = torch.cat(means), torch.cat(stds)
        gen = torch.Generator().manual_seed(self.config.seed)
        sample = mean + std * torch.randn(mean.shape, generator=gen)
        scaling = float(1 / sample.std())
        self.latents = {"mean": mean, "std": std}
        save_atomic(self.latents, self.work / "latents.pt")
        self.state["scaling_factor"] = scaling
        self.vae.register_to_config(scaling_factor=scaling)
        recon = self.vae.decode(mean[:512]).sample
        self.state["vae_recon_l1"] = float((recon - to_unit(self.images[:512])).abs().mean() / 2)  # in [0, 1] units

    # 4. unet + text encoder
    def _tokens(self, labels: np.ndarray, drop: np.ndarray) -> torch.Tensor:
        texts = ["" if d else caption(int(c)) for c, d in zip(labels, drop)]
        return self.tokenizer(
            texts, padding="max_length", max_length=archs.SHAPES_MAX_TOKENS, truncation=True, return_tensors="pt"
        ).input_ids

    def _ema(self):
        from diffusers.training_utils import EMAModel

        params = list(self.unet.parameters()) + list(self.text_encoder.parameters())
        return EMAModel(params, decay=0.999, use_ema_warmup=True, power=0.75)

    def _restore_ema(self, ckpt: dict) -> None:
        self.unet.load_state_dict(ckpt["unet"])
        self.text_encoder.load_state_dict(ckpt["text_encoder"])
        ema = self._ema()
        ema.load_state_dict(ckpt["ema"])
        ema.copy_to(list(self.unet.parameters()) + list(self.text_encoder.parameters()))
        self.unet.eval()
        self.text_encoder.eval()

    def stage_unet(self) -> None:
        from diffusers import DDPMScheduler
        from diffusers.training_utils import compute_snr

        c = self.config
        noise = DDPMScheduler(**NOISE)
        scaling = self.vae.config.scaling_factor
        params = list(self.unet.parameters()) + list(self.text_encoder.parameters())
        optimizer = torch.optim.AdamW(params, lr=c.unet_lr, weight_decay=1e-2)
        ema = self._ema()

        def step_fn(step: int):
            rng, gen = step_generators(c.seed, "unet", step)
            idx = rng.integers(0, len(self.labels), c.unet_batch)
            drop = rng.random(c.unet_batch) < c.caption_dropout
            mean, std = self.latents["mean"][idx], self.latents["std"][idx]
            latents = (mean + std * torch.randn(mean.shape, generator=gen)) * scaling
            eps = torch.randn(latents.shape, generator=gen)
            t = torch.randint(0, NOISE["num_train_timesteps"], (c.unet_batch,), generator=gen)
            noisy = noise.add_noise(latents, eps, t)
            text = self.text_encoder(self._tokens(self.labels[idx], drop))[0]
            pred = self.unet(noisy, t, text).sample
            snr = compute_snr(noise, t)
            weight = torch.clamp(snr, max=5.0) / snr  # min-SNR-5 weighting (Hang et al., 2023)
            return (weight * F.mse_loss(pred, eps, reduction="none").mean(dim=(1, 2, 3))).mean()

        self._loop(
            "unet", {"unet": self.unet, "text_encoder": self.text_encoder}, optimizer, c.unet_steps, step_fn,
            c.unet_lr, 200, ema,
        )  # fmt: skip
        self._restore_ema(torch.load(self.work / "unet.ckpt", weights_only=False))

    # 5. classifier
    def stage_classifier(self) -> None:
        c = self.config
        # VAE reconstructions too, so the classifier knows the look of decoded images.
        with torch.no_grad():
            count = min(len(self.images), 3000)
            recon = torch.cat([
                self.vae.decode(self.latents["mean"][s : s + 256]).sample for s in range(0, count, 256)
            ]).clamp(-1, 1).add(1).div(2)  # fmt: skip
        torch.manual_seed(c.seed + 3)
        model = ShapeClassifier(NUM_CLASSES)
        optimizer = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=1e-4)
        labels = torch.from_numpy(self.labels)

        def step_fn(step: int):
            rng, gen = step_generators(c.seed, "classifier", step)
            idx = rng.integers(0, len(self.images), c.classifier_batch)
            x = to_unit(self.images[idx]).add(1).div(2)
            from_recon = torch.from_numpy((rng.random(c.classifier_batch) < 0.5) & (idx < count))
            if from_recon.any():
                x[from_recon] = recon[torch.from_numpy(idx)[from_recon]]
            x = (x + 0.04 * torch.rand(len(x), 1, 1, 1, generator=gen) * torch.randn(x.shape, generator=gen)).clamp(0, 1)
            return F.cross_entropy(model(x), labels[idx])

        self._loop("classifier", {"model": model}, optimizer, c.classifier_steps, step_fn, 2e-3, 50)
        self.classifier = model
        val_images, val_labels = draw_dataset(c.seed + 1, VALIDATION_IMAGES)
        with torch.no_grad():
            pred = torch.cat([
                model(to_unit(val_images[s : s + 256]).add(1).div(2)).argmax(1) for s in range(0, len(val_images), 256)
            ])  # fmt: skip
        self.state["classifier_val_accuracy"] = float((pred == torch.from_numpy(val_labels)).float().mean())

    # 6. export
    def stage_export(self) -> None:
        summary = export_model(self, Path(self.config.out))
        print(json.dumps(summary, indent=2))
