"""The hooks that run a patched block's sub-modules on reduced tokens, with the block's matching and letter.

- :class:`ReduceRestoreHook` runs a module on the reduced tokens of its ``hidden_states`` argument and gives
  every token its output back (tomesd's ``m`` / ``u`` around ``attn1``, ``attn2`` or ``ff`` of a U-Net block;
  the image-stream attention of a diffusion transformer block, whose text tokens pass untouched). With
  ``rotary`` (a :class:`RotaryLayout`), the call's rotary table is taken out of the call and applied per kept
  token by :class:`RotaryHook`; with ``joint_mask``, a mask over ``[text, image]`` is cut to the kept tokens
  (:func:`cut_joint_mask`);
- :class:`SingleStreamHook` does the same to the image part of a ``[text, image]`` sequence (the single-stream
  blocks of Flux, Chroma and FLUX.2), its mask over that sequence cut alike; :class:`LeadingImageHook` to the
  image part of an ``[image, rest]`` sequence (Z-Image's main layers), its key mask and per-element rotary table
  cut alike;
- :class:`KeyValueHook` keeps every token a query and passes the reduced tokens as keys and values
  (``reduce="kv"``), with proportional attention's ``log(size)`` bias as the attention mask (the joint
  attentions of SD3 and Flux, which take neither apart, have :mod:`tofu_sd.joint_kv` instead);
- :class:`RotaryHook` on the query / key norms of an attention rotates them with each kept token's position.
"""

from __future__ import annotations

import torch
from diffusers.hooks import ModelHook
from diffusers.models.attention_processor import AttnProcessor, SlicedAttnProcessor
from diffusers.models.embeddings import apply_rotary_emb

from .arguments import argument, with_arguments
from .merge import MODES, Matching, log_size_bias, reduce_tokens, restore_tokens
from .state import BlockState

REDUCE_HOOK = "tofu_sd.reduce"
ROTARY_HOOK = "tofu_sd.rotary"


class _LetterHook(ModelHook):
    """A hook on a sub-module of a patched block that reduces with the block's matching and schedule letter."""

    def __init__(self, state: BlockState, letter: str) -> None:
        super().__init__()
        self.state, self.letter, self.mode = state, letter, MODES[letter]

    def _restore(self, output):
        """``output`` (or its first element) restored with the matching the call was reduced with, if any."""
        m, self.state.reduced = self.state.reduced, None
        self.state.rotary = self.state.rotary_text = None
        if m is None:
            return output
        if isinstance(output, tuple):
            return (restore_tokens(output[0], m), *output[1:])
        return restore_tokens(output, m)


def batch_rows(m: Matching, start: int, stop: int) -> Matching:
    """The matching of batch rows ``start:stop`` of ``m``, for those rows' tokens alone."""
    n, kept = m.num_tokens, m.num_tokens - m.r
    return Matching(
        keep_rows=m.keep_rows[start * kept : stop * kept] - start * n,
        restore_rows=m.restore_rows[start * n : stop * n] - start * kept,
        ranked_src_rows=m.ranked_src_rows[start:stop] - start * n,
        dst_idx=m.dst_idx[start:stop],
        num_tokens=n,
        num_dst=m.num_dst,
    )


def gather_rotary(table: torch.Tensor, m: Matching) -> torch.Tensor:
    """Rows ``keep_rows`` of an image rotary table ``(N, D)``: ``(B, N - r, D)``, each reduced slot's position.

    The reduced slots are the unmerged sources and the destinations (:class:`~tofu_sd.merge.Matching`), so a
    kept token keeps its own position and a merged group takes its destination's (the token that stays in the
    group's slot)."""
    return table.index_select(0, m.keep_idx.reshape(-1)).view(m.batch, m.num_tokens - m.r, -1)


