"""``modules=``: which sub-modules of each patched ``BasicTransformerBlock`` (``attn1``, ``attn2``, ``ff``) run on
the reduced tokens, each reduced on its own input with the block's one matching and restored after it.

The reference is tomesd's ``merge_attn`` / ``merge_crossattn`` / ``merge_mlp`` (schedule ``A``, top-left
destinations); the token counts reaching each sub-module, and, for every letter, each reduced sub-module's
output against an explicit per-group formula (``attn2`` and ``ff`` act on each query / token alone, so every
token's output is the module's output on its group's merged token).
"""

import copy
import threading

import pytest
import torch

import tofu_sd
from evaluation.tiny_random import tiny_unet, tiny_unet_inputs
from tofu_sd import hooks, state

COMBINATIONS = [("attn1",), ("attn1", "attn2"), ("attn1", "ff"), ("attn1", "attn2", "ff"), ("attn2",), ("ff",)]
IDS = ["+".join(c) for c in COMBINATIONS]
GRIDS = [(16, 16), (15, 13)]
FIRST = "down_blocks.0.attentions.0.transformer_blocks.0"


def run(unet, **kw):
    with torch.no_grad():
        return unet(**tiny_unet_inputs(unet, **kw)).sample


def no_machinery_left(unet):
    return not any(
        {"_diffusers_hook", "forward", "__deepcopy__"} & m.__dict__.keys() or m._forward_pre_hooks or m._forward_hooks
        for m in unet.modules()
    )


@pytest.fixture(scope="module")
def tomesd_outputs():
    """tomesd's output for every combination and grid, and the unpatched output of every grid."""
    tomesd = pytest.importorskip("tomesd")
    unet = tiny_unet("sd15")
    outputs = {}
    for h, w in GRIDS:
        inputs = tiny_unet_inputs(unet, height=h, width=w)
        sample = inputs.pop("sample")  # tomesd reads the size from the first positional argument
        with torch.no_grad():
            outputs[(h, w)] = unet(sample, **inputs).sample
            for combo in COMBINATIONS:
                tomesd.apply_patch(
                    unet, ratio=0.5, use_rand=False, merge_attn="attn1" in combo, merge_crossattn="attn2" in combo,
                    merge_mlp="ff" in combo,
                )  # fmt: skip
                outputs[(h, w, combo)] = unet(sample, **inputs).sample
                tomesd.remove_patch(unet)
    return outputs


@pytest.mark.parametrize("combo", COMBINATIONS, ids=IDS)
def test_matches_tomesd_merge_attn_crossattn_mlp(combo, tomesd_outputs):
    unet = tiny_unet("sd15")
    tofu_sd.apply(unet, ratio=0.5, schedule="A", use_rand=False, modules=combo)
    for h, w in GRIDS:
        theirs = tomesd_outputs[(h, w, combo)]
        # tomesd really merged, and each combination gives its own output (so a module left out shows)
        for other in [(h, w)] + [(h, w, c) for c in COMBINATIONS if c != combo]:
            assert (theirs - tomesd_outputs[other]).abs().max() > 1e-3, other
        torch.testing.assert_close(run(unet, height=h, width=w), theirs, rtol=1e-5, atol=1e-5)


def test_a_text_mask_leaves_cross_attention_reduced(tomesd_outputs):
    """An ``encoder_attention_mask`` masks keys (the text), so attn2's queries are still reduced, as in tomesd."""
    tomesd = pytest.importorskip("tomesd")
    unet = tiny_unet("sd15")
    inputs = tiny_unet_inputs(unet)
    sample = inputs.pop("sample")
    inputs["encoder_attention_mask"] = torch.tensor([[1] * 7, [1] * 4 + [0] * 3])
    with torch.no_grad():
        tomesd.apply_patch(unet, ratio=0.5, use_rand=False, merge_crossattn=True)
        theirs = unet(sample, **inputs).sample
        tomesd.remove_patch(unet)
        tofu_sd.apply(unet, ratio=0.5, schedule="A", use_rand=False, modules="attn1,attn2")
        seen = []
        to_q = unet.get_submodule(f"{FIRST}.attn2.to_q")
        handle = to_q.register_forward_pre_hook(lambda _, a: seen.append(a[0].shape[1]))
        ours = unet(sample, **inputs).sample
        handle.remove()
    assert seen == [128] and (theirs - tomesd_outputs[(16, 16, ("attn1", "attn2"))]).abs().max() > 1e-3
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)


