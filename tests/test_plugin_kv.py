"""``reduce="kv"``: every token stays a query, keys and values are ToFu's reduced tokens, with proportional attention.

The attention itself is checked on a real diffusers ``Attention`` (both processors) carrying the plugin's hook,
against full attention (duplicated tokens) and a loop-based reference; the wiring through a U-Net by the token
counts reaching ``attn1`` and by every patched block's output against the same reference.
"""

import copy
import math

import pytest
import torch
from diffusers.models.attention_processor import Attention, AttnProcessor, AttnProcessor2_0

import tofu_sd
from evaluation.tiny_random import tiny_unet, tiny_unet_inputs
from tofu_sd.hooking import register_innermost
from tofu_sd.reducing import REDUCE_HOOK, KeyValueHook
from tofu_sd.state import BlockState
from tofu_sd.merge import MODES, reduce_tokens
from tofu_sd.reference import bipartite_soft_matching, local_bipartite_soft_matching, partition

PROCESSORS = [AttnProcessor, AttnProcessor2_0]
LETTER = {mode: letter for letter, mode in MODES.items()}


def run(unet, **kw):
    with torch.no_grad():
        return unet(**tiny_unet_inputs(unet, **kw)).sample


def attention(processor, dim=16, heads=2, dtype=torch.float32, **kw):
    torch.manual_seed(0)
    attn = Attention(query_dim=dim, heads=heads, dim_head=dim // heads, out_bias=True, **kw).to(dtype)
    attn.set_processor(processor())
    return attn


def with_kv_hook(attn, m, mode):
    """``attn`` carrying the plugin's key-value hook, fed the matching ``m`` as the block's matching hook would."""
    state = BlockState()
    state.matching = m
    register_innermost(attn, KeyValueHook(state, LETTER[mode]), REDUCE_HOOK)
    return attn


def groups_of(m, b):
    """The groups of the reduced sequence of batch element ``b``: a list of lists of original positions, each
    group's kept token first (an unmerged source, or a destination followed by the sources reduced into it)."""
    groups = {int(p): [int(p)] for p in m.keep_idx[b].tolist()}
    for s, slot in zip(m.src_idx[b].tolist(), m.dst_slot[b].tolist()):
        groups[int(m.keep_idx[b, slot])].append(s)
    return list(groups.values())


def merged_token(x, group, mode):
    """A group's key/value token by the paper's formulas: its kept token (P), mean (A), MLERP (M)."""
    if mode == "prune":
        return x[group[0]]
    mean = x[group].mean(0)
    if mode == "mean" or len(group) == 1:
        return mean if len(group) > 1 else x[group[0]]
    return mean / mean.norm() * x[group].norm(dim=-1).max()


def reference_attention(attn, x, m, mode):
    """softmax(Q K^T / sqrt(d) + log s) V per batch element and head, with explicit weights; keys and values from
    the groups of ``m`` (one key per group, ``s`` its size)."""
    heads = attn.heads
    out = torch.empty_like(x)
    for b in range(x.shape[0]):
        groups = groups_of(m, b)
        kv = torch.stack([merged_token(x[b], g, mode) for g in groups])
        log_s = torch.tensor([math.log(len(g)) for g in groups], dtype=x.dtype)
        q, k, v = x[b] @ attn.to_q.weight.T, kv @ attn.to_k.weight.T, kv @ attn.to_v.weight.T
        d = q.shape[1] // heads
        per_head = []
        for h in range(heads):
            cols = slice(h * d, (h + 1) * d)
            logits = q[:, cols] @ k[:, cols].T / math.sqrt(d) + log_s
            per_head.append(torch.softmax(logits, dim=-1) @ v[:, cols])
        out[b] = torch.cat(per_head, 1) @ attn.to_out[0].weight.T + attn.to_out[0].bias
    return out


def duplicated_tokens(h=8, w=8, C=16, B=2, seed=0):
    """Tokens whose every source is an exact copy of its cell's destination, and the partition."""
    g = torch.Generator().manual_seed(seed)
    offsets = torch.randint(4, (h // 2, w // 2), generator=g)
    dst, src = partition(h, w, 2, 2, offsets)
    x = torch.randn(B, h * w, C, generator=g)
    cell = (src // w // 2) * (w // 2) + src % w // 2
    x[:, src] = x[:, dst[cell]]
    return x, dst, src, cell


@pytest.mark.parametrize("processor", PROCESSORS)
@pytest.mark.parametrize("mode", ["prune", "mean", "mlerp"])
@pytest.mark.parametrize("r", [24, 48], ids=["half", "every-source"])
def test_duplicated_tokens_give_full_attention_only_with_the_log_size(processor, mode, r):
    x, dst, src, cell = duplicated_tokens()
    m = bipartite_soft_matching(x, dst, src, r)
    for b in range(2):  # each reduced source went to its own copy
        assert torch.equal(dst[cell[(src.unsqueeze(1) == m.src_idx[b]).int().argmax(0)]], m.keep_idx[b, m.dst_slot[b]])
    attn = attention(processor)
    with torch.no_grad():
        full = attn(x)
        without_log = attn(x, encoder_hidden_states=reduce_tokens(x, m, mode))
        kv = with_kv_hook(attn, m, mode)(x)
    assert m.keep_idx.shape[1] == 64 - r  # 16 keys when every source is merged (as ToDo's 2x2 pooling)
    torch.testing.assert_close(kv, full, rtol=1e-5, atol=1e-6)
    if r == 48:  # every group has 4 tokens: log(4) on every key shifts all logits alike, a no-op in softmax
        torch.testing.assert_close(without_log, full, rtol=1e-5, atol=1e-6)
    else:  # groups of 1 to 4 tokens: the same keys and values without log(size) are not full attention
        assert sorted({len(group) for b in range(2) for group in groups_of(m, b)}) == [1, 2, 3, 4]
        assert (without_log - full).abs().max() > 1e-2


@pytest.mark.parametrize("processor", PROCESSORS)
@pytest.mark.parametrize("matching", ["global", "local"])
@pytest.mark.parametrize("mode", ["prune", "mean", "mlerp"])
def test_key_value_attention_equals_loop_reference(processor, matching, mode):
    h, w, r = 6, 7, 18  # a leftover column of sources
    g = torch.Generator().manual_seed(len(mode) + len(matching))
    x = torch.randn(2, h * w, 16, generator=g, dtype=torch.float64) * torch.rand(2, h * w, 1, generator=g, dtype=torch.float64)
    offsets = torch.randint(4, (h // 2, w // 2), generator=g)
    if matching == "local":
        m = local_bipartite_soft_matching(x, h, w, 2, 2, r, offsets, window=3)
    else:
        m = bipartite_soft_matching(x, *partition(h, w, 2, 2, offsets), r)
    assert all(max(map(len, groups_of(m, b))) >= 3 for b in range(2))  # groups of several sizes
    attn = with_kv_hook(attention(processor, dtype=torch.float64), m, mode)
    with torch.no_grad():
        torch.testing.assert_close(attn(x), reference_attention(attn, x, m, mode), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("processor", PROCESSORS)
def test_calls_with_their_own_mask_or_keys_are_left_alone(processor):
    x, dst, src, _ = duplicated_tokens(seed=1)
    x = x + 0.1 * torch.randn_like(x)
    m = bipartite_soft_matching(x, dst, src, 32)
    other = torch.randn(2, 5, 16)
    mask = torch.zeros(2, 1, 64)
    mask[:, :, ::3] = -1.0
    attn = attention(processor)
    with torch.no_grad():
        expected = [attn(x, attention_mask=mask), attn(x, encoder_hidden_states=other)]
        with_kv_hook(attn, m, "mean")
        assert torch.equal(attn(x, attention_mask=mask), expected[0])
        assert torch.equal(attn(x, encoder_hidden_states=other), expected[1])
        assert not torch.allclose(attn(x), attention(processor)(x))  # the hook is active on a plain call


@pytest.mark.parametrize("processor", PROCESSORS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_and_upcast_attention(processor, dtype):
    """The classic processor adds the mask to float32 scores when ``upcast_attention`` is set."""
    x, dst, src, _ = duplicated_tokens(seed=2)
    m = bipartite_soft_matching(x, dst, src, 48)
    expected = attention(processor)(x)
    attn = with_kv_hook(attention(processor, dtype=dtype, upcast_attention=True), m, "mlerp")
    with torch.no_grad():
        out = attn(x.to(dtype))
    assert out.dtype == dtype
    torch.testing.assert_close(out.float(), expected, rtol=0.05, atol=0.02)


# ------------------------------------------------------------------------------------------- through a U-Net


def attn1_shapes(unet, **kw):
    """Tokens reaching each transformer block's attn1 queries and keys, attn2 and ff, by block name."""
    counts, handles = {}, []
    for name, module in unet.named_modules():
        if name.rsplit(".", 1)[0].endswith("transformer_blocks"):
            parts = {"q": module.attn1.to_q, "k": module.attn1.to_k, "v": module.attn1.to_v, "attn2": module.attn2.to_q, "ff": module.ff}
            for part, sub in parts.items():
                record = lambda _, args, key=(name, part): counts.update({key: args[0].shape[1]})
                handles.append(sub.register_forward_pre_hook(record))
    try:
        run(unet, **kw)
    finally:
        for handle in handles:
            handle.remove()
    return counts


@pytest.mark.parametrize(
    "kind,h,w,options",
    [
        ("sd15", 16, 16, {}),
        ("sd15", 15, 13, {"sx": 3, "sy": 2, "ratio": 0.6, "matching": "local"}),
        ("sd15", 16, 16, {"ratio": 0.75}),  # every source merged: N/4 keys, as ToDo's 2x2 pooling
        ("sdxl", 16, 12, {"schedule": "A"}),
    ],
)
def test_every_query_and_fewer_keys_reach_attn1(kind, h, w, options):
    unet = tofu_sd.apply(tiny_unet(kind), reduce="kv", **options)
    patched = {b.name for b in tofu_sd.patched_blocks(unet)}
    counts = attn1_shapes(unet, height=h, width=w)
    gh, gw = (h, w) if kind != "sdxl" else (h // 2, w // 2)  # SDXL's first transformer level is 2x down
    n = gh * gw
    sx, sy, ratio = options.get("sx", 2), options.get("sy", 2), options.get("ratio", 0.5)
    num_src = n - (gh // sy) * (gw // sx)
    keys = n - min(int(n * ratio), num_src)
    if ratio == 0.75:
        assert keys == n // 4
    for (name, part), count in counts.items():
        if name in patched and part in ("k", "v"):
            assert count == keys, (name, part)
        else:  # queries, cross-attention, feed-forward and unpatched blocks see every token
            assert count == counts[(name, "attn2")], (name, part)
    assert patched and all(counts[(name, "q")] == n for name in patched)


@pytest.mark.parametrize("processor", PROCESSORS)
@pytest.mark.parametrize("options", [{"seed": 3}, {"matching": "local", "schedule": "PAMAP", "use_rand": False}])
def test_each_patched_attn1_output_equals_the_reference(processor, options, monkeypatch):
    """Every patched attn1 of a U-Net (CFG batch of 2) against the loop reference on its own input and matching."""
    unet = tiny_unet("sd15")
    unet.set_attn_processor(processor())
    tofu_sd.apply(unet, reduce="kv", **options)
    matchings, seen, handles = [], [], []
    real_match = tofu_sd.state.match
    monkeypatch.setattr(tofu_sd.state, "match", lambda x, plan: matchings.append(real_match(x, plan)) or matchings[-1])
    blocks = tofu_sd.patched_blocks(unet)
    for block in blocks:
        attn1 = unet.get_submodule(f"{block.name}.attn1")
        record = lambda mod, args, out, mode=block.mode: seen.append((mod, args[0], out, mode))
        handles.append(attn1.register_forward_hook(record))
    run(unet)
    for handle in handles:
        handle.remove()
    assert len(matchings) == len(seen) == len(blocks) == 5
    for m, (attn1, x, out, mode) in zip(matchings, seen):
        assert out.shape == x.shape == (2, 256, 32) and m.r == 128
        with torch.no_grad():
            torch.testing.assert_close(out, reference_attention(attn1, x, m, mode), rtol=1e-4, atol=1e-5)


def test_remove_and_ratio_zero_are_bit_identical(unet_sd15):
    reference = run(unet_sd15)
    tofu_sd.apply(unet_sd15, reduce="kv")
    kv = run(unet_sd15)
    assert not torch.equal(kv, reference) and not torch.equal(kv, run(tofu_sd.apply(unet_sd15)))
    tofu_sd.remove(unet_sd15)
    assert torch.equal(run(unet_sd15), reference)
    assert not any({"_diffusers_hook", "forward", "__deepcopy__"} & m.__dict__.keys() for m in unet_sd15.modules())
    tofu_sd.apply(unet_sd15, ratio=0.0, reduce="kv")
    assert torch.equal(run(unet_sd15), reference) and tofu_sd.get_state(unet_sd15).config.reduce == "kv"


def test_each_sample_is_independent_of_its_batch_and_copies_run_alike():
    unet = tofu_sd.apply(tiny_unet("sd15"), reduce="kv", seed=7, matching="local")
    inputs = tiny_unet_inputs(unet, batch=3)
    with torch.no_grad():
        together = unet(**inputs).sample
        for i in range(3):
            alone = unet(inputs["sample"][i : i + 1], inputs["timestep"], inputs["encoder_hidden_states"][i : i + 1])
            torch.testing.assert_close(alone.sample[0], together[i], rtol=1e-4, atol=1e-5)
    twin = copy.deepcopy(unet)
    assert tofu_sd.get_state(twin) == tofu_sd.get_state(unet)
    assert torch.equal(run(twin, batch=3), together)


def test_backward_reaches_keys_and_values():
    unet = tofu_sd.apply(tiny_unet("sd15").train(), reduce="kv", schedule="PAMAM")
    unet(**tiny_unet_inputs(unet, batch=1)).sample.pow(2).mean().backward()
    for block in tofu_sd.patched_blocks(unet):
        for part in ("attn1.to_q", "attn1.to_k", "attn1.to_v", "norm1"):
            grad = unet.get_submodule(f"{block.name}.{part}").weight.grad
            assert grad is not None and torch.isfinite(grad).all() and grad.abs().sum() > 0, (block.name, part)


@pytest.mark.parametrize("value", ["keys", "KV", None, ("kv",)])
def test_bad_reduce_is_refused(value):
    with pytest.raises(ValueError, match=r"reduce must be 'tokens' .* or 'kv'"):
        tofu_sd.TokenFusionConfig(reduce=value)


def test_bad_reduce_leaves_the_model_untouched(unet_sd15):
    tofu_sd.apply(unet_sd15, ratio=0.3, reduce="kv")
    before = run(unet_sd15)
    with pytest.raises(ValueError, match=r"reduce must be 'tokens' .* or 'kv' .*, got 'keys'"):
        tofu_sd.apply(unet_sd15, reduce="keys")
    assert torch.equal(run(unet_sd15), before) and tofu_sd.get_state(unet_sd15).config.reduce == "kv"


def test_attn1_that_would_normalize_its_keys_is_refused(unet_sd15):
    block = "up_blocks.2.attentions.1.transformer_blocks.0"
    unet_sd15.get_submodule(f"{block}.attn1").norm_cross = torch.nn.LayerNorm(32)
    reference = run(unet_sd15)
    with pytest.raises(ValueError, match=rf"reduce='kv' cannot patch {block}.attn1: its norm_cross"):
        tofu_sd.apply(unet_sd15, reduce="kv")
    assert tofu_sd.get_state(unet_sd15) is None and torch.equal(run(unet_sd15), reference)
    tofu_sd.apply(unet_sd15)  # reduce="tokens" never passes keys of its own
