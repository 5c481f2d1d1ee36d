"""``reduce="kv"`` on the attentions of FLUX.2 (double- and single-stream), Chroma (with its mask) and Z-Image,
checked alone: a real block's attention carrying the plugin's :class:`~tofu_sd.joint_kv.JointKeyValueHook`, fed a
matching as the block's matching hook would, against a loop-based reference (every query, one key and value per
group, softmax by hand with each group's bias ``log(sum(exp(mask_i)))`` over its tokens' mask entries, which is
``log(size)`` unmasked; rotary embedding by hand, each query at its own position and each key at its group's kept
token's). The references are first checked against the processors themselves on unreduced calls (every group one
token). On duplicated tokens the reduced attention is the full one, and is not without the size bias (or, under a
mask, with the kept token's own mask column instead of its group's). The wiring through whole models is in
test_dit_kv_flux2_chroma_zimage.py."""

import pytest

pytest.importorskip("diffusers", minversion="0.42.1")  # written and tested on it; older ones are refused


import math
from unittest import mock

import torch
from test_dit_chroma import tiny_chroma
from test_dit_common import grid_ids
from test_dit_flux2 import flux2_ids, tiny_flux2
from test_dit_kv_attention import hooked, image_tokens, rotate
from test_dit_zimage import tiny_zimage
from test_plugin_kv import duplicated_tokens, groups_of, merged_token

from tofu_sd import joint_kv
from tofu_sd.families import chroma, flux2, zimage
from tofu_sd.reference import bipartite_soft_matching

T = 5
KINDS = ["flux2-double", "flux2-single", "chroma-double", "chroma-single", "zimage"]


def additive(mask):
    return torch.zeros(mask.shape, dtype=torch.float64).masked_fill(~mask, -math.inf) if mask.dtype == torch.bool else mask


def group_bias(row, groups, offset):
    """Per query: the bias of each group's key, ``log(sum(exp(row[offset + i])))`` over its tokens ``i``."""
    return torch.stack([torch.logsumexp(row[:, [offset + i for i in g]], dim=1) for g in groups], dim=1)


def attend_rows(q, k, v, bias):
    """One head: ``softmax(q_i . k_j / sqrt(d) + bias_ij) v`` query by query; a query masked throughout gets 0."""
    out = torch.zeros(q.shape[0], v.shape[1], dtype=q.dtype)
    for i in range(q.shape[0]):
        logits = k @ q[i] / math.sqrt(q.shape[1]) + bias[i]
        if torch.isinf(logits).all():
            continue
        weights = torch.exp(logits - logits.max())
        out[i] = (weights / weights.sum()) @ v
    return out


def groups_for(m, B, N):
    """Each batch element's groups (lists of positions, kept token first); ``m`` None: every token alone."""
    return [[[i] for i in range(N)] for _ in range(B)] if m is None else [groups_of(m, b) for b in range(B)]


def per_head(q, k, v, q_norm, k_norm, heads, d, rot_q, rot_k, bias):
    """Each head by hand: the norms row by row, rotated (``rot_q`` / ``rot_k``), attended with ``bias``."""
    outs = []
    for h in range(heads):
        c = slice(h * d, (h + 1) * d)
        qh = torch.stack([n(row) for n, row in zip(q_norm, q[:, c])])
        kh = torch.stack([n(row) for n, row in zip(k_norm, k[:, c])])
        outs.append(attend_rows(rot_q(qh), rot_k(kh), v[:, c], bias))
    return torch.cat(outs, 1)