def test_names_are_normalized():
    for value, stored in [
        ("attn1", ("attn1",)), ("ff, attn1", ("attn1", "ff")), (["attn2"], ("attn2",)),
        (("ff", "attn2", "attn1"), ("attn1", "attn2", "ff")), (" attn2 ,ff ", ("attn2", "ff")),
    ]:  # fmt: skip
        assert tofu_sd.TokenFusionConfig(modules=value).modules == stored, value
    assert tofu_sd.TokenFusionConfig().modules == ("attn1",)
    assert tofu_sd.TokenFusionConfig(modules="ff,attn1") == tofu_sd.TokenFusionConfig(modules=("attn1", "ff"))
    unet = tofu_sd.apply(tiny_unet("sd15"), modules="ff,attn2")
    assert tofu_sd.get_state(unet).config.modules == ("attn2", "ff")


@pytest.mark.parametrize(
    "value,match",
    [
        ("attn3", r"unknown name\(s\) 'attn3'; use 'attn1' \(self-attention\)"),
        (("attn1", "mlp"), r"unknown name\(s\) 'mlp'"),
        ("Attn1", r"unknown name\(s\) 'Attn1'"),
        ("attn1,,ff", r"unknown name\(s\) ''"),
        (("attn1", "attn1"), r"names 'attn1' more than once"),
        ("ff,attn2,ff", r"names 'ff' more than once"),
        ((), r"names no module"),
        ([], r"names no module"),
        ("", r"names no module"),
        (None, r"modules must be a non-empty tuple or list .*got None"),
        (("attn1", 2), r"modules must be .*got \('attn1', 2\)"),
        ({"attn1"}, r"modules must be .*got \{'attn1'\}"),
    ],
)
def test_bad_modules_raise_and_leave_the_model_untouched(unet_sd15, value, match):
    with pytest.raises(ValueError, match=match):
        tofu_sd.TokenFusionConfig(modules=value)
    tofu_sd.apply(unet_sd15, ratio=0.3, modules="attn2")
    before = run(unet_sd15)
    with pytest.raises(ValueError, match=match):
        tofu_sd.apply(unet_sd15, modules=value)
    assert torch.equal(run(unet_sd15), before) and tofu_sd.get_state(unet_sd15).config.modules == ("attn2",)


def shapes(unet, **kw):
    """Token counts inside each transformer block's sub-modules, by (block, part), over one U-Net call:
    ``q`` / ``k`` attn1's queries and keys, ``xq`` / ``xk`` attn2's queries and keys (text), ``ff`` the
    feed-forward's first layer, and ``*_out`` what attn1, attn2 and ff hand back to the block."""
    counts, handles = {}, []

    def record(key):
        def pre(_, args):
            counts.setdefault(key, []).append(args[0].shape[1])

        return pre

    def record_out(key):
        def post(_, args, out):
            counts.setdefault(key, []).append(out.shape[1])

        return post

    for name, block in unet.named_modules():
        if type(block).__name__ != "BasicTransformerBlock":
            continue
        for part, module in [("q", block.attn1.to_q), ("k", block.attn1.to_k), ("xq", block.attn2.to_q),
                             ("xk", block.attn2.to_k), ("ff", block.ff.net[0])]:  # fmt: skip
            handles.append(module.register_forward_pre_hook(record((name, part))))
        for part, module in [("attn1_out", block.attn1), ("attn2_out", block.attn2), ("ff_out", block.ff)]:
            handles.append(module.register_forward_hook(record_out((name, part))))
    try:
        run(unet, **kw)
    finally:
        for handle in handles:
            handle.remove()
    return counts


