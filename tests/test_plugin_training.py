"""Training through Token Fusion: backward works for every letter and both matchings, LoRA trains with the
defaults, and the gradient of reduce -> f -> restore equals finite differences."""

import pytest
import torch

import tofu_sd
from evaluation.tiny_random import tiny_unet, tiny_unet_inputs
from tofu_sd.merge import reduce_tokens, restore_tokens
from tofu_sd.reference import bipartite_soft_matching, local_bipartite_soft_matching, partition


def backward(unet):
    """One training step's backward on a tiny U-Net; returns the tokens that reached each patched attn1."""
    seen, handles = {}, []
    for block in tofu_sd.patched_blocks(unet):
        to_q = unet.get_submodule(f"{block.name}.attn1.to_q")
        record = lambda _, args, name=block.name: seen.update({name: args[0].shape[1]})  # noqa: E731
        handles.append(to_q.register_forward_pre_hook(record))
    try:
        unet(**tiny_unet_inputs(unet, batch=1)).sample.pow(2).mean().backward()
    finally:
        for handle in handles:
            handle.remove()
    return seen


@pytest.mark.parametrize("matching", ["global", "local"])
@pytest.mark.parametrize("schedule", [None, "PAMPA"], ids=["default", "every-letter"])
def test_backward_reaches_every_patched_block(schedule, matching):
    unet = tiny_unet("sd15").train()
    tofu_sd.apply(unet, ratio=0.5, schedule=schedule, matching=matching)
    seen = backward(unet)
    blocks = tofu_sd.patched_blocks(unet)
    assert seen == {block.name: 128 for block in blocks}  # reduced in training too (256 tokens)
    for block in blocks:
        for part in ("attn1.to_q", "attn1.to_v", "norm1", "ff.net.2"):
            grad = unet.get_submodule(f"{block.name}.{part}").weight.grad
            assert grad is not None and torch.isfinite(grad).all() and grad.abs().sum() > 0, (block.name, part)


def test_lora_training_with_the_defaults():
    peft = pytest.importorskip("peft")
    unet = tiny_unet("sd15")
    unet.add_adapter(peft.LoraConfig(r=4, lora_alpha=4, target_modules=["to_q", "to_k", "to_v", "to_out.0"]))
    unet.train()
    tofu_sd.apply(unet)  # PPMMM
    assert backward(unet)
    for block in tofu_sd.patched_blocks(unet):
        # peft starts B at zero, so the first step's gradient reaches B (A's is B^T times it: zero).
        grad = unet.get_submodule(f"{block.name}.attn1.to_q.lora_B.default").weight.grad
        assert grad is not None and torch.isfinite(grad).all() and grad.abs().sum() > 0, block.name


def _matching(x, local):
    """A fixed matching of ``x`` ``(B, 20, C)`` on a 4 x 5 grid (a leftover column) with 2 x 2 cells."""
    offsets = torch.tensor([[3, 1], [0, 2]])
    if local:
        return local_bipartite_soft_matching(x, 4, 5, 2, 2, 9, offsets, window=1)
    return bipartite_soft_matching(x, *partition(4, 5, 2, 2, offsets), 9)


@pytest.mark.parametrize("local", [False, True], ids=["global", "local"])
@pytest.mark.parametrize("mode", ["prune", "mean", "mlerp"])
def test_gradient_equals_finite_differences(mode, local):
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, 20, 3, generator=g, dtype=torch.float64) * torch.rand(2, 20, 1, generator=g, dtype=torch.float64)
    m = _matching(x, local)
    assert m.r == 9 and all((torch.bincount(row) > 1).any() for row in m.dst_idx)  # groups of 3 or more
    weight = torch.randn(3, 3, generator=g, dtype=torch.float64)

    def f(tokens):  # a smooth function of the reduced tokens, as self-attention is
        return restore_tokens(torch.tanh(reduce_tokens(tokens, m, mode) @ weight), m)

    assert torch.autograd.gradcheck(f, (x.clone().requires_grad_(),))
