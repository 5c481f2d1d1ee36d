"""Model families, one adapter each (:class:`Family`), registered per model class (:func:`register_family`).

Built in: the U-Nets (:mod:`.unet`), SD3 / SD3.5 (:mod:`.sd3`), PixArt (:mod:`.pixart`) and FLUX.1 (:mod:`.flux`).
"""

from diffusers.models.transformers.pixart_transformer_2d import PixArtTransformer2DModel
from diffusers.models.transformers.transformer_flux import FluxTransformer2DModel
from diffusers.models.transformers.transformer_sd3 import SD3Transformer2DModel

from .base import Family, Part, Site
from .flux import FluxFamily
from .pixart import PixArtFamily
from .registry import family_of, register_family, supported
from .sd3 import SD3Family
from .unet import MODEL_CLASSES as UNET_CLASSES
from .unet import UNetFamily

_UNET = UNetFamily()
for _cls in UNET_CLASSES:
    register_family(_cls, _UNET)
register_family(SD3Transformer2DModel, SD3Family())
register_family(PixArtTransformer2DModel, PixArtFamily())
register_family(FluxTransformer2DModel, FluxFamily())

__all__ = ["Family", "Part", "Site", "family_of", "register_family", "supported"]