def reference_joint(attn, x, text, emb, mask, m, mode, text_len=0):
    """``FluxAttnProcessor`` / ``Flux2AttnProcessor`` by hand: a double-stream ``attn`` (``text`` apart) or a
    single-stream one (``x`` = ``[text, image]``); ``mask`` ``(B, 1, S, S)`` over ``[text, image]`` or None."""
    cos, sin = emb
    B, S = x.shape[0], x.shape[1] + (0 if text is None else text.shape[1])
    Tn = text_len if text is None else text.shape[1]
    outs = []
    for b, groups in enumerate(groups_for(m, B, S - Tn)):
        kv = torch.stack([merged_token(x[b, text_len:], g, mode) for g in groups])
        if text is None:
            q, k, v = attn.to_q(x[b]), attn.to_k(torch.cat([x[b, :Tn], kv])), attn.to_v(torch.cat([x[b, :Tn], kv]))
            q_norm, k_norm = [attn.norm_q] * S, [attn.norm_k] * len(k)
        else:
            q = torch.cat([attn.add_q_proj(text[b]), attn.to_q(x[b])])
            k, v = torch.cat([attn.add_k_proj(text[b]), attn.to_k(kv)]), torch.cat([attn.add_v_proj(text[b]), attn.to_v(kv)])
            q_norm, k_norm = [attn.norm_added_q] * Tn + [attn.norm_q] * x.shape[1], [attn.norm_added_k] * Tn + [attn.norm_k] * len(kv)
        rows = list(range(Tn)) + [Tn + g[0] for g in groups]
        full = torch.zeros(S, S, dtype=x.dtype) if mask is None else additive(mask[b, 0]).expand(S, S)
        bias = torch.cat([full[:, :Tn], group_bias(full, groups, Tn)], dim=1)
        rot_q, rot_k = (lambda t: rotate(t, cos, sin)), (lambda t, rows=rows: rotate(t, cos[rows], sin[rows]))
        outs.append(per_head(q, k, v, q_norm, k_norm, attn.heads, attn.head_dim, rot_q, rot_k, bias))
    out = torch.stack(outs)
    if text is None:
        return out
    return attn.to_out[0](out[:, Tn:]), attn.to_add_out(out[:, :Tn])


def reference_parallel(attn, x, emb, m, mode, text_len):
    """``Flux2ParallelSelfAttnProcessor`` by hand on ``x`` = ``[text, image]``: one projection per token, its first
    ``inner`` columns queries, then keys, values and the MLP's input; keys and values of the text and of one token
    per group; the attention and the MLP side by side through ``to_out``."""
    cos, sin = emb
    inner, B = attn.inner_dim, x.shape[0]
    outs = []
    for b, groups in enumerate(groups_for(m, B, x.shape[1] - text_len)):
        kv = torch.stack([merged_token(x[b, text_len:], g, mode) for g in groups])
        p, pk = attn.to_qkv_mlp_proj(x[b]), attn.to_qkv_mlp_proj(torch.cat([x[b, :text_len], kv]))
        q, k, v, mlp = p[:, :inner], pk[:, inner : 2 * inner], pk[:, 2 * inner : 3 * inner], p[:, 3 * inner :]
        rows = list(range(text_len)) + [text_len + g[0] for g in groups]
        bias = torch.tensor([0.0] * text_len + [math.log(len(g)) for g in groups], dtype=x.dtype).expand(len(q), -1)
        rot_q, rot_k = (lambda t: rotate(t, cos, sin)), (lambda t, rows=rows: rotate(t, cos[rows], sin[rows]))
        out = per_head(q, k, v, [attn.norm_q] * len(q), [attn.norm_k] * len(k), attn.heads, attn.head_dim, rot_q, rot_k, bias)
        half = mlp.shape[1] // 2
        outs.append(attn.to_out(torch.cat([out, torch.nn.functional.silu(mlp[:, :half]) * mlp[:, half:]], 1)))
    return torch.stack(outs)


def rotate_complex(t, table):
    """Rows ``t`` ``(S, d)`` turned pair by pair by the unit complex numbers ``table`` ``(S, d / 2)``, in float32."""
    a, b, c, s = t[:, 0::2].float(), t[:, 1::2].float(), table.real, table.imag
    return torch.stack([a * c - b * s, a * s + b * c], -1).flatten(-2).to(t.dtype)


def reference_zimage(attn, x, freqs, mask, m, mode, rest):
    """``ZSingleStreamAttnProcessor`` by hand on ``x`` = ``[image, rest]``: keys and values of one token per group,
    then of the rest; a group's key at its kept token's ``freqs`` row; ``mask`` a ``(B, S)`` key mask or None."""
    B, S = x.shape[:2]
    N, d = S - rest, attn.to_q.out_features // attn.heads
    outs = []
    for b, groups in enumerate(groups_for(m, B, N)):
        kv = torch.cat([torch.stack([merged_token(x[b, :N], g, mode) for g in groups]), x[b, N:]])
        q, k, v = attn.to_q(x[b]), attn.to_k(kv), attn.to_v(kv)
        rows = [g[0] for g in groups] + list(range(N, S))
        keys = torch.zeros(1, S, dtype=x.dtype) if mask is None else additive(mask[b])[None]
        bias = torch.cat([group_bias(keys, groups, 0), keys[:, N:]], 1).expand(S, -1)
        rot_q = lambda t, b=b: rotate_complex(t, freqs[b])
        rot_k = lambda t, b=b, rows=rows: rotate_complex(t, freqs[b, rows])
        outs.append(attn.to_out[0](per_head(q, k, v, [attn.norm_q] * S, [attn.norm_k] * len(k), attn.heads, d, rot_q, rot_k, bias)))
    return torch.stack(outs)