class RotaryLayout:
    """How an attention call carries its rotary table, and how a table rotates queries and keys. This one is
    Flux's: ``image_rotary_emb`` a real ``(cos, sin)`` pair laid out over ``[text, image]``, applied by diffusers'
    ``apply_rotary_emb``. A family whose table is laid out otherwise gives its own (``Family.rotary_layout``)."""

    #: The attention's argument (4th positional) that carries the table.
    argument = "image_rotary_emb"

    def split(self, emb, text_len: int, m: Matching) -> tuple | None:
        """The table of each kept image token, flat over the batch (``B * (N - r)`` rows, :func:`gather_rotary`),
        and the text's table; ``None`` if ``emb`` is laid out otherwise (the call is then left alone)."""
        cos, sin = emb
        if cos.shape[0] != text_len + m.num_tokens:
            return None
        image = (gather_rotary(cos[text_len:], m).flatten(0, 1), gather_rotary(sin[text_len:], m).flatten(0, 1))
        return image, (cos[:text_len], sin[:text_len])

    def rotate(self, x: torch.Tensor, table) -> torch.Tensor:
        """Queries or keys ``x`` ``(B, S, H, D)`` rotated with ``table``, one row per token of ``S``."""
        return apply_rotary_emb(x, table, sequence_dim=1)


def kept_positions(m: Matching, before: int, after: int) -> torch.Tensor:
    """Per batch element, where the tokens of a reduced sequence sit in the full one, ``(B, before + N - r +
    after)``: the full sequence is ``[before tokens, N image tokens, after tokens]``, the reduced one keeps the
    tokens before and after as they are and, between them, the kept image slots at their own positions (a merged
    group: its destination's), as :func:`gather_rotary` takes positions."""
    B, device = m.batch, m.keep_rows.device
    lead = torch.arange(before, device=device).expand(B, -1)
    trail = torch.arange(before + m.num_tokens, before + m.num_tokens + after, device=device).expand(B, -1)
    return torch.cat([lead, m.keep_idx + before, trail], dim=1)


def cut_sequence_mask(mask: torch.Tensor, rows: torch.Tensor, length: int) -> torch.Tensor | None:
    """An attention mask over a sequence of ``length`` tokens cut to the reduced sequence whose tokens sit at
    ``rows`` ``(B, S')`` of it (:func:`kept_positions`): a key mask ``(B or 1, length)`` its columns; a 4-D mask
    ``(B or 1, heads or 1, length or 1, length)`` its rows and columns. Any mask the attention takes that way is
    cut exactly, boolean or additive. ``None`` for a mask laid out otherwise."""
    B, rows = rows.shape[0], rows.to(mask.device)
    if mask.ndim == 2 and mask.shape[0] in (1, B) and mask.shape[1] == length:
        return mask.expand(B, -1).gather(1, rows)
    if mask.ndim != 4 or mask.shape[0] not in (1, B) or mask.shape[-1] != length or mask.shape[-2] not in (1, length):
        return None
    mask = mask.expand(B, *mask.shape[1:])
    heads = mask.shape[1]
    if mask.shape[2] == length:
        mask = mask.gather(2, rows[:, None, :, None].expand(B, heads, -1, length))
    return mask.gather(3, rows[:, None, None, :].expand(B, heads, mask.shape[2], -1))


def cut_joint_mask(mask: torch.Tensor, text_len: int, m: Matching) -> torch.Tensor | None:
    """An attention mask over ``[text, image]`` (``text_len + N`` queries and keys) cut to the reduced sequence
    ``[text, kept image tokens]`` (:func:`cut_sequence_mask`). ``mask``: 4-D, ``(B or 1, heads or 1, S or 1,
    S)``; ``None`` for a mask laid out otherwise."""
    if mask.ndim != 4:
        return None
    return cut_sequence_mask(mask, kept_positions(m, text_len, 0), text_len + m.num_tokens)


