"""Token Fusion (ToFu) for Stable Diffusion in diffusers: pruned and MLERP token merging around self-attention.

```python
import tofu_sd
tofu_sd.apply(pipe, ratio=0.5)   # pipe: a diffusers pipeline with a `unet`, or the U-Net itself
...
tofu_sd.remove(pipe)
```
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
)
from .config import TokenFusionConfig

__version__ = "0.1.0"

__all__ = [
    "PatchedBlock",
    "TokenFusionConfig",
    "TokenFusionState",
    "apply",
    "apply_token_fusion",
    "get_state",
    "patched_blocks",
    "remove",
    "remove_token_fusion",
]
