"""``reduce="kv"`` on the joint attentions of SD3 / SD3.5 and Flux, checked alone: a real block's attention
carrying the plugin's :class:`~tofu_sd.joint_kv.JointKeyValueHook`, fed a matching as the block's matching hook
would, against full attention on duplicated image tokens (merging copies with proportional attention loses
nothing) and against a loop-based reference: every query, one key and value per group of the matching, softmax
with ``log(size)`` by hand, on Flux rotary embedding by hand with the position of each group's kept token.
The wiring through whole models is in test_dit_kv.py."""

import pytest

pytest.importorskip("diffusers", minversion="0.42.1")  # written and tested on it; older ones are refused


import math

import pytest
import torch
from diffusers import SD3Transformer2DModel
from test_dit_common import grid_ids, tiny_flux
from test_plugin_kv import duplicated_tokens, groups_of, merged_token

from tofu_sd.families.flux import FluxFamily
from tofu_sd.families.sd3 import SD3Family
from tofu_sd.hooking import register_innermost
from tofu_sd.joint_kv import JointKeyValueHook
from tofu_sd.merge import MODES
from tofu_sd.reducing import REDUCE_HOOK
from tofu_sd.reference import bipartite_soft_matching, partition
from tofu_sd.state import BlockState

LETTER = {mode: letter for letter, mode in MODES.items()}


def tiny_sd35(seed=0):
    """SD3.5's make: RMS q/k norms (with weights other than 1) and a dual-attention first block, in float64."""
    torch.manual_seed(seed)
    model = SD3Transformer2DModel(
        sample_size=16, patch_size=1, in_channels=4, num_layers=2, attention_head_dim=8, num_attention_heads=4,
        caption_projection_dim=32, joint_attention_dim=32, pooled_projection_dim=64, out_channels=4,
        qk_norm="rms_norm", dual_attention_layers=(0,),
    ).eval()  # fmt: skip
    for name, p in model.named_parameters():
        if ".norm_" in name:
            p.data.uniform_(0.5, 1.5)
    return model.double()


def hooked(attn, m, mode, joint, text_len=None):
    """``attn`` carrying the plugin's joint key-value hook, fed ``m`` as the block's matching hook would."""
    state = BlockState()
    state.matching, state.text_len = m, text_len
    register_innermost(attn, JointKeyValueHook(state, LETTER[mode], joint, text_first=text_len is not None), REDUCE_HOOK)
    return attn


def attend(q, k, v, bias):
    """One head, one query at a time: ``softmax(q_i . k_j / sqrt(d) + bias_j)`` by hand, times the values."""
    out = torch.empty(q.shape[0], v.shape[1], dtype=q.dtype)
    for i in range(q.shape[0]):
        logits = k @ q[i] / math.sqrt(q.shape[1]) + bias
        weights = torch.exp(logits - logits.max())
        out[i] = (weights / weights.sum()) @ v
    return out


def norm(module, t):
    return t if module is None else module(t)


def groups_and_bias(x, m, b, mode):
    """Batch element ``b``'s key tokens (one per group of ``m``), the position of each group's kept token (a
    destination, or an unmerged source) and ``log(size)`` per group."""
    groups = groups_of(m, b)
    tokens = torch.stack([merged_token(x, g, mode) for g in groups])
    return tokens, [g[0] for g in groups], [math.log(len(g)) for g in groups]