class ReduceRestoreHook(_LetterHook):
    """Runs the module on the reduced tokens of its ``hidden_states``, then gives every token its output back.

    Only ``hidden_states`` is reduced: ``encoder_hidden_states`` (a cross-attention's or a joint attention's
    text) passes unchanged. A call that does not carry the block's tokens is left alone: another token count
    or batch, or an attention mask laid out per query (any mask, unless ``key_mask``: then a ``(B, 1, T)`` or
    2-D mask over the text keys is kept; or ``joint_mask``: then a mask over the ``[text, image]`` sequence that
    the attention concatenates, text first, is cut to the kept tokens, :func:`cut_joint_mask`, and a mask laid
    out otherwise leaves the call alone). With ``chunks`` (a U-Net's ``ff``), a call on fewer batch rows is taken
    as the next chunk of diffusers' batch-chunked feed-forward and reduced with those rows of the matching. With
    ``rotary`` (a :class:`RotaryLayout`), the call's ``image_rotary_emb`` is taken out of the call and handed to
    the :class:`RotaryHook` s: the text's table for the text queries and keys, each kept image token's own row
    for the image ones."""

    def __init__(
        self, state: BlockState, letter: str, *, chunks=False, key_mask=False, joint_mask=False, rotary=None
    ) -> None:
        super().__init__(state, letter)
        self.chunks, self.key_mask, self.joint_mask, self.rotary = chunks, key_mask, joint_mask, rotary

    def _matching(self, args, kwargs, x) -> Matching | None:
        m = self.state.matching
        if m is None or not isinstance(x, torch.Tensor) or x.ndim != 3 or x.shape[1] != m.num_tokens:
            return None
        mask = argument(args, kwargs, 2, "attention_mask")
        keys_only = self.key_mask and (mask is not None and (mask.ndim < 3 or mask.shape[-2] == 1))
        if mask is not None and not keys_only and not self.joint_mask:
            return None  # laid out for the full token set
        if x.shape[0] == m.batch:
            return m
        start = self.state.rows_done
        if not self.chunks or start + x.shape[0] > m.batch:
            return None
        self.state.rows_done = start + x.shape[0]
        return batch_rows(m, start, start + x.shape[0])

    def pre_forward(self, module, *args, **kwargs):
        self.state.reduced = None
        x = argument(args, kwargs, 0, "hidden_states")
        m = self._matching(args, kwargs, x)
        if m is None:
            return args, kwargs
        values = {0: ("hidden_states", reduce_tokens(x, m, self.mode))}
        text = argument(args, kwargs, 1, "encoder_hidden_states")
        text_len = 0 if text is None else text.shape[1]
        mask = argument(args, kwargs, 2, "attention_mask") if self.joint_mask else None
        if mask is not None:
            mask = cut_joint_mask(mask, text_len, m)
            if mask is None:
                return args, kwargs  # laid out otherwise: leave the call alone
            values[2] = ("attention_mask", mask)
        emb = argument(args, kwargs, 3, self.rotary.argument) if self.rotary is not None else None
        if emb is not None:
            tables = self.rotary.split(emb, text_len, m)
            if tables is None:
                return args, kwargs  # positions laid out otherwise: leave the call alone
            self.state.rotary, self.state.rotary_text = tables
            values[3] = (self.rotary.argument, None)
        self.state.reduced = m
        return with_arguments(args, kwargs, values)

    def post_forward(self, module, output):
        return self._restore(output)


class SingleStreamHook(_LetterHook):
    """On a single-stream block's attention, whose ``hidden_states`` is ``[text, image]``: reduces the image
    part, keeps the text part bit for bit, and restores the image part of the output. The rotary table, laid out
    over ``[text, image]``, is gathered alike (text rows, then each kept image token's row) for the
    :class:`RotaryHook` s. An attention mask over the sequence is cut to the kept tokens (:func:`cut_joint_mask`);
    a call with a mask laid out otherwise is left alone."""

    def pre_forward(self, module, *args, **kwargs):
        m, text_len = self.state.matching, self.state.text_len
        self.state.reduced = None
        x = argument(args, kwargs, 0, "hidden_states")
        if m is None or text_len is None or x is None or x.shape[1] != text_len + m.num_tokens:
            return args, kwargs
        values = {}
        mask = argument(args, kwargs, 2, "attention_mask")
        if mask is not None:
            mask = cut_joint_mask(mask, text_len, m)
            if mask is None:
                return args, kwargs
            values[2] = ("attention_mask", mask)
        text, image = x[:, :text_len], x[:, text_len:]
        values[0] = ("hidden_states", torch.cat([text, reduce_tokens(image, m, self.mode)], dim=1))
        emb = argument(args, kwargs, 3, "image_rotary_emb")
        if emb is not None:
            if emb[0].shape[0] != x.shape[1]:
                return args, kwargs
            self.state.rotary = tuple(_joint_rotary(table, text_len, m) for table in emb)
            values[3] = ("image_rotary_emb", None)
        self.state.reduced = m
        return with_arguments(args, kwargs, values)

    def post_forward(self, module, output):
        m, text_len = self.state.reduced, self.state.text_len
        self.state.reduced, self.state.rotary = None, None
        if m is None:
            return output
        return torch.cat([output[:, :text_len], restore_tokens(output[:, text_len:], m)], dim=1)


