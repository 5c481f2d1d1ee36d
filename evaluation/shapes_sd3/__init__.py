"""The built-in SD3-style model (``--model tiny-sd3``): a small ``StableDiffusion3Pipeline`` (MMDiT transformer,
two small CLIP text encoders, no T5, the ``--model tiny`` VAE) trained here on the built-in coloured-shape pictures.

``MODEL_DIR`` holds it as a diffusers folder; :func:`load_pipeline` loads it, as diffusers loads SD3 without its
T5 encoder: ``StableDiffusion3Pipeline.from_pretrained(MODEL_DIR, text_encoder_3=None, tokenizer_3=None)`` (the
folder's ``model_index.json`` names no ``text_encoder_3``, and diffusers 0.42 wants the two Nones passed). Its prompts are the ``shapes``
prompt set (48 classes, "A high-quality photograph of a {colour} {shape}."), the same as ``--model tiny``, and
the shape classifier of :mod:`evaluation.shapes` scores it. :mod:`.train` trains it, :mod:`.export` writes it.

Without T5, the pipeline appends ``max_sequence_length`` zero tokens to the 16 CLIP tokens; the model was trained
with 0-256 of them (mostly 0-16), and :data:`CALL_KWARGS` passes 16, which keeps the text stream at 32 tokens
(the pipeline's default, 256, also works but adds 256 constant tokens to every attention).
"""

from pathlib import Path

from ..shapes import MAX_BYTES  # the repository's limit on a shipped model folder, as for the U-Net model

__all__ = ["CALL_KWARGS", "DEFAULT_GUIDANCE", "DEFAULT_STEPS", "MAX_BYTES", "MODEL_DIR", "PROMPT_SET", "load_pipeline"]

MODEL_DIR = Path(__file__).resolve().with_name("model")
PROMPT_SET = "shapes"
#: Keyword arguments for calls of the pipeline: few zero "T5" tokens; 20 Euler steps and guidance 5.
CALL_KWARGS = {"max_sequence_length": 16}
DEFAULT_STEPS = 20
DEFAULT_GUIDANCE = 5.0


def load_pipeline(device="cpu", dtype=None, folder=None):
    """The shipped ``StableDiffusion3Pipeline`` on ``device`` in ``dtype`` (default float32), progress bar off.

    FileNotFoundError if the folder has no model (train and export it: see :mod:`.train`)."""
    import torch
    from diffusers import StableDiffusion3Pipeline

    folder = Path(folder or MODEL_DIR)
    if not (folder / "model_index.json").is_file():
        raise FileNotFoundError(
            f"the built-in SD3-style model is missing from {folder}; train it with `python -m evaluation.shapes_sd3.train` "
            "and write it with `python -m evaluation.shapes_sd3.export`"
        )
    pipe = StableDiffusion3Pipeline.from_pretrained(folder, text_encoder_3=None, tokenizer_3=None, dtype=dtype or torch.float32)
    pipe = pipe.to(device)
    pipe.set_progress_bar_config(disable=True)
    return pipe
