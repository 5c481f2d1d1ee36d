"""The diffusion transformers of ``tofu-sd bench`` (random weights, built from configs), and the inputs of one
denoising step of each, as ``StableDiffusion3Pipeline``, ``FluxPipeline`` and ``QwenImagePipeline`` give them to their
transformer.

- ``sd3-medium``: :data:`SD3_MEDIUM`, the ``SD3Transformer2DModel`` config of Stable Diffusion 3 medium (2.03B
  parameters: 24 joint blocks of 24 heads x 64, patch 2 on a 16-channel latent; the last block's text stream
  ends before its feed-forward, ``context_pre_only``). A step at 1024 px takes minutes on one CPU core.
- ``sd3-medium-slice``: the same config with :data:`SD3_SLICE_LAYERS` joint blocks (2: one as the others, one as
  the last). Every block of SD3 is alike, and Token Fusion patches each of them, so the slice's step is that of
  the whole model less 22 blocks: its ratios between variants are the whole model's to within the embeddings'
  share (under 1%), and its peak memory above full's is the whole model's (the blocks run one after another).
  The default schedule gives every block ``M``.
- ``flux-dev``: :data:`FLUX_DEV`, the ``FluxTransformer2DModel`` config of FLUX.1-dev (11.9B parameters: 19
  double-stream and 38 single-stream blocks of 24 heads x 128, guidance embedding, rotary axes (16, 56, 56)).
  Its fp32 weights alone take 48 GB: it needs a GPU (``--dtype bf16``) or a machine with that much memory.
- ``flux-dev-slice``: the same config with :data:`FLUX_SLICE_LAYERS` (1 double-stream and 1 single-stream
  block): each kind of block once, so the slice times both of Token Fusion's ways into a Flux block (the image
  stream of a double-stream block, the image part of a single-stream block's ``[text, image]`` sequence), with
  the letter the default schedule gives every block (``M``). Its step is about 1 / 28 of the whole model's.
- ``qwen-image``: :data:`QWEN_IMAGE`, the ``QwenImageTransformer2DModel`` config of Qwen-Image (20.4B parameters:
  60 double-stream blocks of 24 heads x 128, patch 2 on a 16-channel latent packed 2 x 2 into 64 channels, text
  width 3584 (Qwen2.5-VL-7B's hidden size), rotary axes (16, 56, 56)). 82 GB of fp32 weights: a GPU with bf16.
- ``qwen-image-slice``: the same config with :data:`QWEN_SLICE_LAYERS` (2 of its 60 blocks, 1 / 30; 0.72B
  parameters). Every block is alike and patched, so the slice's ratios between variants are the whole model's to
  within the embeddings' share. Its usual size is 1328 px square (``--sizes 1328``: an 83 x 83 token grid, odd);
  ``QwenImagePipeline``'s default is 1024 px. Batch 1: the pipeline's true CFG makes two calls of batch 1.
- ``wan-slice``: :data:`WAN_14B`, the ``WanTransformer3DModel`` config of Wan 2.1 T2V 14B, which Wan 2.2 T2V A14B's
  two experts share (40 blocks of 40 heads x 128, feed-forward 13824, patches (1, 2, 2) on a 16-channel latent,
  UMT5's 4096-wide text), with :data:`WAN_SLICE_LAYERS` (2 of its 40 blocks, 1 / 20: every block is alike and
  Token Fusion patches each, so the slice's ratios between variants are the whole model's to within the
  embeddings' share). Its step is a video's at its real length by default: :data:`WAN_LATENT_FRAMES` (21)
  latent frames of an 81-frame video (the VAE's stride is 4 in time, 8 in space), 512 text tokens, batch 1
  (WanPipeline runs its conditional and unconditional calls apart). 480p is 480 x 832 px: a 60 x 104 latent,
  21 x 30 x 52 = 32760 tokens (``step_inputs(model, 1, 60, 104, ...)``; the bench's sizes are square). The
  whole model is not listed: its fp32 weights alone take 57 GB. ``wan-slice-17f``: the same blocks on a 17-frame
  video (:data:`WAN_SHORT_FRAMES`, 5 latent frames, about a quarter of the tokens), which a CPU can time.
- ``tiny-sd3-random``, ``tiny-flux-random``: test-sized transformers of each family (shaped like the tests' in
  ``tests/test_dit_common.py``), for a smoke run in seconds.

:func:`step_inputs` makes one step's inputs for any of them; :func:`at_timestep` sets another timestep.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from diffusers import FluxTransformer2DModel, QwenImageTransformer2DModel, SD3Transformer2DModel
from diffusers import WanTransformer3DModel

# ---------------------------------------------------------------- full size, and slices of it

#: Stable Diffusion 3 medium's transformer (stabilityai/stable-diffusion-3-medium-diffusers, transformer/config.json).
SD3_MEDIUM = dict(
    sample_size=128,
    patch_size=2,
    in_channels=16,
    out_channels=16,
    num_layers=24,
    attention_head_dim=64,
    num_attention_heads=24,
    joint_attention_dim=4096,
    caption_projection_dim=1536,
    pooled_projection_dim=2048,
    pos_embed_max_size=192,
)
#: FLUX.1-dev's transformer (black-forest-labs/FLUX.1-dev, transformer/config.json).
FLUX_DEV = dict(
    patch_size=1,
    in_channels=64,
    num_layers=19,
    num_single_layers=38,
    attention_head_dim=128,
    num_attention_heads=24,
    joint_attention_dim=4096,
    pooled_projection_dim=768,
    guidance_embeds=True,
    axes_dims_rope=(16, 56, 56),
)
#: Qwen-Image's transformer (Qwen/Qwen-Image, transformer/config.json; not downloaded here: these are the values
#: of diffusers' QwenImageTransformer2DModel defaults, which its docs give as Qwen-Image's, and their 20.4B parameters
#: are the published "20B MMDiT"; ``guidance_embeds`` False: Qwen-Image is not guidance-distilled, it takes true CFG).
QWEN_IMAGE = dict(
    patch_size=2,
    in_channels=64,
    out_channels=16,
    num_layers=60,
    attention_head_dim=128,
    num_attention_heads=24,
    joint_attention_dim=3584,
    guidance_embeds=False,
    axes_dims_rope=(16, 56, 56),
)
#: Wan 2.1 T2V 14B's transformer (Wan-AI/Wan2.1-T2V-14B-Diffusers; not downloaded here: the values of the Wan team's
#: ``wan/configs/wan_t2v_14B.py``, dim 5120 = 40 heads x 128, ffn_dim 13824, freq_dim 256, 40 layers, patch
#: (1, 2, 2), qk_norm, cross_attn_norm, eps 1e-6; text_dim 4096 is UMT5-XXL's width, in_channels 16 the Wan VAE's
#: latent channels). They are also diffusers' defaults of ``WanTransformer3DModel``. Wan 2.2 T2V A14B's two experts
#: (high and low noise) have this config; the 1.3B model (12 heads, 30 layers, ffn 8960) is not benched.
WAN_14B = dict(
    patch_size=(1, 2, 2),
    num_attention_heads=40,
    attention_head_dim=128,
    in_channels=16,
    out_channels=16,
    text_dim=4096,
    freq_dim=256,
    ffn_dim=13824,
    num_layers=40,
    cross_attn_norm=True,
    qk_norm="rms_norm_across_heads",
    eps=1e-6,
    rope_max_seq_len=1024,
)
SD3_SLICE_LAYERS = dict(num_layers=2)
WAN_SLICE_LAYERS = dict(num_layers=2)
FLUX_SLICE_LAYERS = dict(num_layers=1, num_single_layers=1)
QWEN_SLICE_LAYERS = dict(num_layers=2)

SD3_TEXT_TOKENS = 77 + 256  #: CLIP's 77 tokens, then T5's 256 (StableDiffusion3Pipeline's max_sequence_length)
FLUX_TEXT_TOKENS = 512  #: T5's tokens (FluxPipeline's max_sequence_length; FLUX.1-schnell takes 256)
#: QwenImagePipeline's max_sequence_length (its default, the most it takes): one prompt is not padded, so a real
#: call has the prompt's own token count, fewer: 512 is the costliest text a call takes.
QWEN_TEXT_TOKENS = 512
WAN_TEXT_TOKENS = 512  #: UMT5's tokens, padded to WanPipeline's max_sequence_length
WAN_LATENT_FRAMES = 21  #: an 81-frame video (WanPipeline's default num_frames) in the VAE's time stride 4: 1 + 80 / 4
WAN_SHORT_FRAMES = 5  #: a 17-frame video (1 + 16 / 4): ``wan-slice-17f``, a fraction of the real length a CPU can time
FLUX_GUIDANCE = 3.5  #: FluxPipeline's default guidance_scale, which FLUX.1-dev takes as an input (distilled)

# ---------------------------------------------------------------- tiny, random weights (tests, smoke runs)

TINY_TEXT_TOKENS = 7
_TINY_SD3 = dict(
    sample_size=16, patch_size=2, in_channels=4, out_channels=4, num_layers=3, attention_head_dim=8,
    num_attention_heads=4, joint_attention_dim=32, caption_projection_dim=32, pooled_projection_dim=64,
)  # fmt: skip
# 16 input channels: a 4-channel latent packed 2 x 2, as Flux packs its 16 channels into 64.
_TINY_FLUX = dict(
    patch_size=1, in_channels=16, num_layers=2, num_single_layers=2, attention_head_dim=16, num_attention_heads=2,
    joint_attention_dim=32, pooled_projection_dim=32, guidance_embeds=True, axes_dims_rope=(4, 4, 8),
)  # fmt: skip


@dataclass(frozen=True)
class DiTArch:
    """A transformer of the bench: its model class and config, and its step's default batch and text tokens."""

    model: type
    config: dict
    #: 2 for SD3 (classifier-free guidance: one conditional and one unconditional row), 1 for Flux-dev and Qwen-Image
    batch: int
    text_tokens: int
    #: a video model's latent frames per step (None: :func:`step_inputs`' default, Wan's 81-frame video)
    frames: int | None = None

    def build(self, seed: int = 0, device=None, dtype: torch.dtype = torch.float32) -> torch.nn.Module:
        """The model with the random weights of ``seed``, made directly on ``device`` (``"meta"``: no memory at
        all) in ``dtype``, in eval mode and without gradients."""
        torch.manual_seed(seed)
        default = torch.get_default_dtype()
        torch.set_default_dtype(dtype)
        try:
            with torch.device(device or "cpu"):
                model = self.model(**self.config)
        finally:
            torch.set_default_dtype(default)
        if any(t.is_floating_point() and t.dtype != dtype for t in (*model.parameters(), *model.buffers())):
            model = model.to(dtype=dtype)  # buffers made in float32 whatever the default (SD3's position embedding)
        return model.eval().requires_grad_(False)

    def num_params(self) -> int:
        """Its parameter count, from a model on the meta device (nothing allocated)."""
        return sum(p.numel() for p in self.build(device="meta").parameters())


