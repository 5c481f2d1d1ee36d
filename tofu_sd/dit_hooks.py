"""The hooks that put Token Fusion around the attention of diffusion transformers (SD3, PixArt, Flux).

The design is the U-Net's (:mod:`tofu_sd.hooks`), with one more kind of hook for Flux's rotary embeddings:

- :class:`TransformerCallHooks`, a torch forward pre-hook and forward hook on the transformer model, record the
  call's timestep (through :class:`~tofu_sd.hooks.CallState`) and its patch grid;
- :class:`BlockMatchingHook` on each patched block matches the block's input *image* tokens;
- :class:`ImageAttentionHook` on an attention whose ``hidden_states`` argument is the image stream (SD3's joint
  ``attn`` and SD3.5's ``attn2``, PixArt's ``attn1``, Flux's double-stream ``attn``) reduces that argument and
  restores the image output; :class:`SingleStreamAttentionHook` on a Flux single-stream block's ``attn`` does the
  same to the image part of the ``[text, image]`` sequence. Text tokens pass through untouched;
- :class:`RotaryHook` on ``norm_q`` / ``norm_k`` (and ``norm_added_q`` / ``norm_added_k``) of a patched Flux
  attention applies the rotary embedding with each kept token's own position (see :mod:`tofu_sd.dit`).

The state objects are thread-local, as the U-Net's.
"""

from __future__ import annotations

import threading

import torch
from diffusers.hooks import ModelHook
from diffusers.models.embeddings import apply_rotary_emb

from .hooks import CallState, _argument, _with_arguments
from .merge import MODES, Matching, reduce_tokens, restore_tokens

MATCHING_HOOK = "tofu_sd.dit.matching"
ATTENTION_HOOK = "tofu_sd.dit.attention"
ROTARY_HOOK = "tofu_sd.dit.rotary"
HOOK_NAMES = (MATCHING_HOOK, ATTENTION_HOOK, ROTARY_HOOK)


class ModelState(threading.local):
    """The patch grid ``(height, width)`` of the transformer call in progress, or ``None`` (thread-local)."""

    def __init__(self) -> None:
        self.grid: tuple[int, int] | None = None


class BlockState(threading.local):
    """What one patched block call shares between its hooks (thread-local): its matching, whether an attention
    call is reduced, the number of text tokens in front of the image tokens (Flux single-stream blocks), and the
    rotary tables the :class:`RotaryHook` s apply: ``rotary`` (flat over the batch, for ``norm_q`` / ``norm_k``)
    and ``rotary_text`` (for ``norm_added_q`` / ``norm_added_k``)."""

    def __init__(self) -> None:
        self.matching: Matching | None = None
        self.reduced = False
        self.text_len: int | None = None
        self.rotary: tuple[torch.Tensor, torch.Tensor] | None = None
        self.rotary_text: tuple[torch.Tensor, torch.Tensor] | None = None


class TransformerCallHooks:
    """A torch forward pre-hook (:meth:`pre`) and forward hook (:meth:`post`) on the transformer model.

    ``pre`` starts the call's :class:`~tofu_sd.hooks.CallState` at the ``timestep`` argument (argument number
    ``timestep_index``, times ``timestep_scale``: the timestep as the model scales it, Flux's ``[0, 1]`` times
    1000, for the partition key) and records the patch grid that ``grid(module, args, kwargs)`` finds; ``post``
    (registered with ``always_call``) ends the call, even one that raised.

    Both are registered through ``torch.compiler.disable``: they always run as Python, outside any compiled
    graph. ``torch.compile(model)`` calls a module's own hooks outside the frame of its ``forward`` anyway, and
    compiled as a frame of their own their writes to the thread-local state would be lost (torch 2.14 does not
    replay attribute writes to a ``threading.local`` after a graph). So the grid is read on the host at every
    call, and the compiled forward, which reads it, guards on it: another grid recompiles."""

    def __init__(self, call: CallState, state: ModelState, grid, timestep_index: int, timestep_scale: float = 1.0):
        self.call, self.state, self.grid = call, state, grid
        self.timestep_index, self.timestep_scale = timestep_index, timestep_scale

    def pre(self, module, args, kwargs):
        timestep = _argument(args, kwargs, self.timestep_index, "timestep")
        if timestep is not None and self.timestep_scale != 1:
            timestep = timestep * self.timestep_scale
        self.call.start(timestep)
        self.state.grid = self.grid(module, args, kwargs)

    def post(self, module, args, kwargs, output):
        self.call.finish()
        self.state.grid = None


