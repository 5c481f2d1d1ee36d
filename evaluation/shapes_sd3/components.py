"""The parts of the built-in SD3-style model (``--model tiny-sd3``) before training, and their configurations.

- the VAE: the shipped ``--model tiny`` VAE (:data:`evaluation.shapes.MODEL_DIR` ``/vae``), frozen, 64x64x3 ->
  16x16x4, with ``shift_factor`` 0 (SD3's pipeline decodes ``latents / scaling_factor + shift_factor``);
- the tokenizer: the shipped one (each caption word one token, 16 positions), used as ``tokenizer`` and
  ``tokenizer_2``;
- ``text_encoder`` (the CLIP-L role): a ``CLIPTextModelWithProjection`` whose text model starts from the shipped,
  trained ``CLIPTextModel`` (3 layers, width 64), with a new projection to 64;
- ``text_encoder_2`` (the CLIP-G role): a new, smaller ``CLIPTextModelWithProjection`` (2 layers, width 64);
- the transformer: an ``SD3Transformer2DModel`` of :data:`TRANSFORMER` (patch size 1: 256 image tokens).

No T5: ``text_encoder_3`` is None and the pipeline appends ``max_sequence_length`` zero tokens of width
``joint_attention_dim`` to the 16 CLIP tokens (the two CLIP encoders' penultimate hidden states side by side,
64 + 64 = 128 = ``joint_attention_dim``, so no zero padding of the features).
"""

from __future__ import annotations

import numpy as np
import torch

from ..shapes import MODEL_DIR as SHAPES_DIR

TEXT_DIM = 64  # width of both CLIP encoders
MAX_TOKENS = 16  # the shipped tokenizer's model_max_length
#: ``CLIPTextConfig`` of ``text_encoder_2`` besides vocabulary and special tokens (``text_encoder`` is the shipped one's).
TEXT_2 = dict(hidden_size=TEXT_DIM, intermediate_size=4 * TEXT_DIM, num_attention_heads=4, num_hidden_layers=2,
              max_position_embeddings=MAX_TOKENS, projection_dim=TEXT_DIM)  # fmt: skip

#: The transformer: SD3's MMDiT at a small scale (SD3.5's RMS q/k norm; dual attention in the first block).
TRANSFORMER = dict(
    sample_size=16,  # latent side: the pipeline's default height is sample_size * vae_scale_factor (4) = 64
    patch_size=1,  # 16 x 16 = 256 image tokens
    in_channels=4,
    out_channels=4,
    num_layers=8,
    attention_head_dim=32,
    num_attention_heads=4,  # 128 wide
    joint_attention_dim=2 * TEXT_DIM,  # the two CLIP encoders' hidden states side by side
    caption_projection_dim=128,  # = the inner width (the joint attention needs it)
    pooled_projection_dim=2 * TEXT_DIM,  # the two projections side by side
    pos_embed_max_size=16,
    qk_norm="rms_norm",
    dual_attention_layers=(0,),
)

#: The flow-matching scheduler shipped with the model (shift 1: no shift, suited to a 16x16 latent).
SCHEDULER = dict(num_train_timesteps=1000, shift=1.0)


def load_tokenizer():
    from transformers import CLIPTokenizer

    return CLIPTokenizer.from_pretrained(SHAPES_DIR / "tokenizer")


def load_vae():
    """The shipped VAE, frozen, with ``shift_factor`` 0."""
    from diffusers import AutoencoderKL

    vae = AutoencoderKL.from_pretrained(SHAPES_DIR / "vae")
    vae.register_to_config(shift_factor=0.0)
    return vae.eval().requires_grad_(False)


def build_text_encoders(tokenizer, seed: int, text_2: dict | None = None):
    """``text_encoder`` (the shipped CLIPTextModel's weights plus a new projection) and a new ``text_encoder_2``."""
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    special = dict(vocab_size=len(tokenizer), bos_token_id=0, eos_token_id=1, pad_token_id=1)
    shipped = CLIPTextModel.from_pretrained(SHAPES_DIR / "text_encoder")
    config = CLIPTextConfig(**{**shipped.config.to_dict(), "projection_dim": TEXT_DIM, "architectures": None})
    torch.manual_seed(seed)
    te1 = CLIPTextModelWithProjection(config)
    source = {k.removeprefix("text_model."): v for k, v in shipped.state_dict().items()}
    te1.text_model.load_state_dict(source)  # strict: every weight of the shipped encoder
    torch.manual_seed(seed + 1)
    te2 = CLIPTextModelWithProjection(CLIPTextConfig(**special, **(text_2 or TEXT_2)))
    return te1, te2


def build_transformer(seed: int, config: dict | None = None):
    from diffusers import SD3Transformer2DModel

    torch.manual_seed(seed + 2)
    return SD3Transformer2DModel(**(config or TRANSFORMER))


def to_unit(images: np.ndarray) -> torch.Tensor:
    """uint8 ``(B, H, W, 3)`` -> float ``(B, 3, H, W)`` in [-1, 1]."""
    return torch.from_numpy(images).permute(0, 3, 1, 2).float().div(127.5).sub(1)


def encode_text(te1, te2, ids: torch.Tensor, zero_tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(prompt_embeds, pooled)`` exactly as ``StableDiffusion3Pipeline.encode_prompt`` makes them without T5 and
    ``clip_skip``: penultimate hidden states of both encoders side by side, then ``zero_tokens`` zero tokens
    (its ``max_sequence_length``); pooled: both projections side by side."""
    out1 = te1(ids, output_hidden_states=True)
    out2 = te2(ids, output_hidden_states=True)
    clip = torch.cat([out1.hidden_states[-2], out2.hidden_states[-2]], dim=-1)
    zeros = clip.new_zeros(clip.shape[0], zero_tokens, clip.shape[-1])
    return torch.cat([clip, zeros], dim=1), torch.cat([out1[0], out2[0]], dim=-1)