def reference_sd3(attn, x, text, m, mode):
    """JointAttnProcessor2_0's attention by hand: every query, the keys and values of the groups of ``m``."""
    H, d = attn.heads, attn.to_q.out_features // attn.heads
    N, images, texts = x.shape[1], [], []
    for b in range(x.shape[0]):
        kv, _, bias = groups_and_bias(x[b], m, b, mode)
        q, k, v = attn.to_q(x[b]), attn.to_k(kv), attn.to_v(kv)
        if text is not None:
            tq, tk, tv = attn.add_q_proj(text[b]), attn.add_k_proj(text[b]), attn.add_v_proj(text[b])
            bias = bias + [0.0] * text.shape[1]
        heads = []
        for h in range(H):
            c = slice(h * d, (h + 1) * d)
            qh, kh, vh = norm(attn.norm_q, q[:, c]), norm(attn.norm_k, k[:, c]), v[:, c]
            if text is not None:
                qh = torch.cat([qh, norm(attn.norm_added_q, tq[:, c])])
                kh, vh = torch.cat([kh, norm(attn.norm_added_k, tk[:, c])]), torch.cat([vh, tv[:, c]])
            heads.append(attend(qh, kh, vh, torch.tensor(bias, dtype=x.dtype)))
        out = torch.cat(heads, 1)
        images.append(attn.to_out[0](out[:N]))
        if text is not None:
            texts.append(out[N:] if attn.context_pre_only else attn.to_add_out(out[N:]))
    return torch.stack(images) if text is None else (torch.stack(images), torch.stack(texts))


def rotate(t, cos, sin):
    """Rotary embedding of rows ``t`` ``(S, d)`` with their tables ``(S, d)``: each pair ``(2i, 2i + 1)`` turned;
    in float32, as diffusers' ``apply_rotary_emb`` computes it whatever the dtype."""
    pairs = t.float().unflatten(-1, (-1, 2))
    turned = torch.stack([-pairs[..., 1], pairs[..., 0]], -1).flatten(-2)
    return (t.float() * cos.float() + turned * sin.float()).to(t.dtype)


def reference_flux(attn, x, text, emb, m, mode, text_len=0):
    """FluxAttnProcessor's attention by hand: every query at its own position; text keys, then one key per group
    of ``m``, rotated with the position of the group's kept token (its destination, for a merged group)."""
    cos, sin = emb
    H, d = attn.heads, attn.head_dim
    T = text_len if text is None else text.shape[1]
    outs = []
    for b in range(x.shape[0]):
        kv, positions, log_s = groups_and_bias(x[b, text_len:], m, b, mode)
        if text is None:  # single stream: [text, image] through the same projections and norms
            q, k, v = attn.to_q(x[b]), attn.to_k(torch.cat([x[b, :T], kv])), attn.to_v(torch.cat([x[b, :T], kv]))
            q_norms, k_norms = [attn.norm_q] * len(q), [attn.norm_k] * len(k)
        else:
            q = torch.cat([attn.add_q_proj(text[b]), attn.to_q(x[b])])
            k, v = torch.cat([attn.add_k_proj(text[b]), attn.to_k(kv)]), torch.cat([attn.add_v_proj(text[b]), attn.to_v(kv)])
            q_norms = [attn.norm_added_q] * T + [attn.norm_q] * x.shape[1]
            k_norms = [attn.norm_added_k] * T + [attn.norm_k] * len(kv)
        q_rows = list(range(q.shape[0]))
        k_rows = list(range(T)) + [T + p for p in positions]
        bias = torch.tensor([0.0] * T + log_s, dtype=x.dtype)
        heads = []
        for h in range(H):
            c = slice(h * d, (h + 1) * d)
            qh = torch.stack([n(row) for n, row in zip(q_norms, q[:, c])])
            kh = torch.stack([n(row) for n, row in zip(k_norms, k[:, c])])
            qh, kh = rotate(qh, cos[q_rows], sin[q_rows]), rotate(kh, cos[k_rows], sin[k_rows])
            heads.append(attend(qh, kh, v[:, c], bias))
        outs.append(torch.cat(heads, 1))
    out = torch.stack(outs)
    if text is None:
        return out
    return attn.to_out[0](out[:, T:]), attn.to_add_out(out[:, :T])