class BlockMatchingHook(ModelHook):
    """Bipartite soft matching on the block's input image tokens (its ``hidden_states`` argument, ``(B, N, C)``),
    once per block call (or, at a reuse step of ``rematch_every``, the matching stored at the last matching step).

    With ``text_len`` set (Flux single-stream blocks), also records the number of text tokens the block puts in
    front of the image tokens (its ``encoder_hidden_states`` argument)."""

    def __init__(self, call: CallState, model: ModelState, state: BlockState, index: int, text_len: bool = False):
        super().__init__()
        self.call, self.model, self.state, self.index, self.text_len = call, model, state, index, text_len

    def pre_forward(self, module, *args, **kwargs):
        x = _argument(args, kwargs, 0, "hidden_states")
        self.state.matching, self.state.reduced, self.state.text_len = None, False, None
        grid = self.model.grid
        if grid is not None and isinstance(x, torch.Tensor) and x.ndim == 3 and grid[0] * grid[1] == x.shape[1]:
            self.state.matching = self.call.matching(self.index, grid[0], grid[1], x)
            if self.text_len:
                self.state.text_len = _argument(args, kwargs, 1, "encoder_hidden_states").shape[1]
        return args, kwargs

    def post_forward(self, module, output):
        self.state.matching, self.state.text_len = None, None  # free the indices between calls
        return output


def gather_rotary(table: torch.Tensor, m: Matching) -> torch.Tensor:
    """Rows ``keep_idx`` of an image rotary table ``(N, D)``: ``(B, N - r, D)``, each reduced slot's position.

    The reduced slots are the unmerged sources and the destinations (:class:`~tofu_sd.merge.Matching`), so a
    kept token keeps its own position and a merged group takes its destination's."""
    return table.index_select(0, m.keep_idx.reshape(-1)).view(m.batch, m.num_tokens - m.r, -1)


class _ReducingHook(ModelHook):
    """A hook on a patched block's attention that reduces with the block's matching and schedule letter."""

    def __init__(self, state: BlockState, letter: str, rotary: bool = False) -> None:
        super().__init__()
        self.state, self.letter, self.mode, self.rotary = state, letter, MODES[letter], rotary

    def _finish(self) -> Matching:
        m = self.state.matching  # kept until the block ends: SD3.5's attn2 reduces with it too
        self.state.reduced, self.state.rotary, self.state.rotary_text = False, None, None
        return m


class ImageAttentionHook(_ReducingHook):
    """Runs the attention on the reduced image tokens (its ``hidden_states`` argument), then gives every image
    token its output back (the first output, or the only one). ``encoder_hidden_states`` (the text) is passed
    unchanged. With ``rotary`` (Flux), the call's ``image_rotary_emb`` is taken out of the call and applied by
    the :class:`RotaryHook` s instead: text positions to the text queries and keys, each kept image token's own
    position to the image ones. A call with an attention mask is left alone (a mask is laid out for every token)."""

    def pre_forward(self, module, *args, **kwargs):
        m = self.state.matching
        x = _argument(args, kwargs, 0, "hidden_states")
        if m is None or x is None or x.shape[1] != m.num_tokens or _argument(args, kwargs, 2, "attention_mask") is not None:
            return args, kwargs
        values = {0: ("hidden_states", reduce_tokens(x, m, self.mode))}
        emb = _argument(args, kwargs, 3, "image_rotary_emb") if self.rotary else None
        if emb is not None:
            text = _argument(args, kwargs, 1, "encoder_hidden_states")
            text_len = 0 if text is None else text.shape[1]
            if emb[0].shape[0] != text_len + m.num_tokens:
                return args, kwargs  # positions laid out otherwise than [text, image]: leave the call alone
            cos, sin = emb
            self.state.rotary = (gather_rotary(cos[text_len:], m).flatten(0, 1), gather_rotary(sin[text_len:], m).flatten(0, 1))
            self.state.rotary_text = (cos[:text_len], sin[:text_len])
            values[3] = ("image_rotary_emb", None)
        self.state.reduced = True
        return _with_arguments(args, kwargs, values)

    def post_forward(self, module, output):
        if not self.state.reduced:
            return output
        m = self._finish()
        if isinstance(output, tuple):
            return (restore_tokens(output[0], m), *output[1:])
        return restore_tokens(output, m)