def _joint_rotary(table: torch.Tensor, text_len: int, m: Matching) -> torch.Tensor:
    """A ``[text, image]`` rotary table ``(T + N, D)`` for the reduced sequence, flat: ``(B * (T + N - r), D)``."""
    text = table[:text_len].unsqueeze(0).expand(m.batch, -1, -1)
    return torch.cat([text, gather_rotary(table[text_len:], m)], dim=1).flatten(0, 1)


class LeadingImageHook(_LetterHook):
    """On a single-stream block's attention whose ``hidden_states`` is ``[image, rest]``: the image tokens first,
    then whatever the model appended per batch element (Z-Image's image padding, caption and batch padding; their
    number is ``BlockState.text_len``). Reduces the image part, keeps the rest bit for bit, and restores the image
    part of the output. A mask over the sequence (a key mask ``(B, S)`` or 4-D) is cut to the kept tokens
    (:func:`cut_sequence_mask`), and so is a rotary table given per batch element and token, ``(B, S, ...)``, in
    the attention argument ``rotary``: each kept token takes its own row (a merged group its destination's), so
    the attention rotates the reduced sequence itself. A call laid out otherwise is left alone."""

    def __init__(self, state: BlockState, letter: str, rotary: str | None = None) -> None:
        super().__init__(state, letter)
        self.rotary = rotary

    def pre_forward(self, module, *args, **kwargs):
        m, rest = self.state.matching, self.state.text_len
        self.state.reduced = None
        x = argument(args, kwargs, 0, "hidden_states")
        if m is None or rest is None or x is None or x.shape[:2] != (m.batch, m.num_tokens + rest):
            return args, kwargs
        rows, values = kept_positions(m, 0, rest), {}
        mask = argument(args, kwargs, 2, "attention_mask")
        if mask is not None:
            values[2] = ("attention_mask", cut_sequence_mask(mask, rows, x.shape[1]))
            if values[2][1] is None:
                return args, kwargs
        table = argument(args, kwargs, 3, self.rotary) if self.rotary is not None else None
        if table is not None:
            if table.ndim < 3 or table.shape[:2] != x.shape[:2]:
                return args, kwargs
            values[3] = (self.rotary, gather_positions(table, rows))
        image = reduce_tokens(x[:, : m.num_tokens], m, self.mode)
        values[0] = ("hidden_states", torch.cat([image, x[:, m.num_tokens :]], dim=1))
        self.state.reduced = m
        return with_arguments(args, kwargs, values)

    def post_forward(self, module, output):
        m, self.state.reduced = self.state.reduced, None
        if m is None:
            return output
        kept = m.num_tokens - m.r
        return torch.cat([restore_tokens(output[:, :kept], m), output[:, kept:]], dim=1)


