"""The model card (``README.md``) of the SD3-style built-in model, filled in by :mod:`.export` from the run's
``training.json`` summary (steps, wall times, losses, parameter counts, prompt accuracy if measured)."""

from __future__ import annotations

CARD = """\
# tofu-sd built-in model: `tiny-sd3` (coloured shapes, SD3-style MMDiT)

A small Stable Diffusion 3 style text-to-image model, trained on this project's CPU machine from the same
procedurally drawn pictures as the `tiny` U-Net model (`evaluation/shapes/`), so that token reduction on a
diffusion **transformer** (SD3's MMDiT: joint attention over image and text tokens, SD3.5's RMS q/k norm and
dual attention) can be run, tested and compared offline on a real, trained network. Load it as diffusers loads
SD3 without its T5 encoder:

```python
from diffusers import StableDiffusion3Pipeline
pipe = StableDiffusion3Pipeline.from_pretrained(
    "evaluation/shapes_sd3/model", text_encoder_3=None, tokenizer_3=None)   # or evaluation.shapes_sd3.load_pipeline()
image = pipe("A high-quality photograph of a red star.", num_inference_steps=20, guidance_scale=5.0,
             max_sequence_length=16).images[0]   # 64x64
```

`text_encoder_3=None, tokenizer_3=None` must be passed: the folder has no T5 (`model_index.json` names none), and
diffusers 0.42 refuses a missing `text_encoder_3` otherwise. Without T5 the pipeline appends
`max_sequence_length` **zero** tokens (width `joint_attention_dim`) to the 16 CLIP tokens. The model was trained
with 0 to 256 of them (each step drew one number: 90% from 0, 1, 2, 4, 8, 16; 10% from 32, 64, 128, 256), so any
of these works; pass `max_sequence_length=16` (`evaluation.shapes_sd3.CALL_KWARGS`): 32 text tokens beside the
256 image tokens. The pipeline's default, 256, works too but doubles the joint sequence with constant tokens.

**What it is:** a real `StableDiffusion3Pipeline` (`SD3Transformer2DModel`, two `CLIPTextModelWithProjection` +
`CLIPTokenizer`, no T5, `AutoencoderKL`, `FlowMatchEulerDiscreteScheduler`), saved with `save_pretrained` as
safetensors, {size_mb:.1f} MB in all (transformer and VAE stored as float16, loaded as float32; the VAE's
weights are a link to the `tiny` model's file, so the repository holds them once). Patch size 1 on a 16x16 latent: **256 image tokens** in each of its {layers}
joint blocks. **What it is not:** a general image model. It knows the 48 prompts of the `shapes` prompt set,
"A high-quality photograph of a {{colour}} {{shape}}." (8 colours x 6 shapes), as `--model tiny` does, and draws
64x64 pictures of one shape on a plain or gradient background. Its timings say nothing about SD3's speed.

## Data

The `--model tiny` training set (`evaluation/shapes/data.py`, seed 0): {images:,} pictures ({per_class:,} per class), one
shape of the class's colour at a random size, position and rotation on a plain or gradient background. Caption:
the prompt of its class, and the empty caption for {dropout:.0%} of the samples (classifier-free guidance).
The pictures are encoded once by the shipped VAE (posterior mean and std kept; each step samples a latent).

## Architecture

| part | configuration | parameters |
|---|---|---|
| transformer (`SD3Transformer2DModel`) | {layers} joint (MMDiT) blocks, width {width} ({heads} heads of {head_dim}), patch size 1 on 16x16x4 (256 image tokens), `qk_norm="rms_norm"`, dual attention (SD3.5) in block(s) {dual}, `joint_attention_dim` {joint}, pooled {pooled}, the last block context-pre-only as in SD3 | {p_transformer:.2f} M |
| `text_encoder` (CLIP-L's role) | `CLIPTextModelWithProjection`: the `tiny` model's trained `CLIPTextModel` (3 layers, width 64, 4 heads, 16 positions) plus a new projection to 64, trained further here | {p_te1:.2f} M |
| `text_encoder_2` (CLIP-G's role) | `CLIPTextModelWithProjection`, new: 2 layers, width 64, 4 heads, projection 64 | {p_te2:.2f} M |
| `text_encoder_3` (T5) | none: zero tokens (see above) | |
| tokenizers | the `tiny` model's `CLIPTokenizer` (each caption word one token, 16 positions), as `tokenizer` and `tokenizer_2` | |
| VAE (`AutoencoderKL`) | the `tiny` model's, frozen: 64x64x3 -> 16x16x4, `scaling_factor` {scaling:.3f}, `shift_factor` 0.0 (added here: SD3's pipeline decodes `latents / scaling_factor + shift_factor`) | {p_vae:.2f} M |
| scheduler | `FlowMatchEulerDiscreteScheduler`, shift {shift} (no timestep shift: a 16x16 latent needs none; SD3 uses 3.0 at 128x128) | |

The text stream: the penultimate hidden states of both CLIP encoders side by side (64 + 64 = 128 =
`joint_attention_dim`, so no zero padding of features), then the zero "T5" tokens; pooled: both projections side
by side (128).

## Training

Resumable (a checkpoint with optimizer and EMA state every 4 minutes in `--work-dir`; the same command continues):

```bash
OMP_NUM_THREADS=1 nice -n 10 python -m evaluation.shapes_sd3.train --work-dir /work/ckpt/tiny-sd3 --threads 1
python -m evaluation.shapes_sd3.export --work-dir /work/ckpt/tiny-sd3 --out evaluation/shapes_sd3/model --quality
```

- Objective: SD3's rectified flow. `x_t = (1 - sigma) x_0 + sigma noise`, the transformer predicts
  `noise - x_0` (MSE, unweighted), `sigma` logit-normal (mean 0, std 1), timestep `1000 sigma`; latents
  `x_0 = (z - shift_factor) * scaling_factor`, the inverse of the pipeline's decode. With `--teacher` (a stage
  below says where), the regression target is not the drawn `noise - x_0` but the `tiny` U-Net model's estimate
  of it (its epsilon prediction at the DDPM timestep of the same signal-to-noise ratio,
  `evaluation/shapes_sd3/teacher.py`): the same mean with far less variance, so the shapes are learnt in fewer
  steps, and a student that draws what the U-Net draws.
- Transformer and both text encoders trained together: AdamW {lr:g} (weight decay 0.01), batch {batch},
  warm-up {warmup} steps, then cosine decay to 10% over the run's **wall-time budget** of {minutes:g} minutes
  (`--minutes`; the machine is shared with other jobs, so the step rate is not known in advance; `--minutes 0`
  trains exactly `--steps`), gradients clipped to norm 1; EMA (decay {ema}, with warm-up) shipped.
- {run_line}

![loss curve](loss.png)

## Quality

{quality}

`training.json` holds the configuration, wall times, final loss and parameter counts.
"""

