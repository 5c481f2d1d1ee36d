"""Model families, one adapter each (:class:`Family`), registered per model class (:func:`register_family`).

Built in: the U-Nets (:mod:`.unet`), SD3 / SD3.5 (:mod:`.sd3`), PixArt (:mod:`.pixart`), FLUX.1 (:mod:`.flux`),
FLUX.2 (:mod:`.flux2`, its double-stream blocks), Qwen-Image (:mod:`.qwenimage`), Sana (:mod:`.sana`) and Wan 2.1 /
2.2 video (:mod:`.wan`).
"""

from diffusers.models.transformers.pixart_transformer_2d import PixArtTransformer2DModel
from diffusers.models.transformers.sana_transformer import SanaTransformer2DModel
from diffusers.models.transformers.transformer_flux import FluxTransformer2DModel
from diffusers.models.transformers.transformer_flux2 import Flux2Transformer2DModel
from diffusers.models.transformers.transformer_qwenimage import QwenImageTransformer2DModel
from diffusers.models.transformers.transformer_sd3 import SD3Transformer2DModel
from diffusers.models.transformers.transformer_wan import WanTransformer3DModel

from .base import Family, Part, Site
from .flux import FluxFamily
from .flux2 import Flux2Family
from .pixart import PixArtFamily
from .qwenimage import QwenImageFamily
from .registry import family_of, register_family, supported
from .sana import SanaFamily
from .sd3 import SD3Family
from .unet import MODEL_CLASSES as UNET_CLASSES
from .unet import UNetFamily
from .wan import WanFamily

_UNET = UNetFamily()
for _cls in UNET_CLASSES:
    register_family(_cls, _UNET)
register_family(SD3Transformer2DModel, SD3Family())
register_family(PixArtTransformer2DModel, PixArtFamily())
register_family(FluxTransformer2DModel, FluxFamily())
register_family(Flux2Transformer2DModel, Flux2Family())
register_family(QwenImageTransformer2DModel, QwenImageFamily())
register_family(WanTransformer3DModel, WanFamily())
register_family(SanaTransformer2DModel, SanaFamily())

__all__ = ["Family", "Part", "Site", "family_of", "register_family", "supported"]
