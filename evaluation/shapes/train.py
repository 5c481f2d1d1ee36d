"""Train the built-in text-to-image model and its classifier on procedural shape pictures, on the CPU.

    python -m evaluation.shapes.train --work-dir ~/.cache/tofu-sd/shapes-train --out evaluation/shapes/model

Stages, each resumable from its last checkpoint in ``--work-dir`` (a run can be interrupted and started again
with the same command; finished stages are skipped):

1. ``data``: draw the training pictures (:mod:`evaluation.shapes.data`), deterministic from ``--seed``.
2. ``vae``: an ``AutoencoderKL`` from 64x64 RGB to a 4x16x16 latent (L1 + KL loss).
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

Every random choice of step ``s`` (which pictures, which noise, which timesteps) is drawn from generators seeded
with ``(seed, stage, s)``, so a resumed run takes the same batches as an uninterrupted one.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from torch.nn import functional as F

from .classifier import ShapeClassifier
from .data import NUM_CLASSES, SIZE, caption, draw_dataset

VALIDATION_IMAGES = 2400  # fresh pictures (seed + 1) on which the classifier's accuracy is reported
MAX_TOKENS = 16  # "A high-quality photograph of a purple triangle." is 12 tokens with its start and end
TEXT_DIM = 64

UNET_CONFIG = dict(
    sample_size=SIZE // 4,
    in_channels=4,
    out_channels=4,
    block_out_channels=(48, 96, 128),
    layers_per_block=2,  # as in SD 1.x: 2 transformer blocks down and 3 up at the highest resolution
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    cross_attention_dim=TEXT_DIM,
    attention_head_dim=4,  # diffusers' legacy name: 4 heads
    norm_num_groups=16,
)
VAE_CONFIG = dict(
    in_channels=3,
    out_channels=3,
    down_block_types=("DownEncoderBlock2D",) * 3,
    up_block_types=("UpDecoderBlock2D",) * 3,
    block_out_channels=(32, 64, 64),
    layers_per_block=1,
    latent_channels=4,
    norm_num_groups=16,
    sample_size=SIZE,
)
TEXT_CONFIG = dict(
    hidden_size=TEXT_DIM,
    intermediate_size=4 * TEXT_DIM,
    num_attention_heads=4,
    num_hidden_layers=3,
    max_position_embeddings=MAX_TOKENS,
)
# The noise schedule of Stable Diffusion 1.x.
NOISE = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")


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


STAGES = ("data", "vae", "latents", "unet", "classifier", "export")


def _generator(seed: int, stage: str, step: int) -> tuple[np.random.Generator, torch.Generator]:
    """Generators for step ``step`` of ``stage``: the same on a resumed run as on an uninterrupted one."""
    key = [seed, STAGES.index(stage), step]
    rng = np.random.default_rng(key)
    return rng, torch.Generator().manual_seed(int(np.random.default_rng(key + [1]).integers(2**62)))


def _lr_factor(step: int, total: int, warmup: int) -> float:
    """Linear warm-up, then cosine decay to 10%."""
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress))


def _save_atomic(obj, path: Path) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


# ---------------------------------------------------------------- components


def build_tokenizer(folder: Path):
    """A CLIPTokenizer whose byte-pair merges make each word of the captions one token.

    The merges are learned here by plain BPE on the caption words (every other word still tokenizes, character
    by character), written as ``vocab.json`` and ``merges.txt``, and loaded by the real ``CLIPTokenizer``.
    """
    import re
    import string
    from collections import Counter

    from transformers import CLIPTokenizer

    words = Counter()
    for c in range(NUM_CLASSES):
        for word in re.findall(r"[a-z]+|[^\sa-z]+", caption(c).lower()):
            words[word] += 1
    vocab: dict[str, int] = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for ch in sorted(set(string.printable) - set(string.whitespace)):
        for symbol in (ch, ch + "</w>"):
            vocab.setdefault(symbol, len(vocab))
    split = {w: [*w[:-1], w[-1] + "</w>"] for w in words}
    merges: list[tuple[str, str]] = []
    while True:
        pairs = Counter()
        for w, symbols in split.items():
            for pair in zip(symbols, symbols[1:]):
                pairs[pair] += words[w]
        if not pairs:
            break
        best = max(pairs, key=lambda p: (pairs[p], p))  # ties broken by the pair itself: deterministic
        merges.append(best)
        vocab.setdefault(best[0] + best[1], len(vocab))
        for w, symbols in split.items():
            out, i = [], 0
            while i < len(symbols):
                if i + 1 < len(symbols) and (symbols[i], symbols[i + 1]) == best:
                    out.append(symbols[i] + symbols[i + 1])
                    i += 2
                else:
                    out.append(symbols[i])
                    i += 1
            split[w] = out
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges))
    return CLIPTokenizer(
        str(folder / "vocab.json"), str(folder / "merges.txt"), pad_token="<|endoftext|>", model_max_length=MAX_TOKENS
    )


def build_models(tokenizer, seed: int):
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(seed)
    vae = AutoencoderKL(**VAE_CONFIG)
    torch.manual_seed(seed + 1)
    unet = UNet2DConditionModel(**UNET_CONFIG)
    torch.manual_seed(seed + 2)
    text_encoder = CLIPTextModel(
        CLIPTextConfig(vocab_size=len(tokenizer), bos_token_id=0, eos_token_id=1, pad_token_id=1, **TEXT_CONFIG)
    )
    return vae, unet, text_encoder


def _to_unit(images: np.ndarray) -> torch.Tensor:
    """uint8 ``(B, H, W, 3)`` -> float ``(B, 3, H, W)`` in [-1, 1]."""
    return torch.from_numpy(images).permute(0, 3, 1, 2).float().div(127.5).sub(1)


# ---------------------------------------------------------------- stages


class Trainer:
    def __init__(self, config: TrainConfig, progress: bool = True) -> None:
        self.config = config
        self.work = Path(config.work_dir).expanduser()
        self.work.mkdir(parents=True, exist_ok=True)
        self.progress = progress
        self.state_path = self.work / "state.json"
        self.state = json.loads(self.state_path.read_text()) if self.state_path.exists() else {}
        recorded = self.state.get("config")
        current = {k: v for k, v in asdict(config).items() if k not in ("work_dir", "out", "threads", "checkpoint_every")}
        if recorded is not None and recorded != current:
            diff = {k: (recorded.get(k), v) for k, v in current.items() if recorded.get(k) != v}
            raise SystemExit(
                f"{self.work} holds a run with other options {diff}; resume with the same options or use a new --work-dir"
            )
        self.state.setdefault("config", current)
        self.state.setdefault("done", [])
        self.state.setdefault("seconds", {})
        self.tokenizer = build_tokenizer(self.work / "tokenizer")
        self.vae, self.unet, self.text_encoder = build_models(self.tokenizer, config.seed)

    def _save_state(self) -> None:
        tmp = self.state_path.with_name(".state.json.tmp")
        tmp.write_text(json.dumps(self.state, indent=2))
        os.replace(tmp, self.state_path)

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
            self.state["seconds"][stage] = self.state["seconds"].get(stage, 0.0) + time.perf_counter() - start
            if stage not in self.state["done"]:
                self.state["done"].append(stage)
            self._save_state()

    def _load_result(self, stage: str) -> None:
        """Bring a finished stage's result back into memory for the stages after it."""
        if stage == "data":
            self._load_data()
        elif stage == "vae":
            self.vae.load_state_dict(torch.load(self.work / "vae.ckpt", weights_only=False)["model"])
            self.vae.register_to_config(scaling_factor=self.state.get("scaling_factor", 1.0))
        elif stage == "latents":
            self.latents = torch.load(self.work / "latents.pt")
        elif stage == "unet":
            ckpt = torch.load(self.work / "unet.ckpt", weights_only=False)
            self._restore_ema(ckpt)
        # the classifier is read from its checkpoint at export

    # 1. data
    def _load_data(self) -> None:
        data = np.load(self.work / "data.npz")
        self.images, self.labels = data["images"], data["labels"]

    def stage_data(self) -> None:
        images, labels = draw_dataset(self.config.seed, self.config.images)
        tmp = self.work / ".data.tmp.npz"
        np.savez(tmp, images=images, labels=labels)
        os.replace(tmp, self.work / "data.npz")
        self.images, self.labels = images, labels

    # shared training loop
    def _loop(self, stage: str, modules: dict, optimizer, steps: int, step_fn, lr: float, warmup: int, ema=None):
        path = self.work / f"{stage}.ckpt"
        log: list[tuple[int, float]] = []
        start = 0
        if path.exists():
            ckpt = torch.load(path, weights_only=False)
            for name, module in modules.items():
                module.load_state_dict(ckpt[name])
            optimizer.load_state_dict(ckpt["optimizer"])
            if ema is not None:
                ema.load_state_dict(ckpt["ema"])
            start, log = ckpt["step"], ckpt["log"]

        def save(step: int) -> None:
            ckpt = {name: module.state_dict() for name, module in modules.items()}
            ckpt.update(optimizer=optimizer.state_dict(), step=step, log=log)
            if ema is not None:
                ckpt["ema"] = ema.state_dict()
            _save_atomic(ckpt, path)
            self._write_log(stage, log)

        for module in modules.values():
            module.train()
        bar = self._bar(stage, steps, start)
        running = None
        for step in range(start, steps):
            for group in optimizer.param_groups:
                group["lr"] = lr * _lr_factor(step, steps, warmup)
            loss = step_fn(step)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_([p for g in optimizer.param_groups for p in g["params"]], 1.0)
            optimizer.step()
            if ema is not None:
                ema.step([p for g in optimizer.param_groups for p in g["params"]])
            value = float(loss.detach())
            if not math.isfinite(value):
                raise SystemExit(f"{stage}: loss became {value} at step {step}; lower the learning rate")
            log.append((step, value))
            running = value if running is None else 0.98 * running + 0.02 * value
            bar.update(1)
            bar.set_postfix(loss=f"{running:.4f}")
            if (step + 1) % self.config.checkpoint_every == 0 or step + 1 == steps:
                save(step + 1)
        bar.close()
        for module in modules.values():
            module.eval()
        return log

    def _write_log(self, stage: str, log) -> None:
        tmp = self.work / f".loss_{stage}.csv.tmp"
        tmp.write_text("step,loss\n" + "".join(f"{s},{v:.6f}\n" for s, v in log))
        os.replace(tmp, self.work / f"loss_{stage}.csv")

    # 2. vae
    def stage_vae(self) -> None:
        c = self.config
        vae = self.vae
        optimizer = torch.optim.Adam(vae.parameters(), lr=1e-3)

        def step_fn(step: int):
            rng, gen = _generator(c.seed, "vae", step)
            x = _to_unit(self.images[rng.integers(0, len(self.images), c.vae_batch)])
            posterior = vae.encode(x).latent_dist
            z = posterior.mean + posterior.std * torch.randn(posterior.mean.shape, generator=gen)
            recon = vae.decode(z).sample
            return F.l1_loss(recon, x) + F.mse_loss(recon, x) + 1e-6 * posterior.kl().mean()

        self._loop("vae", {"model": vae}, optimizer, c.vae_steps, step_fn, 1e-3, 100)

    # 3. latents
    @torch.no_grad()
    def stage_latents(self) -> None:
        means, stds = [], []
        bar = self._bar("latents", len(self.images), 0)
        for start in range(0, len(self.images), 256):
            posterior = self.vae.encode(_to_unit(self.images[start : start + 256])).latent_dist
            means.append(posterior.mean)
            stds.append(posterior.std)
            bar.update(len(means[-1]))
        bar.close()
        mean, std = torch.cat(means), torch.cat(stds)
        gen = torch.Generator().manual_seed(self.config.seed)
        sample = mean + std * torch.randn(mean.shape, generator=gen)
        scaling = float(1 / sample.std())
        self.latents = {"mean": mean, "std": std}
        _save_atomic(self.latents, self.work / "latents.pt")
        self.state["scaling_factor"] = scaling
        self.vae.register_to_config(scaling_factor=scaling)
        recon = self.vae.decode(mean[:512]).sample
        self.state["vae_recon_l1"] = float((recon - _to_unit(self.images[:512])).abs().mean() / 2)  # in [0, 1] units

    # 4. unet + text encoder
    def _tokens(self, labels: np.ndarray, drop: np.ndarray) -> torch.Tensor:
        texts = ["" if d else caption(int(c)) for c, d in zip(labels, drop)]
        return self.tokenizer(texts, padding="max_length", max_length=MAX_TOKENS, truncation=True, return_tensors="pt").input_ids

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
            rng, gen = _generator(c.seed, "unet", step)
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
            rng, gen = _generator(c.seed, "classifier", step)
            idx = rng.integers(0, len(self.images), c.classifier_batch)
            x = _to_unit(self.images[idx]).add(1).div(2)
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
                model(_to_unit(val_images[s : s + 256]).add(1).div(2)).argmax(1) for s in range(0, len(val_images), 256)
            ])  # fmt: skip
        self.state["classifier_val_accuracy"] = float((pred == torch.from_numpy(val_labels)).float().mean())

    # 6. export
    def stage_export(self) -> None:
        from diffusers import DPMSolverMultistepScheduler, StableDiffusionPipeline

        out = Path(self.config.out)
        classifier = ShapeClassifier(NUM_CLASSES)
        classifier.load_state_dict(torch.load(self.work / "classifier.ckpt", weights_only=False)["model"])
        scheduler = DPMSolverMultistepScheduler(**NOISE, steps_offset=1)
        pipe = StableDiffusionPipeline(
            vae=self.vae, text_encoder=self.text_encoder, tokenizer=self.tokenizer, unet=self.unet, scheduler=scheduler,
            safety_checker=None, feature_extractor=None, requires_safety_checker=False,
        )  # fmt: skip
        tmp = out.with_name(f".{out.name}.tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        pipe.save_pretrained(tmp, safe_serialization=True)
        classifier.eval().save(tmp)
        losses = {}
        for stage in ("vae", "unet", "classifier"):
            log = torch.load(self.work / f"{stage}.ckpt", weights_only=False)["log"]
            losses[stage] = log
        _plot_losses(losses, tmp / "loss.png")
        final = {s: float(np.mean([v for _, v in log[-100:]])) for s, log in losses.items()}
        summary = {
            "config": self.state["config"],
            "seconds": self.state["seconds"],
            "scaling_factor": self.state.get("scaling_factor"),
            "vae_recon_l1": self.state.get("vae_recon_l1"),
            "classifier_val_accuracy": self.state.get("classifier_val_accuracy"),
            "final_loss_mean_last_100": final,
            "parameters": {
                "unet": sum(p.numel() for p in self.unet.parameters()),
                "vae": sum(p.numel() for p in self.vae.parameters()),
                "text_encoder": sum(p.numel() for p in self.text_encoder.parameters()),
                "classifier": sum(p.numel() for p in classifier.parameters()),
            },
            "torch": torch.__version__,
            "threads": torch.get_num_threads(),
        }
        (tmp / "training.json").write_text(json.dumps(summary, indent=2) + "\n")
        card = out / "README.md"
        if card.exists():  # the model card is written by hand; keep it
            shutil.copy(card, tmp / "README.md")
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
        print(json.dumps(summary, indent=2))


def retrain_classifier(config: TrainConfig, progress: bool = True) -> dict:
    """Train the classifier again for the finished model in ``config.out`` (its VAE), and replace it there."""
    from diffusers import AutoencoderKL

    out = Path(config.out)
    summary_path = out / "training.json"
    if not (out / "vae").is_dir() or not summary_path.is_file():
        raise SystemExit(f"{out} holds no finished model (vae/ and training.json); train the whole model first")
    sub = TrainConfig(**{**asdict(config), "work_dir": str(Path(config.work_dir).expanduser() / "classifier-only")})
    trainer = Trainer(sub, progress=progress)
    trainer.vae = AutoencoderKL.from_pretrained(out / "vae").eval()
    if "data" in trainer.state["done"]:
        trainer._load_data()
    else:
        trainer.stage_data()
        trainer.state["done"].append("data")
    with torch.no_grad():  # the classifier stage decodes the means of the first pictures' latents
        count = min(len(trainer.images), 3000)
        trainer.latents = {"mean": torch.cat([
            trainer.vae.encode(_to_unit(trainer.images[s : min(s + 256, count)])).latent_dist.mean
            for s in range(0, count, 256)
        ])}  # fmt: skip
    start = time.perf_counter()
    trainer.stage_classifier()
    seconds = time.perf_counter() - start
    trainer._save_state()
    tmp = out.with_name(f".{out.name}.classifier.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    trainer.classifier.eval().save(tmp)
    log = torch.load(trainer.work / "classifier.ckpt", weights_only=False)["log"]
    _plot_losses({"classifier": log}, tmp / "loss_classifier.png")
    summary = json.loads(summary_path.read_text())
    summary["config"]["classifier_steps"] = config.classifier_steps
    summary["config"]["classifier_batch"] = config.classifier_batch
    summary["seconds"]["classifier"] = seconds
    summary["classifier_val_accuracy"] = trainer.state["classifier_val_accuracy"]
    summary["final_loss_mean_last_100"]["classifier"] = float(np.mean([v for _, v in log[-100:]]))
    summary["classifier_trained_separately"] = {"command": "--classifier-only", "threads": torch.get_num_threads()}
    (tmp / "training.json").write_text(json.dumps(summary, indent=2) + "\n")
    for path in tmp.iterdir():
        os.replace(path, out / path.name)
    tmp.rmdir()
    print(json.dumps({k: summary[k] for k in ("classifier_val_accuracy",)} | {"seconds": seconds}, indent=2))
    return summary


def _plot_losses(losses: dict[str, list[tuple[int, float]]], path: Path) -> None:
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
        ax.set_title({"vae": "VAE (L1 + L2 + KL)", "unet": "U-Net + text encoder (min-SNR eps)", "classifier": "classifier (CE)"}[stage])
        ax.set_xlabel("step")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


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