MACHINE = (
    "Measured on the project's machine (2-core VM, no GPU, torch {torch}, diffusers {diffusers}), with 1 thread "
    "at nice 10 beside other jobs (a load average of 6-8 on the 2 cores for much of the run)."
)


RUN = (
    "Run: {steps:,} steps x {batch} = {samples:,} samples ({epochs:.1f} epochs), {train_min:.0f} minutes of training "
    "({step_s:.2f} s a step on average), {latents}; final loss (mean of the last "
    "100 steps) {final_loss:.4f}. {machine}"
)
STAGE = (
    "{label}: {steps:,} steps x {batch} ({minutes:.0f} minutes, learning rate {lr:g} decayed over {budget:g} minutes, "
    "{origin}{target}), final loss {loss:.4f}{versus}, prompt accuracy {acc}."
)


def stages(info: dict) -> list[dict]:
    """The chain of runs behind a model, first to last: each ``training.json`` keeps the one of the model it
    continued (``continues``), which may itself continue another."""
    chain = []
    while info:
        chain.append(info)
        info = info.get("continues")
    return chain[::-1]


def _stage_line(index: int, stage: dict) -> str:
    c = stage["config"]
    q = stage.get("quality", {}).get("prompt_accuracy")
    teacher = c.get("teacher")
    return STAGE.format(
        label=f"Stage {index + 1}", steps=stage["step"], batch=c["batch"], minutes=stage["seconds"]["transformer"] / 60,
        lr=c["lr"], budget=c["minutes"], loss=stage["final_loss_mean_last_100"],
        origin="from the previous stage's exported EMA weights, a new optimizer and EMA, and the batches that every "
        "continued run draws, other than the first stage's"
        if c.get("init_from") else "from scratch",
        target=(f"; target: the `tiny` U-Net's estimate of `noise - x_0` (`--teacher`, weight {c.get('teacher_weight', 1.0):g})"
                if teacher else "; target: the drawn `noise - x_0`"),
        acc="not measured" if q is None else f"{q:.1%}",
        versus=" (against the teacher's target, which has far less variance: not comparable with the drawn target's)"
        if teacher else "",
    )  # fmt: skip


