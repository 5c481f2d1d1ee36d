"""Token Fusion on a tiny Wan video transformer: the 3-D grid and cells over frames (``st``, against loop
references of the partition and of local matching), rotary rows that follow their tokens (against the processor
run per batch element, and the rotation against a per-element formula), cross-attention (text, I2V image)
untouched, refusals, compile, deep copy, threads, and the ``wan-slice`` bench config on the meta device."""

import pytest

pytest.importorskip("diffusers", minversion="0.42.1")  # written and tested on it; older ones are refused


import copy
import inspect

import pytest
import torch
import torch.nn.functional as F
from diffusers import WanTransformer3DModel
from test_dit_common import (
    calls_in_threads,
    ShiftedPositions,
    assert_unpatched,
    capturing_matchings,
    check_ratio_zero_then_compiled,
    destinations,
    recording,
    run,
    tiny_flux,
    tiny_sd3,
)

import tofu_sd
from evaluation.dit_archs import DIT_ARCHS, WAN_14B, WAN_LATENT_FRAMES, WAN_TEXT_TOKENS, step_inputs
from tofu_sd.families import family_of
from tofu_sd.families.wan import WanRotary
from tofu_sd.merge import MODES, match, reduce_tokens, restore_tokens
from tofu_sd.partition import partition_order
from tofu_sd.plans import plan_blocks

# ---------------------------------------------------------------------------------------------------------
# The tiny model and its inputs.


def tiny_wan(num_layers=2, seed=0, i2v=False):
    """A Wan transformer of test size; ``i2v``: image-to-video (CLIP image tokens through added keys / values)."""
    torch.manual_seed(seed)
    extra = {"image_dim": 12, "added_kv_proj_dim": 16} if i2v else {}
    return WanTransformer3DModel(
        num_layers=num_layers, attention_head_dim=8, num_attention_heads=2, in_channels=4, out_channels=4,
        text_dim=16, freq_dim=16, ffn_dim=32, rope_max_seq_len=32, patch_size=(1, 2, 2), **extra,
    ).eval()  # fmt: skip


def wan_inputs(model, batch=2, frames=5, h=3, w=4, text=7, timestep=500.0, seed=1):
    """Keyword arguments of a Wan call on a ``frames x h x w`` token grid (the latent is 2x larger in space).
    An I2V model gets 4 image tokens and 512 text tokens (its processor takes all but the last 512 as image)."""
    g = torch.Generator().manual_seed(seed)
    config = model.config
    i2v = config.image_dim is not None
    inputs = {
        "hidden_states": torch.randn(batch, config.in_channels, frames, 2 * h, 2 * w, generator=g),
        "encoder_hidden_states": torch.randn(batch, 512 if i2v else text, config.text_dim, generator=g),
        "timestep": torch.full((batch,), float(timestep)),
    }
    if i2v:
        inputs["encoder_hidden_states_image"] = torch.randn(batch, 4, config.image_dim, generator=g)
    return inputs


# ---------------------------------------------------------------------------------------------------------
# Blocks, grid, cells over frames.


def test_every_block_is_patched_around_attn1_with_st_2_by_default():
    model = tiny_wan(num_layers=3)
    assert family_of(model).name == "Wan"
    state = tofu_sd.apply_token_fusion(model, tofu_sd.TokenFusionConfig())
    assert [(b.name, b.letter) for b in state.blocks] == [("blocks.0", "M"), ("blocks.1", "M"), ("blocks.2", "M")]
    assert state.config.st == 2  # the video family's default, stored resolved
    assert tofu_sd.apply(model, st=1) and tofu_sd.get_state(model).config.st == 1