DIT_ARCHS = {
    "sd3-medium": DiTArch(SD3Transformer2DModel, SD3_MEDIUM, 2, SD3_TEXT_TOKENS),
    "sd3-medium-slice": DiTArch(SD3Transformer2DModel, {**SD3_MEDIUM, **SD3_SLICE_LAYERS}, 2, SD3_TEXT_TOKENS),
    "flux-dev": DiTArch(FluxTransformer2DModel, FLUX_DEV, 1, FLUX_TEXT_TOKENS),
    "flux-dev-slice": DiTArch(FluxTransformer2DModel, {**FLUX_DEV, **FLUX_SLICE_LAYERS}, 1, FLUX_TEXT_TOKENS),
    "qwen-image": DiTArch(QwenImageTransformer2DModel, QWEN_IMAGE, 1, QWEN_TEXT_TOKENS),
    "qwen-image-slice": DiTArch(QwenImageTransformer2DModel, {**QWEN_IMAGE, **QWEN_SLICE_LAYERS}, 1, QWEN_TEXT_TOKENS),
    "wan-slice": DiTArch(WanTransformer3DModel, {**WAN_14B, **WAN_SLICE_LAYERS}, 1, WAN_TEXT_TOKENS),
    "wan-slice-17f": DiTArch(WanTransformer3DModel, {**WAN_14B, **WAN_SLICE_LAYERS}, 1, WAN_TEXT_TOKENS, WAN_SHORT_FRAMES),
    "tiny-sd3-random": DiTArch(SD3Transformer2DModel, _TINY_SD3, 2, TINY_TEXT_TOKENS),
    "tiny-flux-random": DiTArch(FluxTransformer2DModel, _TINY_FLUX, 1, TINY_TEXT_TOKENS),
}