def _run_line(info: dict, values: dict) -> str:
    """The card's line on the run: one stage, or the stages of a continued model, then the totals."""
    chain = stages(info)
    if len(chain) == 1:
        return RUN.format(**values)
    steps = sum(s["step"] for s in chain)
    samples = sum(s["step"] * s["config"]["batch"] for s in chain)
    minutes = sum(s["seconds"]["transformer"] for s in chain) / 60
    lines = [f"Run, in {len(chain)} stages (each `python -m evaluation.shapes_sd3.train --work-dir W --init-from "
             "<the previous stage's model> ...`; the options of each are in `training.json`, under `continues`):"]
    lines += [f"  - {_stage_line(i, s)}" for i, s in enumerate(chain)]
    lines.append("  - This stage in detail: " + RUN[5:].format(**values))
    lines.append(f"  - In all: {steps:,} steps, {samples:,} samples ({samples / info['config']['images']:.1f} epochs), "
                 f"{minutes:.0f} minutes of training.")
    return "\n".join(lines)


def render(info: dict, size_bytes: int, machine: str = MACHINE) -> str:
    import diffusers

    c = info["config"]
    t = c["transformer"]
    p = {k: v / 1e6 for k, v in info["parameters"].items()}
    seconds = info["seconds"]
    steps = info["step"]
    q = info.get("quality")
    if q:
        quality = (
            f"- Prompt accuracy (the `tiny` model's shape classifier names the prompted class) on {q['images']} "
            f"images (the 48 prompts x {q['images'] // 48}, seeds from {q['seed']}), {q['steps']} Euler steps, "
            f"guidance {q['guidance']:g}, `max_sequence_length` {q['max_sequence_length']}: "
            f"**{q['prompt_accuracy']:.1%}** (colour right: {q['colour_accuracy']:.1%}, shape right: "
            f"{q['shape_accuracy']:.1%}); without guidance (1.0): {q.get('prompt_accuracy_no_guidance', float('nan')):.1%}."
        )
    else:
        quality = "- Not measured at export (`--quality` measures prompt accuracy with the shape classifier)."
    run = dict(
        steps=steps, batch=c["batch"], samples=steps * c["batch"], epochs=steps * c["batch"] / c["images"],
        train_min=seconds["transformer"] / 60, step_s=seconds["transformer"] / max(1, steps),
        latents=f"plus {seconds['latents']:.0f} s encoding the pictures" if seconds.get("latents")
        else "the pictures' latents reused from an earlier run's work folder", final_loss=info["final_loss_mean_last_100"] or float("nan"),
        machine=machine.format(torch=info["torch"], diffusers=diffusers.__version__),
    )  # fmt: skip
    return CARD.format(
        run_line=_run_line(info, run), size_mb=size_bytes / 1e6, layers=t["num_layers"], width=t["num_attention_heads"] * t["attention_head_dim"],
        heads=t["num_attention_heads"], head_dim=t["attention_head_dim"],
        dual=", ".join(map(str, t["dual_attention_layers"])) or "none", joint=t["joint_attention_dim"],
        pooled=t["pooled_projection_dim"], p_transformer=p["transformer"], p_te1=p["text_encoder"],
        p_te2=p["text_encoder_2"], p_vae=p["vae"], scaling=info["vae"]["scaling_factor"],
        shift=info["scheduler"]["shift"], images=c["images"], per_class=c["images"] // 48, dropout=c["caption_dropout"], lr=c["lr"],
        batch=c["batch"], warmup=c["warmup"], minutes=c["minutes"], ema=c["ema_decay"], quality=quality,
    )  # fmt: skip
