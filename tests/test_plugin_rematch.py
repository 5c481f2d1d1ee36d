"""``rematch_every=k``: each block's partition and matching are computed at one step and reused for the next k - 1
steps of the same pipeline call (the steps read from the U-Net's timesteps), then recomputed."""

import threading

import numpy as np
import pytest
import torch

import tofu_sd
from evaluation.tiny_random import tiny_unet, tiny_unet_inputs
from tofu_sd import state
from tofu_sd.install import call_state
from tofu_sd.state import MAX_CALLS_PER_STEP

TIMESTEPS = [900, 700, 500, 300, 100, 50]
BLOCKS = 5  # patched blocks of the tiny SD-1.5 U-Net


def step_inputs(unet, i, timestep=None, **kw):
    """Inputs of step ``i`` (fixed, so that steps of runs with different ``k`` can be compared one by one)."""
    inputs = tiny_unet_inputs(unet, seed=i, **kw)
    inputs["timestep"] = torch.tensor(TIMESTEPS[i] if timestep is None else timestep)
    return inputs


def call(unet, inputs, cfg):
    """One step: one batched call, or (``cfg="separate"``) one call per half at the same timestep."""
    with torch.no_grad():
        if cfg == "batched":
            return unet(**inputs).sample
        halves = [{**inputs, "sample": inputs["sample"][i : i + 1],
                   "encoder_hidden_states": inputs["encoder_hidden_states"][i : i + 1]} for i in range(2)]  # fmt: skip
        return torch.cat([unet(**half).sample for half in halves])


def denoise(unet, steps, cfg, matches, timesteps=None):
    """Outputs of each step and the matchings computed at each step."""
    outputs, computed = [], []
    for i in range(steps):
        before = len(matches)
        outputs.append(call(unet, step_inputs(unet, i, None if timesteps is None else timesteps[i]), cfg))
        computed.append(matches[before:])
    return outputs, computed


@pytest.mark.parametrize("k,cfg,steps", [(1, "batched", 2), (2, "separate", 4), (3, "batched", 5)])
def test_matching_is_computed_once_every_k_steps(k, cfg, steps, matches):
    unet = tofu_sd.apply(tiny_unet("sd15"), rematch_every=k)
    _, computed = denoise(unet, steps, cfg, matches)
    calls = 1 if cfg == "batched" else 2  # both halves match at a matching step, neither at the others
    assert [len(m) for m in computed] == [BLOCKS * calls if i % k == 0 else 0 for i in range(steps)]


@pytest.mark.parametrize(
    "options,cfg",
    [({"seed": 2}, "batched"), ({"reduce": "kv", "matching": "local", "schedule": "PAMAP"}, "separate")],
    ids=["tokens-batched", "kv-local-separate"],
)
def test_matching_steps_equal_k1_and_reuse_steps_use_the_old_matching(options, cfg, matches, monkeypatch):
    k, steps = 3, 4
    unet = tofu_sd.apply(tiny_unet("sd15"), rematch_every=k, **options)
    reused, _ = denoise(unet, steps, cfg, matches)
    tofu_sd.apply(unet, rematch_every=1, **options)
    every, computed = denoise(unet, steps, cfg, matches)
    for i in range(steps):
        if i % k == 0:
            assert torch.equal(reused[i], every[i]), i
            continue
        assert not torch.allclose(reused[i], every[i]), i
        # The same step matched with k=1 but given, call by call and block by block, the matchings of the last
        # matching step (each CFG half its own).
        old = iter(computed[i - i % k])
        with monkeypatch.context() as patch:
            patch.setattr(state, "match", lambda x, plan, old=old: next(old))
            assert torch.equal(call(unet, step_inputs(unet, i), cfg), reused[i]), i
        assert next(old, None) is None


