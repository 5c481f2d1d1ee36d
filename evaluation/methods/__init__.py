"""The compared methods, one registry for ``tofu-sd generate`` and ``tofu-sd bench``.

- :mod:`.registry`: the entries (``full``, ``tome`` and its ``+mlp`` variants, ``tofu`` and its variants
  ``tofu-P``/``-A``/``-M``, ``tofu-local``, ``tofu-kv`` and the ``+ff``/``+attn2`` ones, the peers ``todo``,
  ``catome`` and ``deepcache`` (alone and around tofu), diffusers' step caches on diffusion transformers
  (``fbcache``, ``taylorseer``, ``taylorseer-lite``, ``magcache``, ``pab``, ``fastercache``, alone and
  ``<cache>+tofu``), and the ``oracle`` bound); :mod:`.base`: what an entry is.
- :mod:`.names`: the ``<method>@<value>`` names and ``--ratios`` sweeps.
- :mod:`.applied`: a name's parameters and its patch (:func:`method_params`, :func:`method_applied`).
- One module per method family: :mod:`.tofu` (Token Fusion and ToMe), :mod:`.todo` (the ToDo peer),
  :mod:`.catome` (the CA-ToMe adapter), :mod:`.deepcache` (the DeepCache adapter), :mod:`.caches` (diffusers'
  step caches), :mod:`.oracle` (and
  :mod:`.oracle_dit`, on diffusion transformers; :mod:`.strided`, the strided subset both use).
"""

from .applied import method_applied, method_params
from .base import Method, MethodOptions
from .catome import CATOME_BARE_STEPS, CATOME_CACHE, CATOME_INSTALL, CATOME_THRESHOLD, catome_applied
from .names import check_name, expand_ratios, method_of, parse_methods, parse_name, ratios_of, split_name, variant_name
from .registry import METHODS, REFERENCE, REGISTRY, get_method
from .tofu import default_letters, tome_max_downsample

__all__ = [
    "CATOME_BARE_STEPS", "CATOME_CACHE", "CATOME_INSTALL", "CATOME_THRESHOLD", "METHODS", "REFERENCE", "REGISTRY", "Method",
    "MethodOptions",
    "catome_applied", "check_name", "default_letters", "expand_ratios", "get_method", "method_applied", "method_params",
    "method_of", "parse_methods", "parse_name", "ratios_of", "split_name", "tome_max_downsample", "variant_name",
]  # fmt: skip
