"""Write the SD3-style model from a training checkpoint: a ``StableDiffusion3Pipeline`` folder (safetensors, the
EMA weights), ``training.json``, ``loss.png`` and the model card ``README.md`` (:mod:`.card`, filled in with the
run's numbers; ``--quality`` adds the prompt accuracy and ``samples.png``).

    python -m evaluation.shapes_sd3.export --work-dir /work/ckpt/tiny-sd3 --out evaluation/shapes_sd3/model --quality

An unfinished run's checkpoint exports too (``training.json`` says which step), e.g. to check samples midway.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch

from ..files import atomic_path
from ..weights import halve_components, link_weights, same_weights
from . import CALL_KWARGS, DEFAULT_GUIDANCE, DEFAULT_STEPS, MAX_BYTES, MODEL_DIR
from . import components as C
from .loop import CHECKPOINT

LOSS_TITLE = "MMDiT + text encoders (rectified flow, v = noise - x0)"


def folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in Path(folder).rglob("*") if p.is_file())


def plot_loss(log: list[tuple[int, float]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = np.array([s for s, _ in log])
    values = np.array([v for _, v in log])
    fig, ax = plt.subplots(figsize=(6, 3.6))
    ax.plot(steps, values, color="0.8", lw=0.6, label="per step")
    if len(values) >= 50:
        ax.plot(steps[49:], np.convolve(values, np.ones(50) / 50, mode="valid"), color="C0", lw=1.5, label="mean of 50")
    ax.set_yscale("log")
    ax.set_title(LOSS_TITLE, fontsize=10)
    ax.set_xlabel("step")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def load_trained(work: Path):
    """The trainer of the run in ``work`` with its checkpoint's EMA weights loaded, and the checkpoint."""
    from .train import TrainConfig, Trainer

    work = Path(work).expanduser()
    recorded = json.loads((work / "state.json").read_text())["config"]
    config = TrainConfig(work_dir=str(work), **recorded)
    config.transformer["dual_attention_layers"] = tuple(config.transformer["dual_attention_layers"])
    trainer = Trainer(config, echo=lambda msg: None)
    ckpt = torch.load(work / CHECKPOINT, weights_only=False)
    trainer.transformer.load_state_dict(ckpt["transformer"])
    trainer.te1.load_state_dict(ckpt["text_encoder"])
    trainer.te2.load_state_dict(ckpt["text_encoder_2"])
    ema = trainer.make_ema()
    ema.load_state_dict(ckpt["ema"])
    ema.copy_to(trainer.params())
    for module in (trainer.transformer, trainer.te1, trainer.te2):
        module.eval().requires_grad_(False)
    return trainer, ckpt


def build_pipeline(trainer):
    from diffusers import FlowMatchEulerDiscreteScheduler, StableDiffusion3Pipeline

    return StableDiffusion3Pipeline(
        transformer=trainer.transformer, scheduler=FlowMatchEulerDiscreteScheduler(**C.SCHEDULER), vae=trainer.vae,
        text_encoder=trainer.te1, tokenizer=trainer.tokenizer, text_encoder_2=trainer.te2,
        tokenizer_2=trainer.tokenizer, text_encoder_3=None, tokenizer_3=None,
    )  # fmt: skip


def summary(trainer, ckpt: dict) -> dict:
    log = ckpt["log"]
    count = lambda m: sum(p.numel() for p in m.parameters())
    return {
        "config": trainer.state["config"],
        "step": ckpt["step"],
        "finished": bool(ckpt.get("finished")),
        "seconds": {**trainer.state["seconds"], "transformer": ckpt["seconds"]},
        "final_loss_mean_last_100": float(np.mean([v for _, v in log[-100:]])) if log else None,
        "parameters": {
            "transformer": count(trainer.transformer),
            "text_encoder": count(trainer.te1),
            "text_encoder_2": count(trainer.te2),
            "vae": count(trainer.vae),
        },
        "scheduler": C.SCHEDULER,
        "vae": {"scaling_factor": trainer.vae.config.scaling_factor, "shift_factor": trainer.vae.config.shift_factor},
        "torch": torch.__version__,
        "threads": trainer.config.threads or None,
        **_continued(trainer),
    }


def _continued(trainer) -> dict:
    """``{"continues": <the training.json of the model this run started from>}`` for an ``init_from`` run."""
    from .train import INIT_RECORD

    record = trainer.work / INIT_RECORD
    return {"continues": json.loads(record.read_text())} if trainer.config.init_from and record.is_file() else {}