def test_a_higher_timestep_starts_a_new_pipeline_call(matches):
    unet = tofu_sd.apply(tiny_unet("sd15"), rematch_every=3)
    timesteps = [900, 700, 900.0, 700, 700, 500, 300]  # a second call at 900: a Python float is read alike
    outputs, computed = denoise(unet, 7, "batched", matches, timesteps)
    # Steps 0 1 | 0 1 1 2 3: the second pipeline call matches at its steps 0 and 3; the second call of its
    # step 1 has no matching stored for its position in the step, so it matches too.
    assert [len(m) for m in computed] == [5, 0, 5, 0, 5, 0, 5]
    fresh = tofu_sd.apply(tiny_unet("sd15"), rematch_every=3)
    expected, _ = denoise(fresh, 3, "batched", matches, [900, 700, 900])
    assert torch.equal(outputs[2], expected[2])


def generate(pipe, **kw):
    return pipe(
        "A high-quality photograph of a goldfish.", num_inference_steps=3, height=32, width=32,
        generator=torch.Generator().manual_seed(0), output_type="np", **kw,
    ).images


def test_each_pipeline_call_starts_a_new_matching(tiny_pipe_factory, matches):
    pipe = tofu_sd.apply(tiny_pipe_factory(), ratio=0.5, rematch_every=2)
    counts = []  # matchings computed before each U-Net call
    handle = pipe.unet.register_forward_pre_hook(lambda *_: counts.append(len(matches)))
    first = generate(pipe)
    second = generate(pipe)
    handle.remove()
    per_call = np.diff(counts + [len(matches)]).tolist()
    assert per_call == [5, 0, 5] * 2  # two pipeline calls of 3 steps (CFG batched): match, reuse, match
    fresh = generate(tofu_sd.apply(tiny_pipe_factory(), ratio=0.5, rematch_every=2))
    assert np.array_equal(second, fresh) and np.array_equal(first, fresh)
    assert not np.array_equal(fresh, generate(tofu_sd.apply(tiny_pipe_factory(), ratio=0.5)))


def test_a_shape_change_rematches_and_storage_stays_bounded(matches, monkeypatch):
    unet = tofu_sd.apply(tiny_unet("sd15"), rematch_every=3)
    call_data = call_state(unet)
    grids = [(16, 16), (12, 12), (16, 16), (12, 12)]
    outputs, computed = [], []
    for i, (h, w) in enumerate(grids):
        before = len(matches)
        outputs.append(call(unet, step_inputs(unet, i, height=h, width=w), "batched"))
        computed.append(matches[before:])
        stored = {key[1][-2:] for key in call_data.matchings}  # key: (block, (frames, h, w), batch, ...)
        assert stored == [{(16, 16)}, {(16, 16), (12, 12)}, {(16, 16), (12, 12)}, {(12, 12)}][i], i
        assert len(call_data.matchings) == BLOCKS * len(stored)
    assert [len(m) for m in computed] == [5, 5, 0, 5]  # step 1: a grid of its own; step 3: a matching step
    tofu_sd.apply(unet)
    assert torch.equal(outputs[1], call(unet, step_inputs(unet, 1, height=12, width=12), "batched"))
    old = iter(computed[0])
    monkeypatch.setattr(state, "match", lambda x, plan: next(old))
    assert torch.equal(outputs[2], call(unet, step_inputs(unet, 2), "batched"))


def test_calls_of_one_step_beyond_the_stored_ones_match(matches):
    unet = tofu_sd.apply(tiny_unet("sd15"), rematch_every=2)
    for timestep, expected in [(900, 5), (900, 5), (700, 0), (700, 0)] + [(700, 5)] * 4:
        before = len(matches)
        call(unet, step_inputs(unet, 0, timestep), "batched")
        assert len(matches) - before == expected
    assert len(call_state(unet).matchings) == BLOCKS * MAX_CALLS_PER_STEP


def test_threads_count_their_own_steps():
    unet = tofu_sd.apply(tiny_unet("sd15"), rematch_every=2, matching="local")
    runs = {t: [step_inputs(unet, i, batch=1 + t, height=12 if t else 16, width=12) for i in range(4)] for t in (0, 1)}
    expected = {t: [call(unet, inputs, "batched") for inputs in runs[t]] for t in runs}
    outputs, errors, start = {0: [], 1: []}, [], threading.Barrier(2)

    def work(t):
        start.wait()
        try:
            for inputs in runs[t]:
                outputs[t].append(call(unet, inputs, "batched"))
        except Exception as error:  # reported below
            errors.append(error)

    threads = [threading.Thread(target=work, args=(t,)) for t in runs]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors, errors
    for t in runs:
        assert all(torch.equal(a, b) for a, b in zip(outputs[t], expected[t], strict=True)), t


