"""The built-in model's parts before training: its tokenizer (byte-pair merges learned from the captions) and its
freshly initialised VAE, U-Net and text encoder (configs in :mod:`evaluation.archs`), and pictures as their input."""

from __future__ import annotations

import json
import re
import string
from collections import Counter
from pathlib import Path

import numpy as np
import torch

from .. import archs
from .data import NUM_CLASSES, caption


def _learn_merges(words: Counter) -> list[tuple[str, str]]:
    """Plain BPE on ``words`` (word -> count) until every word is one symbol; ties broken by the pair itself."""
    split = {w: [*w[:-1], w[-1] + "</w>"] for w in words}
    merges: list[tuple[str, str]] = []
    while True:
        pairs = Counter()
        for w, symbols in split.items():
            for pair in zip(symbols, symbols[1:]):
                pairs[pair] += words[w]
        if not pairs:
            return merges
        best = max(pairs, key=lambda p: (pairs[p], p))  # ties broken by the pair itself: deterministic
        merges.append(best)
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


def build_tokenizer(folder: Path):
    """A CLIPTokenizer whose byte-pair merges make each word of the captions one token.

    The merges are learned here by plain BPE on the caption words (every other word still tokenizes, character
    by character), written as ``vocab.json`` and ``merges.txt``, and loaded by the real ``CLIPTokenizer``.
    """
    from transformers import CLIPTokenizer

    words = Counter()
    for c in range(NUM_CLASSES):
        for word in re.findall(r"[a-z]+|[^\sa-z]+", caption(c).lower()):
            words[word] += 1
    vocab: dict[str, int] = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for ch in sorted(set(string.printable) - set(string.whitespace)):
        for symbol in (ch, ch + "</w>"):
            vocab.setdefault(symbol, len(vocab))
    merges = _learn_merges(words)
    for a, b in merges:
        vocab.setdefault(a + b, len(vocab))
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges))
    return CLIPTokenizer(
        str(folder / "vocab.json"), str(folder / "merges.txt"), pad_token="<|endoftext|>",
        model_max_length=archs.SHAPES_MAX_TOKENS,
    )  # fmt: skip


def build_models(tokenizer, seed: int):
    """The VAE, U-Net and text encoder of :data:`evaluation.archs.SHAPES_VAE` / ``SHAPES_UNET`` / ``SHAPES_TEXT``,
    initialised from ``seed``, ``seed + 1`` and ``seed + 2``."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(seed)
    vae = AutoencoderKL(**archs.SHAPES_VAE)
    torch.manual_seed(seed + 1)
    unet = UNet2DConditionModel(**archs.SHAPES_UNET)
    torch.manual_seed(seed + 2)
    text_encoder = CLIPTextModel(
        CLIPTextConfig(vocab_size=len(tokenizer), bos_token_id=0, eos_token_id=1, pad_token_id=1, **archs.SHAPES_TEXT)
    )
    return vae, unet, text_encoder


def to_unit(images: np.ndarray) -> torch.Tensor:
    """uint8 ``(B, H, W, 3)`` -> float ``(B, 3, H, W)`` in [-1, 1]."""
    return torch.from_numpy(images).permute(0, 3, 1, 2).float().div(127.5).sub(1)
