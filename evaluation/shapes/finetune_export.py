"""Write a fine-tune (:mod:`.finetune`) into a model folder: its U-Net and text encoder replaced by the run's EMA
weights, everything else kept bit for bit, the fine-tune recorded in ``training.json`` and in the model card.

    python -m evaluation.shapes.finetune_export --work-dir /work/ckpt/tiny-128 --out evaluation/shapes/model --quality

- The weights files keep the folder's format: the same tensor names, shapes, dtypes (the U-Net float16, the text
  encoder float32, as shipped) and safetensors metadata; another architecture is refused. Configs, VAE,
  tokenizer, scheduler and classifier files are copied unchanged; the folder's VAE must be the run's.
- ``training.json``: the starting model's (recorded when the run began), plus ``"finetune"``: the run's options,
  steps at each size, wall times, final loss and, with ``--quality``, prompt accuracy and one-shape fraction at
  64 and 128 px (:mod:`.quality`). ``loss_finetune.png``: its loss.
- ``README.md``: the folder's hand-written card, with a generated section on both stages (replaced by the next
  export; :mod:`.card_finetune`).
- Refused (nothing written) if the folder would exceed the repository's 40 MB limit.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

import torch

from ..files import atomic_path
from . import MAX_BYTES
from .timed_loop import CHECKPOINT
from . import MODEL_DIR
from .data import SIZE
from .export import final_loss, plot_losses
from .finetune import INIT_RECORD, FinetuneConfig, Finetuner, file_digest, low_steps


def folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in Path(folder).rglob("*") if p.is_file())


def load_finetuned(work: Path) -> tuple[Finetuner, dict]:
    """The fine-tuner of the run in ``work`` with its checkpoint's EMA weights loaded, and the checkpoint."""
    work = Path(work).expanduser()
    recorded = json.loads((work / "state.json").read_text())["config"]
    tuner = Finetuner(FinetuneConfig(work_dir=str(work), **recorded), echo=lambda msg: None)
    if not (work / CHECKPOINT).is_file():
        raise SystemExit(f"{work} has no checkpoint yet; run `python -m evaluation.shapes.finetune` first")
    ckpt = torch.load(work / CHECKPOINT, weights_only=False)
    tuner.unet.load_state_dict(ckpt["unet"])
    tuner.text_encoder.load_state_dict(ckpt["text_encoder"])
    ema = tuner.make_ema()
    ema.load_state_dict(ckpt["ema"])
    ema.copy_to(tuner.params())
    return tuner, ckpt


def replace_weights(module: torch.nn.Module, file: Path) -> None:
    """Rewrite the safetensors ``file`` with ``module``'s weights in the file's own names, dtypes and metadata;
    ValueError if the module's tensors are not the file's (another architecture) or do not fit its dtype."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(file, "pt") as f:
        metadata, old = f.metadata(), {k: f.get_slice(k) for k in f.keys()}  # noqa: SIM118 (safe_open has no __iter__)
        layout = {k: (tuple(s.get_shape()), s.get_dtype()) for k, s in old.items()}
    new = module.state_dict()
    if set(new) != set(layout) or any(tuple(new[k].shape) != layout[k][0] for k in layout):
        raise ValueError(f"the fine-tuned weights do not match the tensors of {file}: another architecture")
    dtypes = {"F16": torch.float16, "F32": torch.float32, "BF16": torch.bfloat16, "I64": torch.int64}
    tensors = {k: new[k].detach().to(dtypes[layout[k][1]]).contiguous() for k in layout}
    if not all(torch.isfinite(t).all() for t in tensors.values() if t.is_floating_point()):
        raise ValueError(f"the fine-tuned weights overflow the dtypes of {file}")
    save_file(tensors, file, metadata=metadata)


def summary(tuner: Finetuner, ckpt: dict) -> dict:
    c = tuner.config
    low = low_steps(c, ckpt["step"])
    return {
        "config": tuner.state["config"], "step": ckpt["step"], "steps_64": low, f"steps_{c.size}": ckpt["step"] - low,
        "finished": bool(ckpt.get("finished")), "seconds": {**tuner.state["seconds"], "finetune": ckpt["seconds"]},
        "final_loss_mean_last_100": final_loss(ckpt["log"]) if ckpt["log"] else None,
        "torch": torch.__version__, "threads": c.threads or None,
    }  # fmt: skip


def training_record(tuner: Finetuner, info: dict) -> dict:
    """The starting model's ``training.json`` with this fine-tune as ``"finetune"`` (an earlier fine-tune of the
    starting model moves to ``"finetune_before"``)."""
    record_path = tuner.work / INIT_RECORD
    record = json.loads(record_path.read_text()) if record_path.is_file() else {}
    if "finetune" in record:
        record["finetune_before"] = record.pop("finetune")
    return {**record, "finetune": info}


def export_model(work: Path, out: Path = MODEL_DIR, quality: bool = False, per_class: int = 1) -> dict:
    """Replace the U-Net and text encoder of the model folder ``out`` by the run's EMA weights (see the module
    docstring); ``quality``: measure both sizes on the 48 prompts x ``per_class``. Returns ``training.json``."""
    from .card_finetune import with_section
    from .quality import measure

    tuner, ckpt = load_finetuned(work)
    out = Path(out)
    if not (out / "model_index.json").is_file():
        raise SystemExit(f"{out} holds no exported model to update")
    if file_digest(out / "vae") != tuner.state["vae_sha256"]:
        raise SystemExit(f"the VAE in {out} is not the one the fine-tune's latents were made with")
    info = summary(tuner, ckpt)
    with atomic_path(out) as tmp:
        shutil.copytree(out, tmp, symlinks=True)
        replace_weights(tuner.unet, tmp / "unet" / "diffusion_pytorch_model.safetensors")
        replace_weights(tuner.text_encoder, tmp / "text_encoder" / "model.safetensors")
        plot_losses({"finetune": ckpt["log"]}, tmp / "loss_finetune.png")
        if quality:
            info["quality"] = {str(s): measure(tmp, s, per_class) for s in (SIZE, tuner.config.size)}
        record = training_record(tuner, info)
        (tmp / "training.json").write_text(json.dumps(record, indent=2) + "\n")
        card = tmp / "README.md"
        card.write_text(with_section(card.read_text() if card.is_file() else "", record))
        size = folder_bytes(tmp)
        if size > MAX_BYTES:
            raise SystemExit(f"the exported model is {size / 1e6:.1f} MB, over the {MAX_BYTES / 1e6:.0f} MB limit")
    return record


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m evaluation.shapes.finetune_export", description=__doc__.split("\n\n")[0])
    parser.add_argument("--work-dir", default="~/.cache/tofu-sd/shapes-finetune", help="the fine-tune's folder")
    parser.add_argument("--out", default=str(MODEL_DIR), help="the model folder to update")
    parser.add_argument("--quality", action="store_true", help="measure prompt accuracy and one shape per picture "
                        "at 64 and 128 px (minutes) for the card")  # fmt: skip
    parser.add_argument("--per-class", type=int, default=1, help="--quality: images per prompt")
    parser.add_argument("--threads", type=int, default=0)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    record = export_model(Path(args.work_dir), Path(args.out), quality=args.quality, per_class=args.per_class)
    print(json.dumps(record["finetune"], indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
