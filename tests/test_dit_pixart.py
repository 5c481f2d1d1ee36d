"""Token Fusion on a tiny PixArt transformer: attn1 reduced and restored (or keys and values reduced), the
cross-attention and feed-forward see every token; compile, remove, ratio 0."""

import pytest
import torch
from test_dit_common import (
    assert_unpatched,
    capturing_matchings,
    check_ratio_zero_then_compiled,
    pixart_inputs,
    recording,
    run,
    tiny_pixart,
)

import tofu_sd
from tofu_sd.merge import MODES, log_size_bias, reduce_tokens, restore_tokens


@pytest.mark.parametrize("height,width", [(12, 8), (10, 14), (14, 6)])
def test_only_self_attention_sees_fewer_tokens(height, width):
    model = tiny_pixart(num_layers=3)
    inputs = pixart_inputs(model, height=height, width=width, text=6)
    tofu_sd.apply(model, ratio=0.5, blocks="0,2")
    assert [(b.name, b.letter) for b in tofu_sd.patched_blocks(model)] == [
        ("transformer_blocks.0", "M"), ("transformer_blocks.2", "M"),
    ]  # fmt: skip
    n = (height // 2) * (width // 2)
    modules = {}
    for i, block in enumerate(model.transformer_blocks):
        modules.update({(i, "attn1"): block.attn1.to_q, (i, "attn2"): block.attn2.to_q, (i, "ff"): block.ff})
        modules[(i, "text")] = block.attn2.to_k
    with recording(modules) as seen:
        run(model, inputs)
    for (i, part), calls in seen.items():
        expected = {"attn1": n - int(n * 0.5) if i != 1 else n, "attn2": n, "ff": n, "text": 6}[part]
        assert [args[0].shape[1] for args, _ in calls] == [expected], (i, part)


@pytest.mark.parametrize("letter", ["P", "M"])
def test_attn1_equals_reduce_attend_restore(letter):
    model = tiny_pixart(num_layers=2)
    inputs = pixart_inputs(model)
    tofu_sd.apply(model, ratio=0.5, schedule=letter)
    attn = model.transformer_blocks[1].attn1
    with recording({"a": attn}) as given, recording({"a": attn}, "post") as returned, capturing_matchings(model) as used:
        run(model, inputs)
    (args, _), out = given["a"][0], returned["a"][0]
    m = used["transformer_blocks.1"][0]
    with torch.no_grad():
        expected = restore_tokens(attn.processor(attn, reduce_tokens(args[0], m, MODES[letter])), m)
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-6)


def test_kv_keeps_every_query_and_reduces_keys_and_values():
    model = tiny_pixart(num_layers=2)
    inputs = pixart_inputs(model)
    n = 6 * 4
    tofu_sd.apply(model, ratio=0.5, reduce="kv", schedule="M")
    attn = model.transformer_blocks[0].attn1
    with recording({"q": attn.to_q, "k": attn.to_k}) as seen, recording({"a": attn}) as given, recording(
        {"a": attn}, "post"
    ) as returned, capturing_matchings(model) as used:
        run(model, inputs)
    assert seen["q"][0][0][0].shape[1] == n and seen["k"][0][0][0].shape[1] == n - n // 2
    m, x = used["transformer_blocks.0"][0], given["a"][0][0][0]
    with torch.no_grad():
        tokens = reduce_tokens(x, m, "mlerp")
        expected = attn.processor(attn, x, tokens, attention_mask=log_size_bias(m, x.dtype))
    torch.testing.assert_close(returned["a"][0], expected, rtol=0, atol=1e-6)


def test_ratio_zero_remove_and_compile():
    model = tiny_pixart(num_layers=2)
    inputs = pixart_inputs(model, height=10, width=14)
    compiled, full = check_ratio_zero_then_compiled(model, inputs)
    tofu_sd.remove(compiled)
    assert_unpatched(model)
    assert torch.equal(run(model, inputs), full)
