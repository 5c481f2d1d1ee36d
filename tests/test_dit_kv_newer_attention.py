"""``reduce="kv"`` on the attentions of Qwen-Image, Wan and Sana, checked alone: a real block's attention carrying
the plugin's :class:`~tofu_sd.joint_kv.JointKeyValueHook`, fed a matching as the block's matching hook would,
against a loop-based reference (every query, one key and value per group of the matching, the attention by hand:
softmax with ``log(size)`` on the logits, Sana's linear attention with each key weighted by its group's size;
rotary embedding by hand, each query at its own position and each key at its group's kept token's) and against
the full attention on duplicated tokens, where the size weighting is what makes it lossless (checked by taking it
out). The wiring through whole models is in test_dit_kv_newer.py."""

import pytest

pytest.importorskip("diffusers", minversion="0.42.1")  # written and tested on it; older ones are refused


from unittest import mock

import pytest
import torch
from test_dit_common import tiny_qwenimage
from test_dit_kv_attention import attend, groups_and_bias, hooked, image_tokens
from test_dit_sana import tiny_sana
from test_dit_wan import tiny_wan
from test_plugin_kv import duplicated_tokens

from tofu_sd.families import qwenimage, sana, wan
from tofu_sd.reference import bipartite_soft_matching

CPU = torch.device("cpu")


def qwen_parts(T, h, w):
    """A float64 Qwen-Image's first attention, and its complex rotary tables of ``T`` text and ``h x w`` tokens."""
    model = tiny_qwenimage().double()
    return model.transformer_blocks[0].attn, model.pos_embed([(1, h, w)], max_txt_seq_len=T, device=CPU)


def wan_parts(h, w):
    """A float64 Wan's first self-attention, and its ``(cos, sin)`` table of a one-frame ``h x w`` token grid."""
    model = tiny_wan().double()
    return model.blocks[0].attn1, model.rope(torch.zeros(1, 4, 1, 2 * h, 2 * w, dtype=torch.float64))


def rotate_complex(t, table):
    """Rows ``t`` ``(S, d)`` turned pair by pair, ``(a, b)`` by the angle of ``table`` ``(S, d/2)`` (unit complex
    numbers): ``(a cos - b sin, a sin + b cos)``, in float32 as Qwen-Image's complex rotary computes it."""
    a, b, c, s = t[:, 0::2].float(), t[:, 1::2].float(), table.real, table.imag
    return torch.stack([a * c - b * s, a * s + b * c], -1).flatten(-2).to(t.dtype)


def rotate_pairs(t, cos, sin):
    """Rows ``t`` ``(S, d)`` turned pair by pair with Wan's table ``(S, d)`` (each angle twice)."""
    a, b = t[:, 0::2], t[:, 1::2]
    c, s = cos[:, 0::2], sin[:, 0::2]
    return torch.stack([a * c - b * s, a * s + b * c], -1).flatten(-2)


def reference_qwen(attn, x, text, mask, emb, m, mode):
    """QwenDoubleStreamAttnProcessor2_0's attention by hand: every query at its own position, the text keys (a
    padded one at ``-inf``), one key per group of ``m`` at its kept token's position, ``log(size)`` on it."""
    image_table, text_table = emb
    H, d, T = attn.heads, attn.inner_dim // attn.heads, text.shape[1]
    images, texts = [], []
    for b in range(x.shape[0]):
        kv, positions, log_s = groups_and_bias(x[b], m, b, mode)
        q = torch.cat([attn.add_q_proj(text[b]), attn.to_q(x[b])])
        k, v = torch.cat([attn.add_k_proj(text[b]), attn.to_k(kv)]), torch.cat([attn.add_v_proj(text[b]), attn.to_v(kv)])
        q_table, k_table = torch.cat([text_table, image_table]), torch.cat([text_table, image_table[positions]])
        padded = [mask is not None and not bool(mask[b, t]) for t in range(T)]
        bias = torch.tensor([float("-inf") if p else 0.0 for p in padded] + log_s, dtype=x.dtype)
        heads = []
        for h in range(H):
            c = slice(h * d, (h + 1) * d)
            qh = torch.cat([attn.norm_added_q(q[:T, c]), attn.norm_q(q[T:, c])])
            kh = torch.cat([attn.norm_added_k(k[:T, c]), attn.norm_k(k[T:, c])])
            heads.append(attend(rotate_complex(qh, q_table), rotate_complex(kh, k_table), v[:, c], bias))
        out = torch.cat(heads, 1)
        images.append(attn.to_out[0](out[T:]))
        texts.append(attn.to_add_out(out[:T]))
    return torch.stack(images), torch.stack(texts)


def reference_wan(attn, x, emb, m, mode):
    """WanAttnProcessor's self-attention by hand: every query at its own row of the table, one key per group of
    ``m`` at its kept token's row, ``log(size)`` on it."""
    cos, sin = (t[0, :, 0] for t in emb)
    d = attn.to_q.out_features // attn.heads
    outs = []
    for b in range(x.shape[0]):
        kv, positions, log_s = groups_and_bias(x[b], m, b, mode)
        q, k, v = attn.norm_q(attn.to_q(x[b])), attn.norm_k(attn.to_k(kv)), attn.to_v(kv)
        heads = []
        for h in range(attn.heads):
            c = slice(h * d, (h + 1) * d)
            qh = rotate_pairs(q[:, c], cos, sin)
            kh = rotate_pairs(k[:, c], cos[positions], sin[positions])
            heads.append(attend(qh, kh, v[:, c], torch.tensor(log_s, dtype=x.dtype)))
        outs.append(attn.to_out[0](torch.cat(heads, 1)))
    return torch.stack(outs)


