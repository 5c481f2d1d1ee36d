"""Model families, one adapter each (:class:`Family`), registered per model class (:func:`register_family`).

Built in: the U-Nets (:mod:`.unet`), SD3 / SD3.5 (:mod:`.sd3`), PixArt (:mod:`.pixart`), FLUX.1 (:mod:`.flux`),
FLUX.2 (:mod:`.flux2`), Chroma (:mod:`.chroma`), Qwen-Image (:mod:`.qwenimage`), Sana (:mod:`.sana`), Z-Image
(:mod:`.zimage`) and Wan 2.1 / 2.2 video (:mod:`.wan`).
"""

import importlib

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

#: The families written on diffusers 0.42.1, whose model classes older releases may lack: (module of the model
#: class, its name, the adapter's module, its class). Each is registered when both import; its adapter refuses a
#: diffusers older than it was tested on (``Family.tested_diffusers``).
NEWER_FAMILIES = (
    ("diffusers.models.transformers.transformer_flux2", "Flux2Transformer2DModel", ".flux2", "Flux2Family"),
    ("diffusers.models.transformers.transformer_qwenimage", "QwenImageTransformer2DModel", ".qwenimage", "QwenImageFamily"),
    ("diffusers.models.transformers.transformer_wan", "WanTransformer3DModel", ".wan", "WanFamily"),
    ("diffusers.models.transformers.sana_transformer", "SanaTransformer2DModel", ".sana", "SanaFamily"),
    ("diffusers.models.transformers.transformer_chroma", "ChromaTransformer2DModel", ".chroma", "ChromaFamily"),
    ("diffusers.models.transformers.transformer_z_image", "ZImageTransformer2DModel", ".zimage", "ZImageFamily"),
)
for _where, _name, _adapter, _family in NEWER_FAMILIES:
    try:
        _model_class = getattr(importlib.import_module(_where), _name)
        _family_class = getattr(importlib.import_module(_adapter, __name__), _family)
    except (ImportError, AttributeError):  # this diffusers lacks the model class, or what its adapter imports
        continue
    register_family(_model_class, _family_class())

__all__ = ["Family", "Part", "Site", "family_of", "register_family", "supported"]
