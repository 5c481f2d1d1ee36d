"""One hook stack, one adapter per family: for every supported family, ``apply_token_fusion`` /
``remove_token_fusion`` work and equal ``apply`` / ``remove``, the patched attentions see the reduced token
counts, and removal leaves every module's class, attributes, forward, torch hooks and hook registry as before
(outputs bit-identical). A toy model class registered with its own adapter works end to end."""

import functools

import pytest
import torch
from diffusers.models.attention import BasicTransformerBlock

import tofu_sd
from evaluation.tiny_random import tiny_unet, tiny_unet_inputs
from tests.test_dit_chroma import chroma_inputs, tiny_chroma
from tests.test_dit_common import (
    flux_inputs,
    pixart_inputs,
    qwenimage_inputs,
    sd3_inputs,
    tiny_flux,
    tiny_pixart,
    tiny_qwenimage,
    tiny_sd3,
)
from tests.test_dit_flux2 import flux2_inputs, tiny_flux2
from tests.test_dit_sana import sana_inputs, tiny_sana
from tests.test_dit_wan import tiny_wan, wan_inputs
from tofu_sd import Family, Site, TokenFusionConfig
from tofu_sd.families import family_of


def structure(model):
    """What a patch could leave behind: each module's class, instance attributes, forward and torch hooks."""
    return {
        name: (type(m), set(m.__dict__), m.__dict__.get("forward"), dict(m._forward_pre_hooks), dict(m._forward_hooks))
        for name, m in model.named_modules()
    }  # fmt: skip


def output(model, inputs):
    with torch.no_grad():
        return model(**inputs).sample


#: (builder, inputs, image tokens of the inputs at the patched blocks, the attention a patched block reduces)
FAMILIES = {
    "sd15": (lambda: tiny_unet("sd15"), tiny_unet_inputs, 256, "attn1"),
    "sdxl": (lambda: tiny_unet("sdxl"), tiny_unet_inputs, 64, "attn1"),
    "sd3": (tiny_sd3, sd3_inputs, 48, "attn"),
    "sd3.5": (functools.partial(tiny_sd3, dual_attention_layers=(0, 2)), sd3_inputs, 48, "attn"),
    "pixart": (tiny_pixart, pixart_inputs, 24, "attn1"),
    "flux": (tiny_flux, flux_inputs, 24, "attn"),
    "flux2": (tiny_flux2, flux2_inputs, 24, "attn"),
    "chroma": (tiny_chroma, chroma_inputs, 24, "attn"),
    "wan": (tiny_wan, wan_inputs, 60, "attn1"),  # 5 frames of 3 x 4 tokens
    "qwen-image": (tiny_qwenimage, qwenimage_inputs, 24, "attn"),
    "sana": (tiny_sana, sana_inputs, 24, "attn1"),  # a 12 x 8 latent in 2 x 2 patches
}


def query_counts(model, attention):
    """A recorder of the query tokens that each patched block's attention projects, per call."""
    seen, handles = {}, []
    for block in tofu_sd.patched_blocks(model):
        attn = model.get_submodule(f"{block.name}.{attention}")
        to_q = attn.to_q if hasattr(attn, "to_q") else attn.to_qkv_mlp_proj  # FLUX.2's single-stream blocks: fused
        handles.append(to_q.register_forward_pre_hook(lambda m, a, name=block.name: seen.setdefault(name, []).append(a[0].shape[1])))
    return seen, handles