# ---------------------------------------------------------------- one step's inputs

TIMESTEP = 500  #: the bench's timestep, on the schedulers' 0-1000 scale (sigma 0.5 of a flow-matching schedule)


def check_latent(model: torch.nn.Module, height: int, width: int) -> None:
    """ValueError, saying which image sizes work, unless a ``height x width`` latent fits ``model``."""
    config = model.config
    if isinstance(model, WanTransformer3DModel):
        _, p_h, p_w = config.patch_size
        if height % p_h or width % p_w:
            raise ValueError(f"Wan's patches are {p_h} x {p_w} latent pixels: a {height} x {width} latent does not "
                             f"divide into them; give image sizes that are multiples of {8 * p_h} px")  # fmt: skip
        return
    if isinstance(model, (FluxTransformer2DModel, QwenImageTransformer2DModel)):
        name = "Flux" if isinstance(model, FluxTransformer2DModel) else "Qwen-Image"
        if height % 2 or width % 2:
            raise ValueError(f"{name} packs 2 x 2 latent pixels into a token: the latent must have even sides, got "
                             f"{height} x {width}; give image sizes that are multiples of 16 px")  # fmt: skip
        return
    p, most = config.patch_size, config.pos_embed_max_size
    if height % p or width % p:
        raise ValueError(f"the transformer's patches are {p} x {p} latent pixels: a {height} x {width} latent does "
                         f"not divide into them; give image sizes that are multiples of {8 * p} px")  # fmt: skip
    if most is not None and max(height, width) // p > most:
        raise ValueError(f"the transformer's position embedding covers {most} x {most} patches ({8 * p * most} px); "
                         f"a {height} x {width} latent is larger: give smaller image sizes")  # fmt: skip