@pytest.mark.parametrize("frames,h,w", [(5, 3, 4), (4, 5, 3), (1, 4, 6), (3, 1, 5)])
def test_token_counts_and_cross_attention_untouched(frames, h, w):
    model = tiny_wan()
    inputs = wan_inputs(model, frames=frames, h=h, w=w)
    n = frames * h * w
    num_dst = max(1, frames // 2) * (h // 2) * (w // 2)  # 2-frame cells (one frame of cells if there is one frame)
    kept = n if num_dst == 0 else n - min(int(n * 0.5), n - num_dst)  # r is at most the sources
    tofu_sd.apply(model, ratio=0.5)
    block = model.blocks[1]
    modules = {"q1": block.attn1.to_q, "k1": block.attn1.to_k, "q2": block.attn2.to_q, "k2": block.attn2.to_k, "ff": block.ffn}
    with recording(modules) as seen, recording({"a2": block.attn2}) as given:
        run(model, inputs)
    counts = {name: [args[0].shape[1] for args, _ in calls] for name, calls in seen.items()}
    assert counts == {"q1": [kept], "k1": [kept], "q2": [n], "k2": [7], "ff": [n]}
    (args, kwargs), = given["a2"]
    assert torch.equal(seen["k2"][0][0][0], args[1])  # the text keys, bit for bit as the block passed them


@pytest.mark.parametrize("st", [1, 2, 3])
def test_the_grid_is_read_from_the_latent_and_cells_span_st_frames(st):
    model = tiny_wan()
    inputs = wan_inputs(model, frames=5, h=3, w=4)
    tofu_sd.apply(model, ratio=0.5, use_rand=False, st=st)
    with recording({"b": model.blocks[1]}) as given, capturing_matchings(model) as used:
        run(model, inputs)
    x = given["b"][0][0][0]
    for other in (1, 2, 3):
        m = match(x, plan_blocks(3, 4, 2, 2, 2, 30, blocks=2, frames=5, st=other)[1])
        assert torch.equal(m.keep_rows, used["blocks.1"][0].keep_rows) == (other == st)


def reference_partition(frames, h, w, sx, sy, st, offsets):
    """The partition order of a ``frames x h x w`` grid, by loops: each full cell's sources (its members other than
    member ``offsets[cell]``, row-major over frame, row, column), the leftover columns, rows and frames, then one
    destination per cell."""
    ct, ch, cw = frames // st, h // sy, w // sx
    pos = lambda t, y, x: (t * h + y) * w + x  # noqa: E731
    sources, dsts, cell = [], [], 0
    for a in range(ct):
        for b in range(ch):
            for c in range(cw):
                members = [pos(a * st + i, b * sy + j, c * sx + k) for i in range(st) for j in range(sy) for k in range(sx)]
                dsts.append(members.pop(int(offsets[cell])))
                sources += members
                cell += 1
    left = [pos(t, y, x) for t in range(ct * st) for y in range(ch * sy) for x in range(cw * sx, w)]
    left += [pos(t, y, x) for t in range(ct * st) for y in range(ch * sy, h) for x in range(w)]
    left += [pos(t, y, x) for t in range(ct * st, frames) for y in range(h) for x in range(w)]
    return sources + left + dsts, len(sources) + len(left)


@pytest.mark.parametrize("frames,h,w,st", [(5, 5, 7, 2), (6, 4, 4, 3), (3, 4, 6, 1), (1, 5, 3, 1), (2, 3, 5, 2)])
def test_partition_over_frames_matches_a_loop_reference(frames, h, w, st):
    cells = frames // st * (h // 2) * (w // 2)
    offsets = torch.randint(0, 4 * st, (1, cells), generator=torch.Generator().manual_seed(frames * h + w))
    order, num_src = partition_order(h, w, 2, 2, offsets, frames=frames, st=st)
    expected, expected_src = reference_partition(frames, h, w, 2, 2, st, offsets[0])
    assert order[0].tolist() == expected and num_src == expected_src
    if frames == 1:  # one frame is the 2-D grid
        assert torch.equal(order, partition_order(h, w, 2, 2, offsets)[0])


def reference_matching(x, frames, h, w, st, r, window):
    """Bipartite soft matching by loops on the top-left partition: each source's most similar destination (cosine,
    first on ties) among all (``window=None``) or among those of the cells within ``window // 2`` cells of its
    own (of the nearest full cell for a leftover token) in every direction (over frames only if there are 2+
    cells in time); the ``r`` most similar sources go. Returns, per batch element, {source: destination}."""
    order, num_src = reference_partition(frames, h, w, 2, 2, st, [0] * 10**4)
    ct, ch, cw = frames // st, h // 2, w // 2
    rad = None if window is None else window // 2
    rad_t = 0 if rad is None or ct < 2 else rad
    cell_of = lambda p: (min(p // (h * w) // st, ct - 1), min(p // w % h // 2, ch - 1), min(p % w // 2, cw - 1))  # noqa: E731
    dsts = order[num_src:]
    xn = F.normalize(x.double(), dim=-1)
    result = []
    for b in range(x.shape[0]):
        best = []
        for s in order[:num_src]:
            cs = cell_of(s)
            cand = [
                d for d in dsts
                if rad is None or all(abs(u - v) <= q for u, v, q in zip(cell_of(d), cs, (rad_t, rad, rad)))
            ]  # fmt: skip
            scores = [float(xn[b, s] @ xn[b, d]) for d in cand]
            top = max(range(len(cand)), key=lambda i: (scores[i], -i))
            best.append((scores[top], s, cand[top]))
        best.sort(key=lambda e: -e[0])
        result.append({s: d for _, s, d in best[:r]})
    return result


@pytest.mark.parametrize("window", [None, 3, 1])
@pytest.mark.parametrize("frames,h,w,st", [(5, 5, 7, 2), (4, 4, 6, 1), (7, 4, 4, 3)])
def test_global_and_local_matching_over_frames_match_a_loop_reference(frames, h, w, st, window):
    n = frames * h * w
    x = torch.randn(2, n, 6, generator=torch.Generator().manual_seed(n), dtype=torch.float64)
    r = n // 3
    m = match(x, plan_blocks(h, w, 2, 2, 2, r, blocks=1, local_window=window, frames=frames, st=st, dtype=x.dtype)[0])
    order, num_src = partition_order(h, w, 2, 2, frames=frames, st=st)
    got = [dict(zip(m.src_idx[b].tolist(), order[num_src + m.dst_idx[b]].tolist())) for b in range(2)]
    assert got == reference_matching(x, frames, h, w, st, r, window)


# ---------------------------------------------------------------------------------------------------------
# Rotary positions.


def test_rotation_matches_a_per_element_formula():
    """Channel pair (2i, 2i + 1) of each head of token s turns by the angle of table row s, column 2i."""
    g = torch.Generator().manual_seed(0)
    S, heads, D = 5, 3, 8
    x = torch.randn(1, S, heads * D, generator=g)
    angles = torch.rand(S, D // 2, generator=g, dtype=torch.float64) * 6
    table = (angles.cos().repeat_interleave(2, dim=1), angles.sin().repeat_interleave(2, dim=1))
    got = WanRotary().rotate(x, table)
    expected = torch.empty_like(x)
    for s in range(S):
        for h in range(heads):
            for i in range(D // 2):
                a, b = float(x[0, s, h * D + 2 * i]), float(x[0, s, h * D + 2 * i + 1])
                c, n = float(angles[s, i].cos()), float(angles[s, i].sin())
                expected[0, s, h * D + 2 * i], expected[0, s, h * D + 2 * i + 1] = a * c - b * n, a * n + b * c
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-6)
    assert got.dtype == x.dtype


def reference_attn1(attn, x, emb, m, mode):
    """``attn1`` on the reduced tokens, one batch element at a time, each with its own kept tokens' rotary rows
    given to the processor as its table; restored."""
    cos, sin = emb
    reduced = reduce_tokens(x, m, mode)
    outs = []
    for b in range(x.shape[0]):
        pos = m.keep_idx[b]
        outs.append(attn.processor(attn, reduced[b : b + 1], None, None, (cos[:, pos], sin[:, pos])))
    return restore_tokens(torch.cat(outs), m)



@pytest.mark.parametrize("letter", ["P", "M"])
def test_rotary_rows_follow_their_tokens(letter):
    model = tiny_wan()
    inputs = wan_inputs(model, batch=3, frames=4, h=3, w=5)
    tofu_sd.apply(model, ratio=0.5, schedule=letter)
    attn = model.blocks[1].attn1
    with recording({"a": attn}) as given, recording({"a": attn}, "post") as returned, capturing_matchings(model) as used:
        run(model, inputs)
    (args, _), out, m = given["a"][0], returned["a"][0], used["blocks.1"][0]
    x, emb = args[0], args[3]
    assert emb[0].shape == (1, 60, 1, 8) and not torch.equal(m.keep_idx[0], m.keep_idx[1])
    with torch.no_grad():
        expected = reference_attn1(attn, x, emb, m, MODES[letter])
        wrong = reference_attn1(attn, x, emb, ShiftedPositions(m), MODES[letter])
    torch.testing.assert_close(out, expected, rtol=0, atol=2e-6)
    assert not torch.allclose(out, wrong, atol=1e-4)


# ---------------------------------------------------------------------------------------------------------
# Calls: CFG, timesteps, image-to-video.


def test_a_cfg_batch_shares_one_partition_and_batch_one_works():
    model = tiny_wan()
    tofu_sd.apply(model, ratio=0.5)
    with capturing_matchings(model) as used:
        run(model, wan_inputs(model, batch=2))
    for name, (m,) in used.items():
        assert torch.equal(destinations(m)[0], destinations(m)[1]), name
    with capturing_matchings(model) as single:
        run(model, wan_inputs(model, batch=1, seed=3))
    assert torch.equal(destinations(single["blocks.0"][0])[0], destinations(used["blocks.0"][0])[0])


def test_a_per_token_timestep_keys_the_partition_by_its_largest_value():
    """Wan 2.2 TI2V's timestep ``(B, N)``: 0 on the conditioning frame's tokens, the step's value elsewhere."""
    model = tiny_wan()
    tofu_sd.apply(model, ratio=0.5)
    inputs = wan_inputs(model, batch=2, frames=3, h=2, w=2)
    per_token = torch.full((2, 12), 700.0)
    per_token[:, :4] = 0
    dsts = {}
    for key, t in (("tokens", per_token), ("700", torch.full((2,), 700.0)), ("0", torch.zeros(2))):
        with capturing_matchings(model) as used:
            run(model, dict(inputs, timestep=t))
        dsts[key] = destinations(used["blocks.0"][0])
    assert torch.equal(dsts["tokens"], dsts["700"]) and not torch.equal(dsts["tokens"], dsts["0"])


def test_image_to_video_keeps_the_image_conditioning_whole():
    model = tiny_wan(i2v=True)
    inputs = wan_inputs(model, frames=3, h=2, w=4)
    full = run(model, inputs)
    tofu_sd.apply(model, ratio=0.5)
    attn2 = model.blocks[0].attn2
    with recording({"q2": attn2.to_q, "k_img": attn2.add_k_proj, "q1": model.blocks[0].attn1.to_q}) as seen:
        reduced = run(model, inputs)
    counts = {name: [args[0].shape[1] for args, _ in calls] for name, calls in seen.items()}
    assert counts == {"q2": [24], "k_img": [4], "q1": [12]}
    assert not torch.allclose(reduced, full, atol=1e-6)
    tofu_sd.remove(model)
    assert torch.equal(run(model, inputs), full)


def test_wan_pipeline_end_to_end_with_separate_cfg_calls():
    """WanPipeline: 9 frames are 3 latent frames (odd); its conditional and unconditional calls at a step (two
    calls of batch 1) share one partition; remove restores the pipeline's output bit for bit."""
    from diffusers import FlowMatchEulerDiscreteScheduler, WanPipeline

    model = tiny_wan()
    pipe = WanPipeline(tokenizer=None, text_encoder=None, vae=None, transformer=model, scheduler=FlowMatchEulerDiscreteScheduler())
    g = torch.Generator().manual_seed(0)
    call = {
        "prompt_embeds": torch.randn(1, 7, 16, generator=g), "negative_prompt_embeds": torch.randn(1, 7, 16, generator=g),
        "height": 48, "width": 64, "num_frames": 9, "num_inference_steps": 2, "output_type": "latent",
    }  # fmt: skip

    def generate():
        with torch.no_grad():
            return pipe(**call, generator=torch.Generator().manual_seed(1)).frames

    full = generate()
    tofu_sd.apply(pipe, ratio=0.5)
    with capturing_matchings(model) as used:
        reduced = generate()
    assert reduced.shape == full.shape == (1, 4, 3, 6, 8) and not torch.allclose(reduced, full, atol=1e-6)
    calls = used["blocks.0"]
    assert len(calls) == 4 and all(m.num_tokens == 3 * 3 * 4 for m in calls)
    assert torch.equal(destinations(calls[0]), destinations(calls[1]))  # step 0: conditional, unconditional
    assert not torch.equal(destinations(calls[0]), destinations(calls[2]))  # step 1: another timestep
    tofu_sd.remove(pipe)
    assert torch.equal(generate(), full)


# ---------------------------------------------------------------------------------------------------------
# Options and refusals.


def test_st_is_refused_on_image_families_and_checked():
    for model in (tiny_sd3(), tiny_flux()):
        with pytest.raises(ValueError, match="st=2 makes cells span frames of a video; a (SD3|Flux) model"):
            tofu_sd.apply(model, st=2)
        assert_unpatched(model)
        tofu_sd.apply(model, st=1)  # spatial cells: what an image family has anyway
        tofu_sd.remove(model)
    for bad in (0, -1, 1.5, True, "2"):
        with pytest.raises(ValueError, match="st must be None"):
            tofu_sd.TokenFusionConfig(st=bad)
    with pytest.raises(ValueError, match=r"2x2x2 cells allow .*1 - 1/\(sx\*sy\*st\) = 0.875"):
        tofu_sd.TokenFusionConfig(ratio=0.9, st=2)
    assert tofu_sd.TokenFusionConfig(ratio=0.85, st=2).ratio == 0.85


def test_unsupported_options_and_processors_are_refused():
    model = tiny_wan()

    class OtherProcessor:
        def __call__(self, attn, hidden_states, *args, **kwargs):
            return hidden_states

    model.blocks[1].attn1.processor = OtherProcessor()
    with pytest.raises(ValueError, match="blocks.1.attn1: its attention processor OtherProcessor is not WanAttnProcessor"):
        tofu_sd.apply(model)
    assert_unpatched(model)


# ---------------------------------------------------------------------------------------------------------
# Compile, deep copy, threads.


def test_ratio_zero_remove_and_compile():
    model = tiny_wan()
    inputs = wan_inputs(model, frames=3, h=3, w=5)
    compiled, full = check_ratio_zero_then_compiled(model, inputs)
    other = wan_inputs(model, frames=5, h=2, w=3, seed=4)  # another grid: read anew, the graph guards on it
    torch.testing.assert_close(run(compiled, other), run(model, other), rtol=1e-4, atol=1e-5)
    tofu_sd.remove(compiled)
    assert_unpatched(model)
    assert torch.equal(run(model, inputs), full)


def test_compile_repeated_blocks():
    model = tiny_wan()
    inputs = wan_inputs(model, frames=3, h=3, w=4)
    tofu_sd.apply(model, ratio=0.5, matching="local")
    eager = run(model, inputs)
    model.compile_repeated_blocks(backend="aot_eager", fullgraph=True)
    torch.testing.assert_close(run(model, inputs), eager, rtol=1e-4, atol=1e-5)


def test_deep_copy_is_patched_alike_and_independent():
    model = tiny_wan()
    x = wan_inputs(model)
    full = run(model, x)
    tofu_sd.apply(model, ratio=0.5, schedule="PM")
    reduced = run(model, x)
    twin = copy.deepcopy(model)
    assert tofu_sd.get_state(twin) == tofu_sd.get_state(model)
    assert torch.equal(run(twin, x), reduced)
    tofu_sd.remove(model)
    assert torch.equal(run(model, x), full) and torch.equal(run(twin, x), reduced)
    tofu_sd.remove(twin)
    assert torch.equal(run(twin, x), full)


def test_threads_see_their_own_calls():
    model = tiny_wan()
    tofu_sd.apply(model, ratio=0.5, matching="local")
    calls = [wan_inputs(model, frames=5, h=3, w=4, timestep=700.0), wan_inputs(model, batch=1, frames=2, h=4, w=3, timestep=300.0)]
    alone, results = calls_in_threads(model, calls)
    for i in range(2):
        assert len(results[i]) == 3 and all(torch.equal(out, alone[i]) for out in results[i])


# ---------------------------------------------------------------------------------------------------------
# The bench's slice, on the meta device.


def test_wan_slice_is_wan_14b_with_2_of_its_40_blocks_at_480p_and_81_frames():
    assert WAN_14B["num_layers"] == 40 and WAN_14B["num_attention_heads"] * WAN_14B["attention_head_dim"] == 5120
    # diffusers' own defaults of the class are the 14B config, to every value written out
    defaults = inspect.signature(WanTransformer3DModel.__init__).parameters
    assert {k: defaults[k].default for k in WAN_14B} == {**WAN_14B, "patch_size": (1, 2, 2)}
    assert DIT_ARCHS["wan-slice"].build(device="meta").config.patch_size == (1, 2, 2)
    arch = DIT_ARCHS["wan-slice"]
    assert arch.config == {**WAN_14B, "num_layers": 2} and (arch.batch, arch.text_tokens) == (1, WAN_TEXT_TOKENS)
    model = arch.build(device="meta")
    assert len(model.blocks) == 2 and all(p.device.type == "meta" for p in model.parameters())
    inputs = step_inputs(model, 1, 60, 104, text_tokens=arch.text_tokens, device="meta")
    assert inputs["hidden_states"].shape == (1, 16, WAN_LATENT_FRAMES, 60, 104)
    n = 21 * 30 * 52
    tofu_sd.apply(model, ratio=0.5)
    assert "".join(b.letter for b in tofu_sd.patched_blocks(model)) == "MM"
    with recording({i: block.attn1.to_q for i, block in enumerate(model.blocks)}) as seen, torch.no_grad():
        out = model(**inputs, return_dict=False)[0]
    assert out.shape == inputs["hidden_states"].shape
    assert [args[0].shape[1] for i in range(2) for args, _ in seen[i]] == [n - n // 2] * 2
    tofu_sd.remove(model)


def test_wan_slice_17f_times_the_same_blocks_on_5_latent_frames():
    from evaluation.bench.archs import inputs_of

    short, real = DIT_ARCHS["wan-slice-17f"], DIT_ARCHS["wan-slice"]
    assert short.config == real.config and (short.batch, short.text_tokens, short.frames) == (1, WAN_TEXT_TOKENS, 5)
    model = short.build(device="meta")
    assert inputs_of("wan-slice-17f", model, 1, 60, "meta", torch.float32)["hidden_states"].shape == (1, 16, 5, 60, 60)
    assert inputs_of("wan-slice", model, 1, 60, "meta", torch.float32)["hidden_states"].shape[2] == WAN_LATENT_FRAMES