def gather_positions(table: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """Rows ``rows`` ``(B, S')`` of each batch element of a per-token table ``(B, S, ...)``: ``(B, S', ...)``."""
    B, S = table.shape[:2]
    flat = (rows.to(table.device) + torch.arange(B, device=table.device).unsqueeze(1) * S).reshape(-1)
    return table.reshape(B * S, *table.shape[2:]).index_select(0, flat).view(B, rows.shape[1], *table.shape[2:])


class RotaryHook(ModelHook):
    """On ``norm_q`` / ``norm_k`` (``text=False``) or ``norm_added_q`` / ``norm_added_k`` (``text=True``) of a
    patched attention: while the attention hook holds a rotary table, rotates the normalized queries or keys
    ``(B, S, H, D)`` as the processor would have rotated them (``layout.rotate``: diffusers' own function).

    The image table holds a row per batch element and token (the kept tokens differ per batch element), which
    diffusers' functions do not take; so the batch is folded into its sequence dimension, ``(1, B * S, H, D)``,
    where the table fits. Rotary embedding is elementwise per token, so rotating text and image apart, before
    the processor concatenates them, gives the bits of rotating the concatenation."""

    def __init__(self, state: BlockState, text: bool, layout: RotaryLayout | None = None) -> None:
        super().__init__()
        self.state, self.text = state, text
        self.layout = RotaryLayout() if layout is None else layout

    def post_forward(self, module, output):
        emb = self.state.rotary_text if self.text else self.state.rotary
        if emb is None:
            return output
        if self.text:
            return self.layout.rotate(output, emb)
        B, S = output.shape[:2]
        return self.layout.rotate(output.reshape(1, B * S, *output.shape[2:]), emb).view(output.shape)


class KeyValueHook(_LetterHook):
    """Runs an attention with every token as a query and the reduced tokens as its keys and values, through the
    attention processor's own ``encoder_hidden_states``, with proportional attention's ``log(size)`` bias as an
    additive ``attention_mask`` of shape ``(B, 1, N - r)`` (broadcast over heads and queries by diffusers).

    The attention must take its keys and values from ``encoder_hidden_states`` unchanged (no ``norm_cross``,
    ``group_norm`` or ``spatial_norm``; :func:`check_key_value_attention`); with fused projections it needs a
    ``to_kv`` (:class:`KeyValueProjection`). Calls that already have keys and values of their own or an
    attention mask are left alone, and so are calls through a perturbed-attention-guidance processor (PAG's
    identity processors split the batch and take neither keys nor a mask per branch): the layers PAG perturbs
    run unreduced during PAG calls, perturbed exactly as PAG defines."""

    def pre_forward(self, module, *args, **kwargs):
        m = self.state.matching
        x = argument(args, kwargs, 0, "hidden_states")
        if (
            m is None
            or argument(args, kwargs, 1, "encoder_hidden_states") is not None
            or argument(args, kwargs, 2, "attention_mask") is not None
            or x.shape[1] != m.num_tokens
            or x.shape[0] != m.batch
            or type(module.processor).__name__.startswith("PAG")
        ):
            return args, kwargs
        tokens = reduce_tokens(x, m, self.mode)
        bias = log_size_bias(m, _bias_dtype(module, x.dtype))
        return with_arguments(args, kwargs, {1: ("encoder_hidden_states", tokens), 2: ("attention_mask", bias)})


class KeyValueProjection:
    """``to_kv`` of a self-attention whose projections are fused: its keys and values side by side, from its own
    ``to_k`` and ``to_v`` (which diffusers' fusing keeps), for ``FusedAttnProcessor2_0``'s keys-and-values path
    that ``reduce="kv"`` takes. Not a module: it holds no weights of its own, so the state dict, devices and
    dtypes stay the attention's; installed by :mod:`tofu_sd.install` and removed with Token Fusion."""

    def __init__(self, attn: torch.nn.Module) -> None:
        self.attn = attn

    def __call__(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.attn.to_k(hidden_states), self.attn.to_v(hidden_states)], dim=-1)


def _bias_dtype(attn: torch.nn.Module, dtype: torch.dtype) -> torch.dtype:
    """The dtype of the logit bias: the tokens', except float32 for the processors that add the mask to upcast
    float32 scores (``get_attention_scores`` with ``upcast_attention``); scaled-dot-product attention takes a
    mask in the query's dtype."""
    if getattr(attn, "upcast_attention", False) and isinstance(attn.processor, (AttnProcessor, SlicedAttnProcessor)):
        return torch.float32
    return dtype


def check_key_value_attention(name: str, attn: torch.nn.Module) -> None:
    """Raise ``ValueError`` if ``attn`` would not compute its keys and values from ``encoder_hidden_states`` as
    from its own input (``reduce="kv"`` passes the reduced tokens there)."""
    extra = [part for part in ("norm_cross", "group_norm", "spatial_norm") if getattr(attn, part, None) is not None]
    if extra:
        raise ValueError(
            f"reduce='kv' cannot patch {name}: its {', '.join(extra)} would treat keys and values passed as "
            "encoder_hidden_states unlike its own input; use reduce='tokens'."
        )
