"""``copy.deepcopy`` of a patched U-Net: an independent model, patched alike, that runs its own weights."""

import copy
import types

import pytest
import torch
from diffusers.hooks import HookRegistry, ModelHook

import tofu_sd
from evaluation.tiny_random import tiny_unet, tiny_unet_inputs

INPUTS = tiny_unet_inputs(tiny_unet("sd15"))
ATTN1 = "down_blocks.0.attentions.0.transformer_blocks.0.attn1"


def run(unet, dtype=torch.float32):
    with torch.no_grad():
        return unet(**{k: v.to(dtype) if v.is_floating_point() else v for k, v in INPUTS.items()}).sample


def shift_weights(unet, amount=0.05):
    with torch.no_grad():
        for p in unet.parameters():
            p.add_(amount)


def no_machinery_left(unet):
    return not any({"_diffusers_hook", "forward", "__deepcopy__"} & m.__dict__.keys() for m in unet.modules())


def test_deep_copy_runs_its_own_weights_with_the_same_patch():
    unet = tofu_sd.apply(tiny_unet("sd15"), ratio=0.5, matching="local", seed=4)
    patched = run(unet)
    twin = copy.deepcopy(unet)
    assert torch.equal(run(twin), patched)
    assert tofu_sd.get_state(twin) == tofu_sd.get_state(unet)
    assert tofu_sd.patched_blocks(twin) == tofu_sd.patched_blocks(unet)
    assert twin.get_submodule(ATTN1)._diffusers_hook is not unet.get_submodule(ATTN1)._diffusers_hook
    shift_weights(unet)  # the original's weights do not reach the copy ...
    assert torch.equal(run(twin), patched)
    shift_weights(twin)  # ... and the copy's own weights do, exactly as in a U-Net patched after the same change
    expected = tiny_unet("sd15")
    shift_weights(expected)
    tofu_sd.apply(expected, ratio=0.5, matching="local", seed=4)
    assert torch.equal(run(twin), run(expected))


def test_deep_copy_converts_to_float64():
    unet = tofu_sd.apply(tiny_unet("sd15"))
    twin = copy.deepcopy(unet).to(torch.float64)
    out = run(twin, torch.float64)
    assert out.dtype == torch.float64
    torch.testing.assert_close(out.float(), run(unet), rtol=1e-4, atol=1e-4)
    assert not torch.allclose(run(tiny_unet("sd15")), run(unet))  # the comparison is with the patched output


@pytest.mark.parametrize("removed", ["copy", "original"])
def test_remove_on_one_leaves_the_other_patched(removed):
    unet = tofu_sd.apply(tiny_unet("sd15"), schedule="A")
    patched, full = run(unet), run(tiny_unet("sd15"))
    twin = copy.deepcopy(unet)
    gone, kept = (twin, unet) if removed == "copy" else (unet, twin)
    tofu_sd.remove(gone)
    assert torch.equal(run(gone), full) and no_machinery_left(gone)
    assert torch.equal(run(kept), patched) and tofu_sd.get_state(kept).schedule == "AAAAA"


def test_deep_copy_of_ratio_zero_and_of_a_removed_patch():
    unet = tofu_sd.apply(tiny_unet("sd15"), ratio=0.0)
    assert tofu_sd.get_state(copy.deepcopy(unet)) == tofu_sd.get_state(unet)
    tofu_sd.remove(tofu_sd.apply(unet))
    twin = copy.deepcopy(unet)
    assert tofu_sd.get_state(twin) is None and no_machinery_left(twin)


def test_a_forward_wrapper_installed_before_the_patch_follows_the_copy():
    unet = tiny_unet("sd15")
    attn1 = unet.get_submodule(ATTN1)
    calls = []

    def counting_forward(self, *args, **kwargs):
        calls.append(self)
        return type(self).forward(self, *args, **kwargs)

    attn1.forward = types.MethodType(counting_forward, attn1)  # as accelerate's hooks do
    tofu_sd.apply(unet)
    twin = copy.deepcopy(unet)
    calls.clear()
    assert torch.equal(run(twin), run(unet))
    assert calls == [twin.get_submodule(ATTN1), attn1]
    tofu_sd.remove(twin)
    assert twin.get_submodule(ATTN1).forward.__func__ is counting_forward  # what remove restores


def test_deep_copy_refuses_hooks_of_others_on_patched_modules():
    unet = tofu_sd.apply(tiny_unet("sd15"))
    patched = run(unet)
    HookRegistry.check_if_exists_or_initialize(unet.get_submodule(ATTN1)).register_hook(ModelHook(), "someone.else")
    with pytest.raises(TypeError, match=rf"cannot deep-copy: {ATTN1} has diffusers hooks besides.*someone.else"):
        copy.deepcopy(unet)
    assert torch.equal(run(unet), patched)