def image_tokens(h, w, C, seed, B=2):
    """Tokens of norms 0.5 to 1.5 and their matching on an ``h x w`` grid, with groups of several sizes."""
    g = torch.Generator().manual_seed(seed)
    norms = 0.5 + torch.rand(B, h * w, 1, generator=g, dtype=torch.float64)
    x = torch.randn(B, h * w, C, generator=g, dtype=torch.float64) * norms
    offsets = torch.randint(4, (h // 2, w // 2), generator=g)
    m = bipartite_soft_matching(x, *partition(h, w, 2, 2, offsets), h * w // 2)
    assert all(max(map(len, groups_of(m, b))) >= 3 for b in range(B))
    return x, m


def flux_block_attentions(model, T, h, w):
    """A float64 Flux's double- and single-stream attentions and the rotary table of ``T`` text and ``h x w``
    image tokens."""
    model = model.double()
    emb = model.pos_embed(torch.cat([torch.zeros(T, 3), grid_ids(h, w)]).double())
    return model.transformer_blocks[0].attn, model.single_transformer_blocks[0].attn, emb


@pytest.mark.parametrize("mode", ["prune", "mean", "mlerp"])
@pytest.mark.parametrize("which", ["joint", "attn2", "last-joint"])
def test_sd3_attention_equals_loop_reference(which, mode):
    model = tiny_sd35()
    attn = {"joint": model.transformer_blocks[0].attn, "attn2": model.transformer_blocks[0].attn2,
            "last-joint": model.transformer_blocks[1].attn}[which]  # fmt: skip
    assert bool(attn.context_pre_only) == (which == "last-joint")
    x, m = image_tokens(6, 7, 32, seed=len(mode))
    text = None if which == "attn2" else torch.randn(2, 5, 32, dtype=torch.float64)
    hooked(attn, m, mode, SD3Family.joint_attention)
    with torch.no_grad():
        got = attn(x) if text is None else attn(x, encoder_hidden_states=text)
        expected = reference_sd3(attn, x, text, m, mode)
    torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("mode", ["prune", "mean", "mlerp"])
@pytest.mark.parametrize("stream", ["double", "single"])
def test_flux_attention_equals_loop_reference(stream, mode):
    T, h, w = 5, 6, 7
    double, single, emb = flux_block_attentions(tiny_flux(), T, h, w)
    x, m = image_tokens(h, w, 32, seed=len(mode) + len(stream))
    text = torch.randn(2, T, 32, dtype=torch.float64)
    with torch.no_grad():
        if stream == "double":
            got = hooked(double, m, mode, FluxFamily.joint_attention)(x, text, image_rotary_emb=emb)
            expected = reference_flux(double, x, text, emb, m, mode)
        else:
            joint = torch.cat([text, x], 1)
            got = hooked(single, m, mode, FluxFamily.joint_attention, text_len=T)(joint, image_rotary_emb=emb)
            expected = reference_flux(single, joint, None, emb, m, mode, text_len=T)
    torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("mode", ["prune", "mean", "mlerp"])
@pytest.mark.parametrize("which", ["sd3-joint", "sd3-attn2", "flux-double", "flux-single"])
def test_duplicated_image_tokens_give_full_attention(which, mode):
    """Every source a copy of its cell's destination (at its position, for Flux's rotary): merging copies with
    proportional attention loses nothing, for the image and the text outputs alike."""
    x, dst, src, cell = duplicated_tokens(C=32)
    x = x.double()
    m = bipartite_soft_matching(x, dst, src, 24)
    text = torch.randn(2, 5, 32, dtype=torch.float64)
    kwargs, text_len = {}, None
    if which.startswith("sd3"):
        block, joint = tiny_sd35().transformer_blocks[0], SD3Family.joint_attention
        attn, args = (block.attn, (x, text)) if which == "sd3-joint" else (block.attn2, (x,))
    else:
        double, single, emb = flux_block_attentions(tiny_flux(), 5, 8, 8)
        position = torch.arange(64)
        position[src] = dst[cell]  # a copy sits at its destination's position
        kwargs["image_rotary_emb"] = tuple(torch.cat([t[:5], t[5:][position]]) for t in emb)
        joint = FluxFamily.joint_attention
        if which == "flux-double":
            attn, args = double, (x, text)
        else:
            attn, args, text_len = single, (torch.cat([text, x], 1),), 5
    with torch.no_grad():
        full = attn(*args, **kwargs)
        got = hooked(attn, m, mode, joint, text_len)(*args, **kwargs)
    for g, f in zip(got if isinstance(got, tuple) else (got,), full if isinstance(full, tuple) else (full,)):
        torch.testing.assert_close(g, f, rtol=1e-9, atol=1e-10)