def test_remove_and_ratio_zero_are_bit_identical(unet_sd15):
    reference = [call(unet_sd15, step_inputs(unet_sd15, i), "batched") for i in range(2)]
    tofu_sd.apply(unet_sd15, rematch_every=2)
    assert not torch.equal(call(unet_sd15, step_inputs(unet_sd15, 0), "batched"), reference[0])
    tofu_sd.remove(unet_sd15)
    assert torch.equal(call(unet_sd15, step_inputs(unet_sd15, 1), "batched"), reference[1])
    tofu_sd.apply(unet_sd15, ratio=0.0, rematch_every=4)
    assert all(torch.equal(call(unet_sd15, step_inputs(unet_sd15, i), "batched"), reference[i]) for i in range(2))


@pytest.mark.parametrize(
    "value,match",
    [
        (0, r"rematch_every must be >= 1"),
        (-2, r"rematch_every must be >= 1"),
        (2.0, r"rematch_every must be an int"),
        (True, r"rematch_every must be an int"),
        ("2", r"rematch_every must be an int"),
        (None, r"rematch_every must be an int"),
    ],
)
def test_bad_rematch_every_raises_and_leaves_the_model_untouched(unet_sd15, value, match):
    tofu_sd.apply(unet_sd15, ratio=0.3, rematch_every=2)
    state = tofu_sd.get_state(unet_sd15)
    with pytest.raises(ValueError, match=match):
        tofu_sd.apply(unet_sd15, rematch_every=value)
    assert tofu_sd.get_state(unet_sd15) is state and state.config.rematch_every == 2


def test_torch_compile_whole_reuses_matchings_as_eager():
    """The step count is kept on the host (the model's call hook runs outside compiled graphs): a U-Net compiled
    whole, without graph breaks, reuses matchings exactly as the eager one does."""
    eager = tofu_sd.apply(tiny_unet("sd15"), rematch_every=2)
    inputs = [step_inputs(eager, i) for i in range(3)]
    expected = [call(eager, x, "batched") for x in inputs]
    unet = tofu_sd.apply(tiny_unet("sd15"), rematch_every=2)
    torch._dynamo.reset()
    explanation = torch._dynamo.explain(unet)(**inputs[0])
    assert explanation.graph_break_count == 0, explanation.break_reasons
    compiled = torch.compile(unet, backend="aot_eager")
    for x, out in zip(inputs, expected):
        torch.testing.assert_close(call(compiled, x, "batched"), out, rtol=1e-4, atol=1e-5)
    # step 1 reused step 0's matchings: matching afresh gives another output
    assert not torch.allclose(expected[1], call(tofu_sd.apply(eager), inputs[1], "batched"))


def test_compiled_blocks_in_an_eager_unet_reuse_matchings():
    """Regional compilation: the step count stays host-side, a compiled block takes the stored matching."""
    eager = tofu_sd.apply(tiny_unet("sd15"), rematch_every=2, reduce="kv")
    expected = [call(eager, step_inputs(eager, i), "batched") for i in range(3)]
    unet = tofu_sd.apply(tiny_unet("sd15"), rematch_every=2, reduce="kv")
    unet.get_submodule(tofu_sd.patched_blocks(unet)[0].name).compile(backend="aot_eager")
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    for i in range(3):
        torch.testing.assert_close(call(unet, step_inputs(unet, i), "batched"), expected[i], rtol=1e-4, atol=1e-5)
    assert not torch._dynamo.utils.counters["graph_break"]
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 2  # a matching and a reusing graph
    assert not torch.allclose(expected[1], call(tofu_sd.apply(eager, reduce="kv"), step_inputs(eager, 1), "batched"))