def chroma_mask(h, w, dtype, masked_image=(), padding=(2, 0)):
    """A Chroma block's mask ``(2, 1, S, S)`` over ``[T text, h x w image]``: per element its last ``padding[b]``
    text tokens and the image tokens ``masked_image`` masked, made a mask per query and key as the block makes it."""
    vector = torch.ones(2, T + h * w, dtype=torch.bool)
    for b, pad in enumerate(padding):
        vector[b, T - pad : T] = False
    vector[:, [T + i for i in masked_image]] = False
    vector = vector.to(dtype)
    return vector[:, None, None, :] * vector[:, None, :, None]


def case(kind, h, w, positions=None, masked_image=(), mask_dtype=torch.float64):
    """The attention of ``kind`` (float64), its family's joint attention, and ``call(x)`` running it on image
    tokens ``x`` ``(2, h * w, 32)`` with text, rotary table (image rows at ``positions``, default their own) and,
    for Chroma and Z-Image, a mask with padding; plus the reference ``reference(x, m, mode)``."""
    g = torch.Generator().manual_seed(len(kind))
    N = h * w
    positions = torch.arange(N) if positions is None else positions
    text = torch.randn(2, T, 32, generator=g, dtype=torch.float64)
    if kind == "zimage":
        attn = tiny_zimage().double().layers[0].attention
        rest = torch.randn(2, 7, 32, generator=g, dtype=torch.float64)
        angles = torch.rand(2, N + 7, 8, generator=g, dtype=torch.float64) * 6
        freqs = torch.polar(torch.ones_like(angles), angles).to(torch.complex64)
        freqs[:, :N] = freqs[:, positions]
        mask = torch.ones(2, N + 7, dtype=torch.bool)
        mask[0, -3:] = False  # element 0's batch padding
        call = lambda x: attn(torch.cat([x, rest], 1), attention_mask=mask, freqs_cis=freqs)
        ref = lambda x, m, mode: reference_zimage(attn, torch.cat([x, rest], 1), freqs, mask, m, mode, 7)
        return attn, zimage.ZImageFamily.joint_attention, call, ref, 7
    model = (tiny_flux2() if kind.startswith("flux2") else tiny_chroma()).double()
    if kind.startswith("flux2"):
        ids = torch.cat([torch.zeros(T, 4), flux2_ids(h, w)]).double()
    else:
        ids = torch.cat([torch.zeros(T, 3), grid_ids(h, w)]).double()
    emb = tuple(torch.cat([t[:T], t[T:][positions]]) for t in model.pos_embed(ids))
    mask = chroma_mask(h, w, mask_dtype, masked_image) if kind.startswith("chroma") else None
    joint = (flux2.Flux2Family if kind.startswith("flux2") else chroma.ChromaFamily).joint_attention
    kwargs = {"image_rotary_emb": emb} if mask is None else {"image_rotary_emb": emb, "attention_mask": mask}
    if kind.endswith("double"):
        attn = model.transformer_blocks[0].attn
        call = lambda x: attn(x, text, **kwargs)
        ref = lambda x, m, mode: reference_joint(attn, x, text, emb, mask, m, mode)
        return attn, joint, call, ref, None
    attn = model.single_transformer_blocks[0].attn
    call = lambda x: attn(torch.cat([text, x], 1), **kwargs)
    if kind == "flux2-single":
        ref = lambda x, m, mode: reference_parallel(attn, torch.cat([text, x], 1), emb, m, mode, T)
    else:
        ref = lambda x, m, mode: reference_joint(attn, torch.cat([text, x], 1), None, emb, mask, m, mode, text_len=T)
    return attn, joint, call, ref, T