def measure_quality(folder: Path, per_class: int = 2, steps: int = DEFAULT_STEPS, guidance: float = DEFAULT_GUIDANCE,
                    seed: int = 1, grid: Path | None = None) -> dict:  # fmt: skip
    """Prompt accuracy of the model in ``folder`` (with guidance and without), and a grid of the guided images."""
    from ..shapes.data import NUM_CLASSES
    from . import load_pipeline
    from .quality import generate, prompt_accuracy, save_grid

    pipe = load_pipeline("cpu", folder=folder)
    classes = list(range(NUM_CLASSES))
    labels = np.repeat(classes, per_class)
    images = generate(pipe, classes, per_class, steps, guidance, seed)
    accuracy, pred = prompt_accuracy(images, labels)
    plain, _ = prompt_accuracy(generate(pipe, classes, per_class, steps, 1.0, seed), labels)
    if grid is not None:  # the first image of each prompt: a row per two colours
        save_grid(images[::per_class], 12, grid, scale=1)
    return {
        "prompt_accuracy": accuracy, "colour_accuracy": float((pred // 6 == labels // 6).mean()),
        "shape_accuracy": float((pred % 6 == labels % 6).mean()), "prompt_accuracy_no_guidance": plain,
        "images": len(images), "seed": seed, "steps": steps, "guidance": guidance,
        "max_sequence_length": CALL_KWARGS["max_sequence_length"],
    }  # fmt: skip


def store_compactly(folder: Path, final: Path) -> None:
    """Store the exported ``folder`` (to be moved to ``final``) as the repository ships it: the transformer and the
    VAE as float16 (loaded as float32), and the VAE's weights, when they are the built-in ``tiny`` model's (the
    trainer starts from that VAE and keeps it frozen), as a link to that model's file instead of a copy."""
    from ..shapes import MODEL_DIR as SHAPES_DIR

    halve_components(folder, ("transformer", "vae"))
    if same_weights(folder / "vae", SHAPES_DIR / "vae"):
        link_weights(folder / "vae", SHAPES_DIR / "vae", Path(final) / "vae")


def export_model(work: Path, out: Path, quality: bool = False, per_class: int = 2, machine: str | None = None) -> dict:
    """Write the checkpoint in ``work`` to ``out`` (replacing it): the pipeline, ``training.json``, ``loss.png``
    and the model card ``README.md`` (:mod:`.card`); with ``quality``, also the prompt accuracy (in both) and a
    grid of samples, ``samples.png``; ``machine``: the card's words on where and how it was trained (default
    :data:`.card.MACHINE`). Returns the summary written as ``training.json``."""
    from .card import render

    trainer, ckpt = load_trained(work)
    pipe = build_pipeline(trainer)
    out = Path(out)
    info = summary(trainer, ckpt)
    with atomic_path(out) as tmp:
        pipe.save_pretrained(tmp, safe_serialization=True)
        store_compactly(tmp, out)
        plot_loss(ckpt["log"], tmp / "loss.png")
        if quality:
            info["quality"] = measure_quality(tmp, per_class=per_class, grid=tmp / "samples.png")
        (tmp / "training.json").write_text(json.dumps(info, indent=2) + "\n")
        card = render(info, folder_bytes(tmp), **({} if machine is None else {"machine": machine}))
        if quality:
            card = card.replace("\n## Quality\n\n", "\n## Quality\n\n![samples: one per prompt, a row per two colours](samples.png)\n\n")
        (tmp / "README.md").write_text(card)
        for path in tmp.rglob("*"):
            path.chmod(0o755 if path.is_dir() else 0o644)
        size = folder_bytes(tmp)
        if size > MAX_BYTES:
            raise SystemExit(f"the exported model is {size / 1e6:.1f} MB, over the {MAX_BYTES / 1e6:.0f} MB limit")
    return info


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m evaluation.shapes_sd3.export", description=__doc__.split("\n\n")[0])
    parser.add_argument("--work-dir", default="~/.cache/tofu-sd/shapes-sd3-train", help="the training run's folder")
    parser.add_argument("--out", default=str(MODEL_DIR), help="the model folder to write")
    parser.add_argument("--quality", action="store_true", help="measure prompt accuracy (minutes) for the card")
    parser.add_argument("--per-class", type=int, default=2, help="--quality: images per prompt")
    parser.add_argument("--threads", type=int, default=0)
    parser.add_argument("--machine", default=None, help="the card's words on the machine and load of the training "
                        "({torch} and {diffusers} are filled in)")  # fmt: skip
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    info = export_model(Path(args.work_dir).expanduser(), Path(args.out), quality=args.quality, per_class=args.per_class,
                        machine=args.machine)  # fmt: skip
    print(json.dumps(info, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
