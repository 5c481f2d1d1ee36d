"""Gradient checkpointing: a checkpointed block is recomputed during the backward pass, after the model call has
ended; it must reduce with the matching of its original forward. Gradients with checkpointing (reentrant and
non-reentrant) are compared with those of the same patch without it, and with the unpatched model's (so a patch
that reduced nothing, in the forward or the recomputation, would fail)."""

import functools

import pytest
import torch
from torch.utils.checkpoint import checkpoint

import tofu_sd
from tofu_sd.install import call_state
from evaluation.tiny_random import tiny_unet, tiny_unet_inputs
from tests.test_dit_common import (
    flux_inputs,
    pixart_inputs,
    NEWER_DIFFUSERS,
    qwenimage_inputs,
    sd3_inputs,
    tiny_flux,
    tiny_pixart,
    tiny_qwenimage,
    tiny_sd3,
)


def _checkpointing(module, *args, reentrant: bool):
    return checkpoint(module.__call__, *args, use_reentrant=reentrant)


def gradients(model, inputs, checkpointed: bool, reentrant: bool = False) -> dict[str, torch.Tensor]:
    """The parameters' gradients of one backward of ``mean(output ** 2)``, but those that are all zero: reentrant
    checkpointing gives zeros (not ``None``) to the parameters the output does not depend on (Qwen-Image's last
    block's text stream, unpatched too), which without checkpointing get none."""
    model.train().zero_grad(set_to_none=True)
    if checkpointed:
        model.enable_gradient_checkpointing(functools.partial(_checkpointing, reentrant=reentrant))
    else:
        model.disable_gradient_checkpointing()
    model(**inputs).sample.pow(2).mean().backward()
    return {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None and p.grad.any()}


def assert_same_gradients(got, expected):
    assert got.keys() == expected.keys()
    scale = max(g.abs().max().item() for g in expected.values())
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], rtol=1e-4, atol=1e-6 * scale, msg=name)


def check(model, inputs, reentrant, **options):
    unpatched = gradients(model, inputs, checkpointed=False)
    tofu_sd.apply(model, **options)
    expected = gradients(model, inputs, checkpointed=False)
    assert max((expected[n] - unpatched[n]).abs().max().item() for n in expected) > 1e-3  # the patch changes them
    assert_same_gradients(gradients(model, inputs, checkpointed=True, reentrant=reentrant), expected)
    assert_same_gradients(gradients(model, inputs, checkpointed=True, reentrant=reentrant), expected)  # again
    tofu_sd.remove(model)
    assert_same_gradients(gradients(model, inputs, checkpointed=True, reentrant=reentrant), unpatched)


@pytest.mark.parametrize("reentrant", [False, True], ids=["non-reentrant", "reentrant"])
@pytest.mark.parametrize("reduce", ["tokens", "kv"])
def test_unet_every_module(reduce, reentrant):
    unet = tiny_unet("sd15")
    check(unet, tiny_unet_inputs(unet, batch=2), reentrant, reduce=reduce, modules="attn1,attn2,ff", schedule="PAMPA")


@pytest.mark.parametrize("reentrant", [False, True], ids=["non-reentrant", "reentrant"])
@pytest.mark.parametrize(
    "build,inputs,options",
    [
        (tiny_sd3, sd3_inputs, {}),
        (functools.partial(tiny_sd3, dual_attention_layers=(0, 1)), sd3_inputs, {"schedule": "PAM"}),
        (tiny_pixart, pixart_inputs, {}),
        (tiny_pixart, pixart_inputs, {"reduce": "kv"}),
        (tiny_flux, flux_inputs, {"schedule": "PAMP"}),
        pytest.param(tiny_qwenimage, qwenimage_inputs, {"schedule": "PM"}, marks=NEWER_DIFFUSERS),
    ],
    ids=["sd3", "sd3.5", "pixart", "pixart-kv", "flux", "qwen-image"],
)
def test_diffusion_transformers(build, inputs, options, reentrant):
    model = build()
    check(model, inputs(model), reentrant, **options)


def test_matchings_kept_for_recomputation_are_freed_with_the_graph():
    """The kept matchings live as long as the block inputs that the autograd graph holds."""
    unet = tofu_sd.apply(tiny_unet("sd15"))
    unet.train().enable_gradient_checkpointing()
    store = call_state(unet).recompute
    loss = unet(**tiny_unet_inputs(unet, batch=2)).sample.pow(2).mean()
    assert len(store) == 5
    loss.backward()
    del loss
    with torch.no_grad():  # no gradients: nothing is kept, and the dead entries go at the next keep
        unet(**tiny_unet_inputs(unet, batch=2))
    assert len(store) == 0
    kept = unet(**tiny_unet_inputs(unet, batch=1)).sample.sum()
    assert len(store) == 5 and kept.requires_grad