def tensors(out):
    return out if isinstance(out, tuple) else (out,)


@pytest.mark.parametrize("kind", KINDS)
def test_references_are_the_processors_on_an_unreduced_call(kind):
    """Every group one token: the hand-written reference gives the processor's own output (so it computes what
    the processor computes), here with masked image tokens under Chroma's mask."""
    _, _, call, ref, _ = case(kind, 6, 7, masked_image=(3, 10))
    x = torch.randn(2, 42, 32, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    with torch.no_grad():
        for got, want in zip(tensors(ref(x, None, "prune")), tensors(call(x))):
            torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("mode", ["prune", "mean", "mlerp"])
@pytest.mark.parametrize("kind", KINDS)
def test_attention_equals_loop_reference(kind, mode):
    """Chroma's under a mask with padding and masked image tokens (groups of masked and unmasked tokens), Z-Image's
    with batch padding."""
    attn, joint, call, ref, text_len = case(kind, 6, 7, masked_image=(0, 3, 10, 17, 30))
    x, m = image_tokens(6, 7, 32, seed=len(mode) + len(kind))
    hooked(attn, m, mode, joint, text_len)
    with torch.no_grad():
        got, expected = call(x), ref(x, m, mode)
    for g, e in zip(tensors(got), tensors(expected)):  # rotary tables rotate in float32
        torch.testing.assert_close(g, e, rtol=1e-6, atol=1e-6)


def cut_bias(image, m):
    """A plausible bug: each reduced key takes its kept token's own mask column, with no group size."""
    slots = m.keep_idx.view(m.batch, *[1] * (image.ndim - 2), -1).expand(*image.shape[:-1], -1)
    return image.gather(-1, slots)


def sized_cut_bias(image, m):
    """Another: its kept token's own mask column plus ``log(size)`` (right only where the group's mask agrees)."""
    return cut_bias(image, m) + joint_kv.log_size_bias(m, image.dtype).view(m.batch, *[1] * (image.ndim - 2), -1)


def zero_bias(m, dtype):
    return torch.zeros(m.batch, 1, m.num_tokens - m.r, dtype=dtype)


MUTATIONS = {
    "flux2-double": [("tofu_sd.joint_kv.log_size_bias", zero_bias)],
    "flux2-single": [("tofu_sd.joint_kv.log_size_bias", zero_bias)],
    "chroma-double": [("tofu_sd.joint_kv.grouped_key_bias", cut_bias), ("tofu_sd.joint_kv.grouped_key_bias", sized_cut_bias)],
    "chroma-single": [("tofu_sd.joint_kv.grouped_key_bias", cut_bias), ("tofu_sd.joint_kv.grouped_key_bias", sized_cut_bias)],
    "zimage": [("tofu_sd.families.zimage.grouped_key_bias", cut_bias)],
}


@pytest.mark.parametrize("mode", ["prune", "mean", "mlerp"])
@pytest.mark.parametrize("kind", KINDS)
def test_duplicated_tokens_give_full_attention_only_with_the_group_bias(kind, mode):
    """Every source a copy of its cell's destination, at its position: the reduced attention is the full one, text
    and image outputs alike, also under Chroma's mask with some copies masked and their destinations not (the
    float 0 / 1 mask ChromaPipeline makes); and is not without the size bias, nor with the kept token's own mask
    column (with or without ``log(size)``) instead of its group's."""
    x, dst, src, cell = duplicated_tokens(C=32)
    x = x.double()
    m = bipartite_soft_matching(x, dst, src, 24)
    positions = torch.arange(64)
    positions[src] = dst[cell]
    masked = tuple(int(s) for s in src[:6])  # copies masked, their destinations not
    attn, joint, call, _, text_len = case(kind, 8, 8, positions, masked_image=masked)
    with torch.no_grad():
        full = tensors(call(x))
        hooked(attn, m, mode, joint, text_len)
        got = tensors(call(x))
        wrong = []
        for target, replacement in MUTATIONS[kind]:
            with mock.patch(target, replacement):
                wrong.append(tensors(call(x)))
    for g, f in zip(got, full):
        torch.testing.assert_close(g, f, rtol=1e-6, atol=1e-6)
    for w in wrong:
        assert max((o - f).abs().max() for o, f in zip(w, full)) > 1e-3
