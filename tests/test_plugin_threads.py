"""One patched U-Net called from two threads at once gives every call the output it gives alone."""

import sys
import threading

import pytest
import torch

import tofu_sd
from evaluation.tiny_random import tiny_unet, tiny_unet_inputs

CALLS = 15


def call_inputs(unet, thread, i):
    """Different inputs in the two threads: batch size, grid (so token counts) and timestep all differ."""
    inputs = tiny_unet_inputs(unet, batch=1 + thread, height=12 if thread else 8, width=12, seed=100 * thread + i)
    inputs["timestep"] = torch.tensor(100 + 50 * i + 7 * thread)
    return inputs


@pytest.mark.parametrize("matching", ["global", "local"])
def test_concurrent_calls_equal_sequential_calls(matching):
    unet = tofu_sd.apply(tiny_unet("sd15"), ratio=0.5, matching=matching)
    calls = [[call_inputs(unet, t, i) for i in range(CALLS)] for t in range(2)]
    with torch.no_grad():
        expected = [[unet(**inputs).sample for inputs in thread] for thread in calls]
    outputs = [[None] * CALLS for _ in range(2)]
    errors = []
    start = threading.Barrier(2)

    def work(t):
        start.wait()
        try:
            with torch.no_grad():
                for i, inputs in enumerate(calls[t]):
                    outputs[t][i] = unet(**inputs).sample
        except Exception as error:  # reported below, with the thread's results
            errors.append(error)

    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-5)  # switch threads often, inside the hooks too
    try:
        threads = [threading.Thread(target=work, args=(t,)) for t in range(2)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    finally:
        sys.setswitchinterval(interval)
    assert not errors, errors
    for t in range(2):
        for i in range(CALLS):
            assert torch.equal(outputs[t][i], expected[t][i]), (t, i)