def image_ids(height: int, width: int) -> torch.Tensor:
    """Flux's ``img_ids`` of an ``height x width`` token grid: ``(0, row, column)`` of each token, row-major, as
    ``FluxPipeline._prepare_latent_image_ids`` builds them."""
    ids = torch.zeros(height, width, 3)
    ids[..., 1] = torch.arange(height)[:, None]
    ids[..., 2] = torch.arange(width)[None, :]
    return ids.reshape(height * width, 3)


def step_inputs(
    model: torch.nn.Module, batch: int, height: int, width: int | None = None, *, text_tokens: int,
    seed: int = 0, device=None, dtype: torch.dtype | None = None, frames: int = WAN_LATENT_FRAMES,
) -> dict:  # fmt: skip
    """Keyword arguments of one call of ``model`` on a ``height x width`` latent (image pixels / 8; ``width``
    defaults to ``height``) at :data:`TIMESTEP`, with ``text_tokens`` random text embeddings, drawn from a
    generator seeded with ``seed`` on the CPU, then moved to ``device`` and ``dtype``.

    SD3: the latent ``(B, C, H, W)``, the text ``(B, T, joint_attention_dim)``, the pooled text
    ``(B, pooled_projection_dim)`` and the timestep ``(B,)`` on the 0-1000 scale, as StableDiffusion3Pipeline.
    Flux: the latent packed 2 x 2 into ``(B, H/2 * W/2, in_channels)`` tokens, their ``img_ids`` and the text's
    ``txt_ids`` (zeros), the timestep ``(B,)`` in [0, 1] and the guidance ``(B,)`` (:data:`FLUX_GUIDANCE`, if the
    model embeds it), as FluxPipeline (the transformer multiplies both by 1000). Qwen-Image: the packed latent,
    its ``img_shapes`` ``[[(1, H/2, W/2)]]`` per batch element and the timestep in [0, 1], as QwenImagePipeline
    (no pooled text; no text mask, which the pipeline drops when no prompt is padded). Wan: the video latent
    ``(B, C, frames, H, W)``, the text ``(B, T, text_dim)`` and the timestep as SD3's, as WanPipeline."""
    width = height if width is None else width
    check_latent(model, height, width)
    g = torch.Generator().manual_seed(seed)
    config = model.config
    if isinstance(model, WanTransformer3DModel):  # WanPipeline's: the video latent, the text, SD3's timestep
        inputs = {
            "hidden_states": torch.randn(batch, config.in_channels, frames, height, width, generator=g),
            "encoder_hidden_states": torch.randn(batch, text_tokens, config.text_dim, generator=g),
        }
        inputs = {k: v.to(device, dtype) if device is not None or dtype is not None else v for k, v in inputs.items()}
        return at_timestep(inputs, TIMESTEP)
    inputs = {"encoder_hidden_states": torch.randn(batch, text_tokens, config.joint_attention_dim, generator=g)}
    if isinstance(model, QwenImageTransformer2DModel):
        h, w = height // 2, width // 2
        inputs["hidden_states"] = torch.randn(batch, h * w, config.in_channels, generator=g)
        inputs = {k: v.to(device, dtype) if device is not None or dtype is not None else v for k, v in inputs.items()}
        return at_timestep({**inputs, "img_shapes": [[(1, h, w)]] * batch}, TIMESTEP)
    inputs["pooled_projections"] = torch.randn(batch, config.pooled_projection_dim, generator=g)
    if isinstance(model, FluxTransformer2DModel):
        h, w = height // 2, width // 2
        inputs["hidden_states"] = torch.randn(batch, h * w, config.in_channels, generator=g)
        inputs["img_ids"], inputs["txt_ids"] = image_ids(h, w), torch.zeros(text_tokens, 3)
        if config.guidance_embeds:
            inputs["guidance"] = torch.full((batch,), FLUX_GUIDANCE)
    else:
        inputs["hidden_states"] = torch.randn(batch, config.in_channels, height, width, generator=g)
    inputs = {k: v.to(device, dtype) if device is not None or dtype is not None else v for k, v in inputs.items()}
    if "guidance" in inputs:
        inputs["guidance"] = inputs["guidance"].float()  # FluxPipeline's guidance is float32 whatever the model's dtype
    return at_timestep(inputs, TIMESTEP)


def at_timestep(inputs: dict, timestep: float) -> dict:
    """``inputs`` of a transformer step at ``timestep`` (0-1000, the schedulers' scale), ``(B,)`` as the pipelines
    pass it: SD3's in float32, Flux's and Qwen-Image's (their inputs have ``img_ids`` / ``img_shapes``) divided by
    1000, in the latents' dtype."""
    x = inputs["hidden_states"]
    flux = "img_ids" in inputs or "img_shapes" in inputs
    value, dtype = (timestep / 1000, x.dtype) if flux else (float(timestep), torch.float32)
    return {**inputs, "timestep": torch.full((x.shape[0],), value, device=x.device, dtype=dtype)}
