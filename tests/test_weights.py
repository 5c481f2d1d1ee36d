"""How the built-in models' weights are stored (``evaluation.weights``): float16 files loaded as float32, and the
VAE's weights held once for both models."""

import os

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from evaluation.shapes import MODEL_DIR as TINY_DIR
from evaluation.shapes_sd3 import MODEL_DIR as SD3_DIR
from evaluation.weights import halve_components, halve_safetensors, link_weights, same_weights


def _write(path, **tensors):
    save_file(tensors, path, metadata={"format": "pt", "note": "kept"})


def test_halving_rounds_floats_keeps_the_rest_and_the_metadata(tmp_path):
    x, n = torch.randn(5, 3, dtype=torch.float64), torch.arange(4)
    path = tmp_path / "w.safetensors"
    _write(path, x=x, n=n, h=x.to(torch.bfloat16))
    mode = path.stat().st_mode
    halve_safetensors(path)
    out = load_file(path)
    assert out["x"].dtype == torch.float16 and torch.equal(out["x"], x.to(torch.float16))
    assert torch.equal(out["n"], n) and out["h"].dtype == torch.bfloat16  # neither is a float32/64 tensor
    with safe_open(path, "pt") as f:
        assert f.metadata()["note"] == "kept"
    assert path.stat().st_mode == mode and not list(tmp_path.glob("*.tmp"))


def test_halving_refuses_values_float16_cannot_hold_and_leaves_the_file(tmp_path):
    path = tmp_path / "w.safetensors"
    _write(path, x=torch.tensor([1.0, 7e4]))
    before = path.read_bytes()
    with pytest.raises(ValueError, match="float16's range"):
        halve_safetensors(path)
    assert path.read_bytes() == before


def test_halving_a_component_without_weights_is_an_error(tmp_path):
    (tmp_path / "unet").mkdir()
    with pytest.raises(FileNotFoundError, match="'unet' has no safetensors"):
        halve_components(tmp_path, ("unet",))


def test_link_weights_shares_identical_files_and_refuses_others(tmp_path):
    shared, mine = tmp_path / "a" / "vae", tmp_path / "b" / "model" / "vae"
    shared.mkdir(parents=True), mine.mkdir(parents=True)
    _write(shared / "m.safetensors", x=torch.ones(3))
    _write(mine / "m.safetensors", x=torch.ones(3) * 2)
    assert not same_weights(mine, shared)
    with pytest.raises(ValueError, match="not identical"):
        link_weights(mine, shared, mine)
    assert not (mine / "m.safetensors").is_symlink()
    _write(mine / "m.safetensors", x=torch.ones(3, dtype=torch.float64))
    assert not same_weights(mine, shared)  # equal values, another dtype
    _write(mine / "m.safetensors", x=torch.ones(3))  # its metadata may be written in another order: still the same
    link_weights(mine, shared, mine)
    link = mine / "m.safetensors"
    assert link.is_symlink() and not os.path.isabs(os.readlink(link))
    assert torch.equal(load_file(link)["x"], torch.ones(3))


def _dtypes(path):
    with safe_open(path, "pt") as f:
        return {f.get_slice(k).get_dtype() for k in f.keys()}


shipped = pytest.mark.skipif(not (SD3_DIR / "model_index.json").is_file(), reason="the models are not exported")


@shipped
def test_shipped_weights_are_float16_held_once_and_within_40_mb():
    for folder in (TINY_DIR / "unet", TINY_DIR / "vae", SD3_DIR / "transformer"):
        assert _dtypes(next(folder.glob("*.safetensors"))) == {"F16"}, folder
    vae = SD3_DIR / "vae" / "diffusion_pytorch_model.safetensors"
    assert vae.is_symlink() and vae.resolve() == (TINY_DIR / "vae" / vae.name).resolve()
    files = {p.resolve() for d in (TINY_DIR, SD3_DIR) for p in d.rglob("*.safetensors")}
    assert sum(p.stat().st_size for p in files) <= 40 * 10**6


@shipped
def test_shipped_models_load_as_float32():
    from diffusers import AutoencoderKL, SD3Transformer2DModel, UNet2DConditionModel

    for cls, folder in ((UNet2DConditionModel, TINY_DIR / "unet"), (SD3Transformer2DModel, SD3_DIR / "transformer"),
                        (AutoencoderKL, SD3_DIR / "vae")):  # fmt: skip
        assert {p.dtype for p in cls.from_pretrained(folder).parameters()} == {torch.float32}