@pytest.mark.parametrize("combo", COMBINATIONS, ids=IDS)
@pytest.mark.parametrize("kind,h,w", [("sd15", 16, 16), ("sdxl", 16, 12)])
def test_each_chosen_module_sees_the_reduced_tokens_and_hands_back_all(combo, kind, h, w):
    unet = tofu_sd.apply(tiny_unet(kind), ratio=0.5, modules=combo)
    patched = {b.name for b in tofu_sd.patched_blocks(unet)}
    counts = shapes(unet, height=h, width=w)
    n = h * w if kind == "sd15" else (h // 2) * (w // 2)
    reduced = {"q": "attn1", "k": "attn1", "xq": "attn2", "ff": "ff"}
    assert len(patched) == (5 if kind == "sd15" else 10)
    for (name, part), seen in counts.items():
        assert len(seen) == 1, (name, part)
        if part == "xk":
            assert seen == [7], name  # the text: never reduced
        elif name in patched:
            expected = n - n // 2 if reduced.get(part) in combo else n
            assert seen == [expected], (name, part)
        else:  # unpatched blocks: every token everywhere
            assert seen == counts[(name, "attn1_out")], (name, part)


def test_key_value_attn1_with_reduced_ff():
    """reduce="kv": attn1 keeps every query; attn2 and ff are reduced and restored as with reduce="tokens"."""
    unet = tofu_sd.apply(tiny_unet("sd15"), ratio=0.5, reduce="kv", modules="attn1,ff")
    counts = shapes(unet)
    for block in tofu_sd.patched_blocks(unet):
        got = {part: counts[(block.name, part)][0] for part in ("q", "k", "xq", "ff", "attn1_out", "ff_out")}
        assert got == {"q": 256, "k": 128, "xq": 256, "ff": 128, "attn1_out": 256, "ff_out": 256}, block.name
    tofu_sd.apply(unet, ratio=0.5, reduce="kv", modules="attn2")  # no attn1 hook: kv has nothing to do
    counts = shapes(unet)
    assert (counts[(FIRST, "q")], counts[(FIRST, "k")], counts[(FIRST, "xq")]) == ([256], [256], [128])


def groups_of(m, b):
    """The groups of the reduced sequence of batch element ``b``, as lists of original positions."""
    groups = {int(p): [int(p)] for p in m.keep_idx[b].tolist()}
    for s, slot in zip(m.src_idx[b].tolist(), m.dst_slot[b].tolist()):
        groups[int(m.keep_idx[b, slot])].append(s)
    return list(groups.values())


def merged_token(x, group, mode):
    """A group's token by the paper's formulas: its kept token (P), mean (A), MLERP (M)."""
    if mode == "prune" or len(group) == 1:
        return x[group[0]]
    mean = x[group].mean(0)
    return mean if mode == "mean" else mean / mean.norm() * x[group].norm(dim=-1).max()


@pytest.mark.parametrize("options", [{"reduce": "kv", "seed": 2}, {"matching": "local", "use_rand": False}])
def test_reduced_attn2_and_ff_outputs_equal_the_per_group_formula(options, monkeypatch):
    """Every patched block's attn2 and ff (schedule PAMAP: all three letters): each token's output is the
    module's output on its group's merged token (under ``reduce="kv"`` too)."""
    unet = tofu_sd.apply(tiny_unet("sd15"), ratio=0.5, schedule="PAMAP", modules="attn1,attn2,ff", **options)
    matchings, seen, handles = [], [], []
    real_match = state.match
    monkeypatch.setattr(state, "match", lambda x, plan: matchings.append(real_match(x, plan)) or matchings[-1])
    blocks = tofu_sd.patched_blocks(unet)
    for index, block in enumerate(blocks):
        for part in ("attn2", "ff"):
            module = unet.get_submodule(f"{block.name}.{part}")
            # torch hooks run outside the plugin's registry hooks: the full input, the restored output
            record = lambda mod, args, kwargs, out, i=index, part=part: seen.append((i, part, mod, args, kwargs, out))
            handles.append(module.register_forward_hook(record, with_kwargs=True))
    inputs = tiny_unet_inputs(unet)
    with torch.no_grad():
        unet(**inputs)
    for handle in handles:
        handle.remove()
    assert len(matchings) == len(blocks) == 5 and len(seen) == 10
    for i, part, module, args, kwargs, out in seen:
        m, mode = matchings[i], blocks[i].mode
        x = args[0] if args else kwargs["hidden_states"]
        assert out.shape == x.shape == (2, 256, 32) and m.r == 128
        expected = torch.empty_like(x)
        for b in range(2):
            groups = groups_of(m, b)
            tokens = torch.stack([merged_token(x[b], g, mode) for g in groups]).unsqueeze(0)
            with torch.no_grad():
                if part == "ff":
                    y = type(module).forward(module, tokens)
                else:
                    text = inputs["encoder_hidden_states"][b : b + 1]
                    y = type(module).forward(module, tokens, encoder_hidden_states=text)
            for j, group in enumerate(groups):
                expected[b, group] = y[0, j]
        torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-5, msg=f"block {i} {part} ({mode})")


def test_the_matching_lives_until_the_block_ends():
    unet = tofu_sd.apply(tiny_unet("sd15"), modules="attn1,attn2,ff")
    registries = [unet.get_submodule(b.name)._diffusers_hook for b in tofu_sd.patched_blocks(unet)]
    states = [registry.get_hook(hooks.MATCHING_HOOK).state for registry in registries]
    alive = []
    handle = unet.get_submodule(f"{FIRST}.ff.net.0").register_forward_pre_hook(
        lambda *_: alive.append(states[0].matching is not None)
    )
    run(unet)
    handle.remove()
    assert alive == [True]  # still there at the feed-forward ...
    assert all(s.matching is None and s.reduced is None for s in states)  # ... and freed after the block


