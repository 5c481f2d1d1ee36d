"""Functional-linearity analysis (Token Fusion paper, Sec. 3.1, Eq. 8, Fig. 3) that proposes a ToFu schedule.

ToFu prunes in blocks whose response to interpolated inputs is far from linear and merges (MLERP) where it is
close to linear. The paper measures this for ViT MLPs and leaves the switch point of other architectures to
tuning. :func:`analyze` measures it on a Stable Diffusion pipeline while it generates from real prompts:

1. at every block :func:`tofu_sd.apply` would patch (every transformer block with ``all_blocks``), the token
   pairs ``(X1, X2)`` the reduction would pair: bipartite soft matching on the block's input, with the same
   partition (cells, random destinations and their seed stream) and ``r = int(N * ratio)``;
2. for each pair, FL of Eq. 8 along the straight segment between the two tokens, as they enter

   - ``self_attention``: the block's ``attn1``, the interpolated token as the *query*; keys and values are the
     block's real, full ``attn1`` input (all N tokens of that call, fixed; see :func:`query_attention`);
   - ``feed_forward``: the block's ``ff`` (token-wise), between the two tokens' real ``ff`` inputs, which is
     the function of the paper's Fig. 3;

3. statistics per block and function, overall and per timestep group, and a proposed schedule: ``P`` where
   the decision function's mean FL is below ``threshold``, ``M`` otherwise.

On a diffusion transformer (SD3 / SD3.5, PixArt, Flux; :mod:`tofu_sd.families`) the same is measured at the blocks
``tofu_sd.apply`` patches (``reduction.blocks``, by index in forward order; every block with ``all_blocks``),
the pairs from tofu_sd's own ``MatchingHook`` on the block's image tokens, and

- ``self_attention``: each attention the block reduces around (SD3's joint ``attn``, pooled with SD3.5's
  ``attn2`` in its dual-attention blocks; PixArt's ``attn1``; Flux's ``attn``), the interpolated image token
  as the query (``to_q``, ``norm_q``), keys and values from the call's real image *and text* tokens, fixed
  (:func:`~evaluation.linearity.joint_query_attention`; PixArt, whose text is cross-attention, as on a U-Net).
  Flux's rotary positions: the interpolated token takes the pair's *destination*'s, as a merged group does in
  ``tofu_sd`` (so ``f(X2)`` is the destination's real output, and the path is along features only); Qwen-Image's
  ``attn`` and Wan's ``attn1`` likewise, as their own processors compute them (:mod:`.dit_families`), and
  Chroma's, FLUX.2's, Z-Image's and Sana's (:mod:`.dit_families_more`; Sana's convolutional feed-forward is not
  measured);
- ``feed_forward``: the block's ``ff`` on the image tokens (Qwen-Image's ``img_mlp``, Wan's ``ffn``; Flux's single-stream blocks: ``act_mlp(proj_mlp(.))``
  on the image part of their ``[text, image]`` sequence);

and the fallback of unmeasured blocks is :meth:`tofu_sd.Family.default_schedule`.

The FL maths is in small pure functions in :mod:`evaluation.linearity`, tested on closed forms; the plot is
:mod:`evaluation.linearity_plot`. This package: :mod:`.config` (the options), :mod:`.probe` (a block's probe: its
pairs and FL values), :mod:`.unet` and :mod:`.dit` (the hooks and blocks of each kind of model),
:mod:`.measurement` (what both share: the prompts denoised under the hooks, ``fl.json``'s content) and
:mod:`.command` (:func:`analyze`, :func:`measure`, :func:`format_summary`).
"""

from .command import analyze, format_summary, measure
from .config import AnalyzeConfig

from .probe import matched_pairs
from .unet import analysis_sites

__all__ = ["AnalyzeConfig", "analysis_sites", "analyze", "format_summary", "matched_pairs", "measure"]
