"""Token Fusion (ToFu) for diffusion models in diffusers: pruned and MLERP token merging around attention.

```python
import tofu_sd
tofu_sd.apply(pipe, ratio=0.5)   # a pipeline with a `unet` or `transformer` of a supported family, or the model
...
tofu_sd.remove(pipe)
```

Options: :class:`TokenFusionConfig`. Model families: :mod:`tofu_sd.families` (:func:`register_family` adds one).
"""

from .api import (
    PatchedBlock,
    TokenFusionState,
    apply,
    apply_token_fusion,
    get_state,
    patched_blocks,
    remove,
    remove_token_fusion,
    reset_steps,
)
from .config import TokenFusionConfig
from .families import Family, Part, Site, register_family

__version__ = "0.1.0"

__all__ = [
    "Family",
    "Part",
    "PatchedBlock",
    "Site",
    "TokenFusionConfig",
    "TokenFusionState",
    "apply",
    "apply_token_fusion",
    "get_state",
    "patched_blocks",
    "register_family",
    "remove",
    "remove_token_fusion",
    "reset_steps",
]
