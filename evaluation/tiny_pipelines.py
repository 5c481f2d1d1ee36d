"""Tiny random-weight pipelines of the newer diffusion-transformer families (Qwen-Image, FLUX.2, Sana, Wan):
real diffusers / transformers components at test size, with offline tokenizers, for the tests and smoke runs of
``tofu-sd generate`` / ``analyze`` (save one with ``save_pretrained`` and pass the folder as ``--model``).

Their outputs are noise-like. The transformers' configs are those of the plugin's family tests; every text
encoder is a few layers wide enough to feed its transformer, and its tokenizer has a character-level vocabulary
(no merges), so nothing is downloaded.
"""

from __future__ import annotations

import string

import torch

SEED = 0
_CHARS = sorted(set(string.printable) - set(string.whitespace)) + ["▁"]
#: FLUX.2's pipeline stacks the text encoder's hidden states 10, 20 and 30 (its ``text_encoder_out_layers``).
FLUX2_TEXT_LAYERS = 31
#: A chat template that writes the role and the text of each message (FLUX.2 formats prompts as a chat).
CHAT_TEMPLATE = (
    "{% for m in messages %}{{ m['role'] }}: {% for c in m['content'] %}{{ c['text'] }}{% endfor %}\n{% endfor %}"
)


def _seeded(seed: int, build):
    torch.manual_seed(seed)
    return build().eval()


def byte_level_tokenizer():
    """A Qwen2 tokenizer over the 256 byte-level symbols, no merges (Qwen-Image's; FLUX.2 takes it with a chat
    template in place of Mistral's processor)."""
    from tokenizers import pre_tokenizers
    from transformers import Qwen2Tokenizer

    vocab = {c: i for i, c in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
    for special in ("<|endoftext|>", "<|im_start|>", "<|im_end|>"):
        vocab[special] = len(vocab)
    return Qwen2Tokenizer(vocab=vocab, merges=[])


def qwenimage_pipeline(seed: int = SEED):
    """QwenImagePipeline: a 2-block transformer (16 channels, 4 latent ones packed 2 x 2), a Qwen2.5-VL text
    encoder of width 16, Qwen-Image's VAE with a spatial scale of 4."""
    from diffusers import (
        AutoencoderKLQwenImage,
        FlowMatchEulerDiscreteScheduler,
        QwenImagePipeline,
        QwenImageTransformer2DModel,
    )  # fmt: skip
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    tokenizer = byte_level_tokenizer()
    text = {"hidden_size": 16, "intermediate_size": 16, "num_hidden_layers": 2, "num_attention_heads": 2,
            "num_key_value_heads": 2, "vocab_size": len(tokenizer), "rope_theta": 1e6,
            "bos_token_id": tokenizer.pad_token_id, "eos_token_id": tokenizer.pad_token_id,
            "rope_scaling": {"mrope_section": [1, 1, 2], "rope_type": "default", "type": "default"}}  # fmt: skip
    vision = {"depth": 1, "hidden_size": 16, "intermediate_size": 16, "num_heads": 2, "out_hidden_size": 16}
    config = Qwen2_5_VLConfig(text_config=text, vision_config=vision)
    return QwenImagePipeline(
        transformer=_seeded(seed, lambda: QwenImageTransformer2DModel(
            patch_size=2, in_channels=16, out_channels=4, num_layers=2, attention_head_dim=16, num_attention_heads=2,
            joint_attention_dim=16, axes_dims_rope=(4, 6, 6))),
        vae=_seeded(seed + 1, lambda: AutoencoderKLQwenImage(
            base_dim=24, z_dim=4, dim_mult=[1, 2, 4], num_res_blocks=1, temperal_downsample=[False, True],
            latents_mean=[0.0] * 4, latents_std=[1.0] * 4)),
        text_encoder=_seeded(seed + 2, lambda: Qwen2_5_VLForConditionalGeneration(config)),
        tokenizer=tokenizer, scheduler=FlowMatchEulerDiscreteScheduler(),
    )  # fmt: skip


def flux2_pipeline(seed: int = SEED):
    """Flux2Pipeline: a transformer of 2 double- and 2 single-stream blocks (16 channels, 4 latent ones packed
    2 x 2), a Mistral3 text encoder of width 8 and 31 layers (the pipeline stacks layers 10, 20, 30: 24
    features), FLUX.2's VAE with a spatial scale of 2."""
    from diffusers import (
        AutoencoderKLFlux2,
        FlowMatchEulerDiscreteScheduler,
        Flux2Pipeline,
        Flux2Transformer2DModel,
    )
    from transformers import Mistral3Config, Mistral3ForConditionalGeneration

    tokenizer = byte_level_tokenizer()
    tokenizer.chat_template = CHAT_TEMPLATE
    text = {"hidden_size": 8, "intermediate_size": 16, "num_hidden_layers": FLUX2_TEXT_LAYERS, "num_attention_heads": 2,
            "num_key_value_heads": 2, "head_dim": 4, "vocab_size": len(tokenizer), "model_type": "mistral"}  # fmt: skip
    vision = {"hidden_size": 8, "intermediate_size": 16, "num_hidden_layers": 1, "num_attention_heads": 2,
              "head_dim": 4, "image_size": 16, "patch_size": 4, "model_type": "pixtral"}  # fmt: skip
    config = Mistral3Config(text_config=text, vision_config=vision)
    return Flux2Pipeline(
        transformer=_seeded(seed, lambda: Flux2Transformer2DModel(
            patch_size=1, in_channels=16, num_layers=2, num_single_layers=2, attention_head_dim=16,
            num_attention_heads=2, joint_attention_dim=24, timestep_guidance_channels=16, mlp_ratio=2.0,
            axes_dims_rope=(4, 4, 4, 4))),
        vae=_seeded(seed + 1, lambda: AutoencoderKLFlux2(
            block_out_channels=(8, 8), down_block_types=("DownEncoderBlock2D",) * 2,
            up_block_types=("UpDecoderBlock2D",) * 2, layers_per_block=1, latent_channels=4, norm_num_groups=4,
            sample_size=32)),
        text_encoder=_seeded(seed + 2, lambda: Mistral3ForConditionalGeneration(config)),
        tokenizer=tokenizer, scheduler=FlowMatchEulerDiscreteScheduler(),
    )  # fmt: skip


def sana_pipeline(seed: int = SEED):
    """SanaPipeline: a 2-block linear-attention transformer, a Gemma2 text encoder of width 16, a deep-compression
    autoencoder with a spatial scale of 2, Sana's flow DPM-Solver."""
    from diffusers import (
        AutoencoderDC,
        DPMSolverMultistepScheduler,
        SanaPipeline,
        SanaTransformer2DModel,
    )
    from transformers import Gemma2Config, Gemma2Model, GemmaTokenizer

    tokenizer = GemmaTokenizer(vocab={"<pad>": 0, "<eos>": 1, "<bos>": 2, "<unk>": 3, **{c: i + 4 for i, c in enumerate(_CHARS)}})
    config = Gemma2Config(hidden_size=16, intermediate_size=16, num_hidden_layers=2, num_attention_heads=2,
                          num_key_value_heads=2, head_dim=8, vocab_size=len(tokenizer))  # fmt: skip
    return SanaPipeline(
        transformer=_seeded(seed, lambda: SanaTransformer2DModel(
            in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=8, num_layers=2,
            num_cross_attention_heads=2, cross_attention_head_dim=8, cross_attention_dim=16, caption_channels=16,
            mlp_ratio=2.0, sample_size=16, patch_size=1)),
        vae=_seeded(seed + 1, lambda: AutoencoderDC(
            in_channels=3, latent_channels=4, attention_head_dim=2, encoder_block_types=("ResBlock", "EfficientViTBlock"),
            decoder_block_types=("ResBlock", "EfficientViTBlock"), encoder_block_out_channels=(8, 8),
            decoder_block_out_channels=(8, 8), encoder_qkv_multiscales=((), (5,)), decoder_qkv_multiscales=((), (5,)),
            encoder_layers_per_block=(1, 1), decoder_layers_per_block=(1, 1), downsample_block_type="conv",
            upsample_block_type="interpolate", decoder_norm_types="rms_norm", decoder_act_fns="silu",
            scaling_factor=0.41407)),
        text_encoder=_seeded(seed + 2, lambda: Gemma2Model(config)), tokenizer=tokenizer,
        scheduler=DPMSolverMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=3.0),
    )  # fmt: skip