def reference_sana(attn, x, m, mode):
    """Sana's linear attention by hand: query ``i``'s output is ``sum_j w_ij v_j / sum_j w_ij`` with
    ``w_ij = s_j relu(q_i) . relu(k_j)``, one key and value per group of ``m``, ``s_j`` its size."""
    d = attn.to_q.out_features // attn.heads
    outs = []
    for b in range(x.shape[0]):
        kv, _, log_s = groups_and_bias(x[b], m, b, mode)
        sizes = torch.tensor(log_s, dtype=x.dtype).exp().round()
        q, k, v = attn.to_q(x[b]).relu(), attn.to_k(kv).relu(), attn.to_v(kv)
        heads = []
        for h in range(attn.heads):
            c = slice(h * d, (h + 1) * d)
            weights = (q[:, c] @ k[:, c].T) * sizes
            heads.append((weights @ v[:, c]) / (weights.sum(1, keepdim=True) + 1e-15))
        outs.append(attn.to_out[0](torch.cat(heads, 1)))
    return torch.stack(outs)


@pytest.mark.parametrize("mode", ["prune", "mean", "mlerp"])
@pytest.mark.parametrize("padded", [False, True], ids=["no-mask", "padding-mask"])
def test_qwen_attention_equals_loop_reference(mode, padded):
    T, h, w = 5, 6, 7
    attn, emb = qwen_parts(T, h, w)
    x, m = image_tokens(h, w, 32, seed=len(mode))
    text = torch.randn(2, T, 32, dtype=torch.float64)
    mask = torch.tensor([[True, True, True, False, False], [True] * 5]) if padded else None
    hooked(attn, m, mode, qwenimage.QwenImageFamily.joint_attention)
    with torch.no_grad():
        got = attn(x, text, encoder_hidden_states_mask=mask, image_rotary_emb=emb)
        expected = reference_qwen(attn, x, text, mask, emb, m, mode)
    for g, e in zip(got, expected):  # the rotary tables are complex64: float32 rotation, float64 elsewhere
        torch.testing.assert_close(g, e, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("mode", ["prune", "mean", "mlerp"])
def test_wan_attention_equals_loop_reference(mode):
    h, w = 6, 7
    attn, emb = wan_parts(h, w)
    x, m = image_tokens(h, w, 16, seed=len(mode))
    hooked(attn, m, mode, wan.WanFamily.joint_attention)
    with torch.no_grad():
        got = attn(x, None, None, emb)
        expected = reference_wan(attn, x, emb, m, mode)
    torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("mode", ["prune", "mean", "mlerp"])
def test_sana_attention_equals_loop_reference(mode):
    attn = tiny_sana().double().transformer_blocks[0].attn1
    x, m = image_tokens(6, 7, 16, seed=len(mode))
    hooked(attn, m, mode, sana.SanaFamily.joint_attention)
    with torch.no_grad():
        got = attn(x)
        expected = reference_sana(attn, x, m, mode)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)  # the processor computes in float32


def duplicated_case(family):
    """Tokens on an 8 x 8 grid whose every source copies its cell's destination, at the destination's position
    (a copy's rotary row is its destination's); the matching of 24 of them; the attention, its family's joint
    attention, its call, and how to take the size weighting out (a patch of the family module)."""
    x, dst, src, cell = duplicated_tokens(C=32 if family == "qwen" else 16)
    x = x.double()
    m = bipartite_soft_matching(x, dst, src, 24)
    position = torch.arange(64)
    position[src] = dst[cell]
    if family == "qwen":
        attn, (image, text_table) = qwen_parts(5, 8, 8)
        text = torch.randn(2, 5, 32, dtype=torch.float64)
        mask = torch.tensor([[True, True, True, True, False], [True] * 5])
        call = lambda: attn(x, text, encoder_hidden_states_mask=mask, image_rotary_emb=(image[position], text_table))
        joint, unweighted = qwenimage.QwenImageFamily.joint_attention, ("log_size_bias", zero_bias)
    elif family == "wan":
        attn, emb = wan_parts(8, 8)
        call = lambda: attn(x, None, None, tuple(t[:, position] for t in emb))
        joint, unweighted = wan.WanFamily.joint_attention, ("log_size_bias", zero_bias)
    else:
        attn = tiny_sana().double().transformer_blocks[0].attn1
        call = lambda: attn(x)
        joint, unweighted = sana.SanaFamily.joint_attention, ("group_sizes", lambda m: torch.ones(m.batch, 40))
    return attn, m, joint, call, unweighted


def zero_bias(m, dtype):
    return torch.zeros(m.batch, 1, m.num_tokens - m.r, dtype=dtype)


@pytest.mark.parametrize("mode", ["prune", "mean", "mlerp"])
@pytest.mark.parametrize("family", ["qwen", "wan", "sana"])
def test_duplicated_tokens_give_full_attention_only_with_the_sizes(family, mode):
    """Merging copies loses nothing with proportional attention (Sana: keys weighted by their sizes), for image
    and text outputs alike; without the weighting the same reduction gives another attention."""
    attn, m, joint, call, (name, unweighted) = duplicated_case(family)
    module = {"qwen": qwenimage, "wan": wan, "sana": sana}[family]
    with torch.no_grad():
        full = call()
        hooked(attn, m, mode, joint)
        got = call()
        with mock.patch.object(module, name, unweighted):
            without = call()
    full, got, without = ((t,) if isinstance(t, torch.Tensor) else t for t in (full, got, without))
    tolerance = {"rtol": 1e-9, "atol": 1e-10} if family == "wan" else {"rtol": 1e-5, "atol": 1e-6}
    for g, f, o in zip(got, full, without):
        torch.testing.assert_close(g, f, **tolerance)
        assert (o - f).abs().max() > 1e-3