class SingleStreamAttentionHook(_ReducingHook):
    """On a Flux single-stream block's ``attn``, whose ``hidden_states`` is ``[text, image]``: reduces the image
    part, keeps the text part bit for bit, and restores the image part of the output. The rotary embedding, laid
    out over ``[text, image]`` positions, is gathered alike (text rows, then each kept image token's row) and
    applied by the :class:`RotaryHook` s on ``norm_q`` / ``norm_k``."""

    def pre_forward(self, module, *args, **kwargs):
        m, text_len = self.state.matching, self.state.text_len
        x = _argument(args, kwargs, 0, "hidden_states")
        if (
            m is None
            or text_len is None
            or x is None
            or x.shape[1] != text_len + m.num_tokens
            or _argument(args, kwargs, 2, "attention_mask") is not None
        ):
            return args, kwargs
        text, image = x[:, :text_len], x[:, text_len:]
        values = {0: ("hidden_states", torch.cat([text, reduce_tokens(image, m, self.mode)], dim=1))}
        emb = _argument(args, kwargs, 3, "image_rotary_emb")
        if emb is not None:
            if emb[0].shape[0] != x.shape[1]:
                return args, kwargs
            self.state.rotary = tuple(_joint_rotary(table, text_len, m) for table in emb)
            values[3] = ("image_rotary_emb", None)
        self.state.reduced = True
        return _with_arguments(args, kwargs, values)

    def post_forward(self, module, output):
        if not self.state.reduced:
            return output
        m, text_len = self._finish(), self.state.text_len
        return torch.cat([output[:, :text_len], restore_tokens(output[:, text_len:], m)], dim=1)


def _joint_rotary(table: torch.Tensor, text_len: int, m: Matching) -> torch.Tensor:
    """A ``[text, image]`` rotary table ``(T + N, D)`` for the reduced sequence, flat: ``(B * (T + N - r), D)``."""
    text = table[:text_len].unsqueeze(0).expand(m.batch, -1, -1)
    return torch.cat([text, gather_rotary(table[text_len:], m)], dim=1).flatten(0, 1)


class RotaryHook(ModelHook):
    """On ``norm_q`` / ``norm_k`` (``text=False``) or ``norm_added_q`` / ``norm_added_k`` (``text=True``) of a
    patched Flux attention: while the attention hook holds a rotary table, rotates the normalized queries or keys
    ``(B, S, H, D)`` with diffusers' own ``apply_rotary_emb``, as the processor would have rotated them.

    The image table holds a row per batch element and token (the kept tokens differ per batch element), which
    ``apply_rotary_emb`` does not take; so the batch is folded into its sequence dimension, ``(1, B * S, H, D)``,
    where the table fits. Rotary embedding is elementwise per token, so rotating text and image apart, before
    the processor concatenates them, gives the bits of rotating the concatenation."""

    def __init__(self, state: BlockState, text: bool) -> None:
        super().__init__()
        self.state, self.text = state, text

    def post_forward(self, module, output):
        emb = self.state.rotary_text if self.text else self.state.rotary
        if emb is None:
            return output
        if self.text:
            return apply_rotary_emb(output, emb, sequence_dim=1)
        B, S = output.shape[:2]
        return apply_rotary_emb(output.reshape(1, B * S, *output.shape[2:]), emb, sequence_dim=1).view(output.shape)