def wan_pipeline(seed: int = SEED):
    """WanPipeline (text to video): a 2-block transformer (patch 1 x 2 x 2), a UMT5 encoder of width 16, Wan's
    VAE (spatial scale 8, time stride 4: ``4 k + 1`` frames are ``k + 1`` latent frames)."""
    from diffusers import (
        AutoencoderKLWan,
        FlowMatchEulerDiscreteScheduler,
        WanPipeline,
        WanTransformer3DModel,
    )
    from transformers import T5TokenizerFast, UMT5Config, UMT5EncoderModel

    tokenizer = T5TokenizerFast(vocab=[("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)] + [(c, -1.0) for c in _CHARS], extra_ids=0)
    config = UMT5Config(d_model=16, d_kv=8, d_ff=16, num_layers=2, num_heads=2, vocab_size=len(tokenizer),
                        relative_attention_num_buckets=8)  # fmt: skip
    return WanPipeline(
        transformer=_seeded(seed, lambda: WanTransformer3DModel(
            num_layers=2, attention_head_dim=8, num_attention_heads=2, in_channels=16, out_channels=16, text_dim=16,
            freq_dim=16, ffn_dim=32, rope_max_seq_len=32, patch_size=(1, 2, 2))),
        vae=_seeded(seed + 1, lambda: AutoencoderKLWan(
            base_dim=3, z_dim=16, dim_mult=[1, 1, 1, 1], num_res_blocks=1, temperal_downsample=[False, True, True])),
        text_encoder=_seeded(seed + 2, lambda: UMT5EncoderModel(config)), tokenizer=tokenizer,
        scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
    )  # fmt: skip


#: The builders by family name, as ``tofu_sd`` names the families.
PIPELINES = {"QwenImage": qwenimage_pipeline, "Flux2": flux2_pipeline, "Sana": sana_pipeline, "Wan": wan_pipeline}