@pytest.mark.parametrize("combo", COMBINATIONS[1:], ids=IDS[1:])
def test_remove_and_ratio_zero_are_bit_identical(unet_sd15, combo):
    reference = run(unet_sd15)
    only_attn1 = run(tofu_sd.apply(unet_sd15, ratio=0.5))
    tofu_sd.apply(unet_sd15, ratio=0.5, modules=combo)
    patched = run(unet_sd15)
    assert not torch.equal(patched, reference) and not torch.equal(patched, only_attn1)
    tofu_sd.remove(unet_sd15)
    assert torch.equal(run(unet_sd15), reference) and no_machinery_left(unet_sd15)
    tofu_sd.apply(unet_sd15, ratio=0.0, modules=combo)
    assert torch.equal(run(unet_sd15), reference) and no_machinery_left(unet_sd15)
    assert tofu_sd.get_state(unet_sd15).config.modules == combo


def chunk_feed_forward(unet, chunk_size, dim):
    """diffusers' feed-forward chunking (``enable_forward_chunking`` of other models) on the patched blocks."""
    for block in tofu_sd.patched_blocks(unet):
        unet.get_submodule(block.name).set_chunk_feed_forward(chunk_size, dim)


def test_batch_chunked_feed_forward_is_reduced_row_by_row():
    unet = tofu_sd.apply(tiny_unet("sd15"), ratio=0.5, schedule="PAMAP", modules="attn1,ff")
    unchunked = run(unet, batch=3)
    chunk_feed_forward(unet, 1, dim=0)
    counts = shapes(unet, batch=3)
    assert counts[(FIRST, "ff")] == [128] * 3 and counts[(FIRST, "ff_out")] == [256] * 3  # per chunk
    torch.testing.assert_close(run(unet, batch=3), unchunked, rtol=1e-5, atol=1e-6)


def test_sequence_chunked_feed_forward_runs_unreduced():
    """Chunks of the sequence cannot be merged: ff then sees every token, as with modules=("attn1",)."""
    unet = tofu_sd.apply(tiny_unet("sd15"), ratio=0.5, modules="attn1,ff")
    chunk_feed_forward(unet, 64, dim=1)
    counts = shapes(unet)
    assert counts[(FIRST, "ff")] == [64] * 4 and counts[(FIRST, "q")] == [128]
    chunked = run(unet)
    tofu_sd.apply(unet, ratio=0.5)
    assert torch.equal(chunked, run(unet))


def test_compiled_transformers_reduce_as_eager():
    """A Transformer2DModel compiled on its own: torch runs its hooks (the feature map's) outside its graph."""
    eager = tofu_sd.apply(tiny_unet("sd15"), modules="attn1,ff", rematch_every=2)
    unet = tofu_sd.apply(tiny_unet("sd15"), modules="attn1,ff", rematch_every=2)
    torch._dynamo.reset()
    unet.get_submodule("down_blocks.0.attentions.0").compile(backend="eager")
    for timestep in (900, 700):
        inputs = {**tiny_unet_inputs(unet, seed=timestep), "timestep": torch.tensor(timestep)}
        with torch.no_grad():
            torch.testing.assert_close(unet(**inputs).sample, eager(**inputs).sample, rtol=1e-5, atol=1e-6)
    assert not torch.equal(run(unet), run(tiny_unet("sd15")))


def test_deep_copy_and_threads():
    unet = tofu_sd.apply(tiny_unet("sd15"), modules="attn2,ff", seed=3)
    twin = copy.deepcopy(unet)
    assert tofu_sd.get_state(twin) == tofu_sd.get_state(unet) and torch.equal(run(twin), run(unet))
    calls = [tiny_unet_inputs(unet, batch=1 + t, height=12 if t else 8, width=12, seed=t) for t in range(2)]
    with torch.no_grad():
        expected = [unet(**inputs).sample for inputs in calls]
    outputs, start = [[], []], threading.Barrier(2)

    def work(t):
        start.wait()
        with torch.no_grad():
            for _ in range(4):
                outputs[t].append(unet(**calls[t]).sample)

    threads = [threading.Thread(target=work, args=(t,)) for t in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert all(torch.equal(out, expected[t]) for t in range(2) for out in outputs[t]) and len(outputs[1]) == 4


def test_rematch_every_reuses_the_matching_for_every_module(monkeypatch):
    unet = tofu_sd.apply(tiny_unet("sd15"), rematch_every=2, modules="attn1,attn2,ff")
    computed = []
    real_match = state.match
    monkeypatch.setattr(state, "match", lambda x, plan: computed.append(1) or real_match(x, plan))
    for timestep, matches in [(900, 5), (700, 0)]:
        before = len(computed)
        inputs = {**tiny_unet_inputs(unet, seed=timestep), "timestep": torch.tensor(timestep)}
        seen = []
        ff_in = unet.get_submodule(f"{FIRST}.ff.net.0")
        handle = ff_in.register_forward_pre_hook(lambda _, a, seen=seen: seen.append(a[0].shape[1]))
        with torch.no_grad():
            unet(**inputs)
        handle.remove()
        assert len(computed) - before == matches and seen == [128], timestep  # step 1 takes step 0's matching
