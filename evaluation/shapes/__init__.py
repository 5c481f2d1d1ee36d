"""The built-in offline model: a small Stable Diffusion trained here on procedural pictures of coloured shapes.

``MODEL_DIR`` holds it as a diffusers folder (``StableDiffusionPipeline.from_pretrained(MODEL_DIR)``) plus the
shape classifier behind the report's prompt accuracy. :mod:`.data` draws the pictures, :mod:`.train` trains
everything, :mod:`.classifier` is the classifier.
"""

from pathlib import Path

MODEL_DIR = Path(__file__).resolve().with_name("model")
MAX_BYTES = 40 * 10**6  #: the repository's limit on a shipped model folder
