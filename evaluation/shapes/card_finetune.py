"""The model card's section on a fine-tune of the built-in U-Net model (:mod:`.finetune`): both training stages and,
if measured, the quality at each size; written into the hand-written card by :mod:`.finetune_export`."""

from __future__ import annotations

SECTION_START = "<!-- fine-tune: written by `python -m evaluation.shapes.finetune_export`; replaced by the next export -->"
SECTION_END = "<!-- /fine-tune -->"

SECTION = """\
## Fine-tuned to draw at {size} px

The U-Net and the text encoder of this folder were trained in two stages; the VAE, tokenizer, scheduler and
classifier are the first stage's, unchanged (bit for bit). Draw at {size} px with
`pipe(prompt, height={size}, width={size})` (a {latent}x{latent} latent: **{tokens:,} tokens** at the U-Net's
first level); the default size stays 64 px.

| stage | data | steps x batch | learning rate | wall time | final loss |
|---|---|---|---|---|---|
| 1: from scratch (above) | 64-px pictures | {first_steps} | {first_lr} | {first_min} | {first_loss} |
| 2: fine-tune of stage 1's EMA weights | the first {images:,} pictures drawn at {size} px and at 64 px | {low:,} x {batch_64} at 64 px + {high:,} x {batch} at {size} px{unfinished} | AdamW {lr:g}, warm-up {warmup}, cosine to 10% over {budget} | {min:.0f} min | {loss} |

Stage 2 (`python -m evaluation.shapes.finetune --work-dir W{minutes_flag}`, then
`python -m evaluation.shapes.finetune_export --work-dir W --quality`): the objective of stage 1 (epsilon, min-SNR-5,
{dropout:.0%} empty captions), a new optimizer, EMA (decay {ema}, with warm-up) shipped, the U-Net stored as
float16 as before. Each step's batch has one size: 64 px with probability {share:.0%}, to keep the 64-px quality
at a small cost (a 64-px picture costs far less than a {size}-px one). The pictures are the stage-1 data set's
(seed {seed}), drawn at both sizes and encoded once by the frozen VAE. {machine}

![fine-tune loss](loss_finetune.png)

{quality}
"""


def _quality(record: dict) -> str:
    q = record.get("quality")
    if not q:
        return "Quality: not measured at export (`--quality` measures it)."
    lines = [
        "| size | images (48 prompts x seeds) | prompt accuracy | colour right | shape right | one shape per picture |",
        "|---|---|---|---|---|---|",
    ]
    for size, m in sorted(q.items(), key=lambda kv: int(kv[0])):
        lines.append(f"| {size} px | {m['images']} | **{m['prompt_accuracy']:.1%}** | {m['colour_accuracy']:.1%} | "
                     f"{m['shape_accuracy']:.1%} | {m['one_shape']:.1%} |")  # fmt: skip
    m = next(iter(q.values()))
    return (
        f"Quality ({m['steps']} DPM-Solver++ steps, guidance {m['guidance']:g}, seeds from {m['seed']}; "
        "`evaluation/shapes/quality.py`): the shipped classifier names the class of each full image, a larger one "
        "first reduced to 64x64 by averaging its 2x2 (or larger) blocks; \"one shape\": the fraction of pictures "
        "with exactly one coloured component apart from the background estimated from the border.\n\n"
        + "\n".join(lines)
    )


def section(record: dict) -> str:
    """The card section for a ``training.json`` record with a ``"finetune"`` entry."""
    f = record["finetune"]
    c = f["config"]
    first = record.get("config", {})
    first_s = record.get("seconds", {}).get("unet")
    first_loss = record.get("final_loss_mean_last_100", {}).get("unet")
    budget = f"a {c['minutes']:g}-minute budget" if c["minutes"] else f"{c['steps']:,} steps"
    latent = c["size"] // 4  # the VAE reduces by 4 (64 px -> 16x16)
    return SECTION.format(
        size=c["size"], latent=latent, tokens=latent * latent, images=c["images"], low=f["steps_64"],
        high=f[f"steps_{c['size']}"], batch=c["batch"], batch_64=c["batch_64"], lr=c["lr"], warmup=c["warmup"],
        budget=budget, min=f["seconds"]["finetune"] / 60, unfinished="" if f["finished"] else " (unfinished)",
        loss="?" if f["final_loss_mean_last_100"] is None else f"{f['final_loss_mean_last_100']:.4f}",
        first_steps=f"{first['unet_steps']:,} x {first['unet_batch']}" if "unet_steps" in first else "?",
        first_lr=f"AdamW {first['unet_lr']:g}, warm-up 200, cosine to 10% over the steps" if "unet_lr" in first else "?",
        first_min="?" if first_s is None else f"{first_s / 60:.0f} min",
        first_loss="?" if first_loss is None else f"{first_loss:.4f}", minutes_flag=f" --minutes {c['minutes']:g}",
        dropout=c["caption_dropout"], ema=c["ema_decay"], share=c["share_64"], seed=c["seed"],
        machine=f"torch {f['torch']}, {f['threads'] or 'default'} thread(s).", quality=_quality(f),
    )  # fmt: skip


def with_section(card: str, record: dict) -> str:
    """``card`` with its fine-tune section replaced by the one for ``record`` (appended if it has none)."""
    block = f"{SECTION_START}\n{section(record)}{SECTION_END}\n"
    if SECTION_START in card and SECTION_END in card:
        head, rest = card.split(SECTION_START, 1)
        return head + block + rest.split(SECTION_END, 1)[1].lstrip("\n")
    return card.rstrip("\n") + "\n\n" + block