@pytest.mark.parametrize("family", FAMILIES)
def test_apply_and_remove_on_every_family(family):
    build, inputs, tokens, attention = FAMILIES[family]
    model = build()
    x = inputs(model)
    before, reference = structure(model), output(model, x)
    state = tofu_sd.apply_token_fusion(model, TokenFusionConfig(ratio=0.5))
    assert state is tofu_sd.get_state(model) and state.blocks
    seen, handles = query_counts(model, attention)
    patched = output(model, x)
    for handle in handles:
        handle.remove()
    single = family in ("flux", "flux2", "chroma")  # single-stream blocks: [text, image]
    for name, counts in seen.items():
        text = x["encoder_hidden_states"].shape[1] if single and name.startswith("single") else 0
        assert counts == [text + tokens - tokens // 2], name  # every patched attention ran on N - r image tokens
    assert len(seen) == len(state.blocks)
    assert tofu_sd.remove_token_fusion(model) is True and tofu_sd.remove_token_fusion(model) is False
    assert structure(model) == before and tofu_sd.get_state(model) is None
    assert torch.equal(output(model, x), reference)
    tofu_sd.apply(model, ratio=0.5)  # the convenience gives the same model and outputs
    assert torch.equal(output(model, x), patched) and tofu_sd.get_state(model) == state
    tofu_sd.remove(model)
    assert structure(model) == before


def test_the_family_of_each_model_class():
    names = {family: family_of(FAMILIES[family][0]()).name for family in FAMILIES}
    assert names == {
        "sd15": "U-Net", "sdxl": "U-Net", "sd3": "SD3", "sd3.5": "SD3", "pixart": "PixArt", "flux": "Flux",
        "flux2": "FLUX.2", "chroma": "Chroma",
        "qwen-image": "Qwen-Image", "wan": "Wan", "sana": "Sana",
    }  # fmt: skip


# ---------------------------------------------------------------------------------------------------------
# A toy model class with its own adapter.


class ToyTransformer(torch.nn.Module):
    """A latent ``(B, C, H, W)`` flattened to tokens, three diffusers ``BasicTransformerBlock`` s, and back."""

    def __init__(self, channels=16):
        super().__init__()
        torch.manual_seed(0)
        self.blocks = torch.nn.ModuleList(BasicTransformerBlock(channels, 2, channels // 2) for _ in range(3))
        self.time = torch.nn.Linear(1, channels)

    def forward(self, hidden_states, timestep):
        b, c, h, w = hidden_states.shape
        tokens = hidden_states.flatten(2).transpose(1, 2) + self.time(timestep.view(-1, 1, 1).float() / 1000)
        for block in self.blocks:
            tokens = block(tokens)
        return tokens.transpose(1, 2).reshape(b, c, h, w)


class ToyFamily(Family):
    name = "Toy"
    timestep_index = 1
    key_value_refusal = None

    def sites(self, model):
        return [Site(f"blocks.{i}", block, model, ("attn1",)) for i, block in enumerate(model.blocks)]

    def grid(self, module, args, kwargs):
        x = args[0] if args else kwargs["hidden_states"]
        return tuple(x.shape[-2:])


tofu_sd.register_family(ToyTransformer, ToyFamily())  # this test-only class stays registered


class Unregistered(torch.nn.Module):
    def forward(self, x):
        return x


@pytest.mark.parametrize("options", [{}, {"reduce": "kv", "schedule": "PAM"}, {"matching": "local", "blocks": "0,2"}])
def test_a_registered_toy_family_works_end_to_end(options):
    model = ToyTransformer()
    x = torch.randn(2, 16, 6, 8, generator=torch.Generator().manual_seed(1))
    t = torch.tensor([500.0, 500.0])
    with torch.no_grad():
        reference = model(x, t)
    before = structure(model)
    tofu_sd.apply(model, 0.5, **options)
    assert [b.letter for b in tofu_sd.patched_blocks(model)] == list(options.get("schedule", "MMM"))[: len(tofu_sd.patched_blocks(model))]
    seen, handles = {}, []
    for block in tofu_sd.patched_blocks(model):
        for part in ("to_q", "to_k"):
            module = model.get_submodule(f"{block.name}.attn1.{part}")
            handles.append(module.register_forward_pre_hook(lambda m, a, key=(block.name, part): seen.update({key: a[0].shape[1]})))
    with torch.no_grad():
        patched = model(x, t)
    for handle in handles:
        handle.remove()
    kv = options.get("reduce") == "kv"
    for block in tofu_sd.patched_blocks(model):
        assert seen[(block.name, "to_q")] == (48 if kv else 24) and seen[(block.name, "to_k")] == 24
    assert not torch.allclose(patched, reference)
    tofu_sd.remove(model)
    assert structure(model) == before
    with torch.no_grad():
        assert torch.equal(model(x, t), reference)


def test_an_unregistered_class_names_the_families_and_register_family_checks_its_arguments():
    with pytest.raises(ValueError, match="does not support Unregistered.*register_family"):
        tofu_sd.apply(Unregistered())
    with pytest.raises(TypeError, match="torch.nn.Module subclass"):
        tofu_sd.register_family(int, ToyFamily())
    with pytest.raises(TypeError, match="Family instance"):
        tofu_sd.register_family(ToyTransformer, object())


def test_an_older_diffusers_is_refused_by_the_families_tested_on_a_newer_one(monkeypatch):
    """Qwen-Image's adapter (and reduce="kv" on SD3's joint attention) was written on diffusers 0.42.1: under an
    older release ``apply`` refuses, naming both versions, and leaves the model alone; the older families apply."""
    import importlib.metadata

    from tests.test_dit_common import sd3_inputs, tiny_qwenimage, tiny_sd3

    real = importlib.metadata.version
    monkeypatch.setattr(importlib.metadata, "version", lambda name: "0.41.0" if name == "diffusers" else real(name))
    qwen, sd3 = tiny_qwenimage(), tiny_sd3()
    for model, options in [(qwen, {}), (sd3, {"reduce": "kv"})]:
        with pytest.raises(ValueError, match=r"tested on diffusers >= 0\.42\.1; this environment has diffusers 0\.41\.0"):
            tofu_sd.apply(model, 0.5, **options)
        assert tofu_sd.get_state(model) is None
    tofu_sd.apply(sd3, 0.5)  # reduce="tokens" on SD3: the package's floor holds
    with torch.no_grad():
        sd3(**sd3_inputs(sd3))
    tofu_sd.remove(sd3)
