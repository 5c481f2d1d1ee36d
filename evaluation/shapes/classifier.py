"""The built-in model's shape-and-colour classifier: a small CNN that names the class of a 64x64 picture.

It gives an offline quality number, prompt accuracy: the fraction of generated images that it assigns to the
class they were prompted with. Weights are shipped as safetensors next to the model (``classifier.safetensors``,
its architecture in ``classifier.json``).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn
from torch.nn import functional as F

WEIGHTS = "classifier.safetensors"
CONFIG = "classifier.json"


class ShapeClassifier(nn.Module):
    """Four conv-norm-ReLU stages with pooling, global average pooling, one linear layer.

    Input: ``(B, 3, H, W)`` RGB in ``[0, 1]``; any size is resized to ``image_size`` first. Output: logits over
    ``num_classes``.
    """

    def __init__(self, num_classes: int, width: int = 32, image_size: int = 64) -> None:
        super().__init__()
        self.config = {"num_classes": num_classes, "width": width, "image_size": image_size}
        self.image_size = image_size
        layers, channels = [], 3
        for out in (width, 2 * width, 4 * width, 4 * width):
            layers += [nn.Conv2d(channels, out, 3, padding=1), nn.GroupNorm(8, out), nn.ReLU(inplace=True), nn.MaxPool2d(2)]
            channels = out
        self.features = nn.Sequential(*layers)
        self.head = nn.Linear(channels, num_classes)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if images.shape[-2:] != (self.image_size, self.image_size):
            images = F.interpolate(images, size=(self.image_size,) * 2, mode="bilinear", antialias=True, align_corners=False)
        x = self.features(images * 2 - 1)
        return self.head(x.mean(dim=(2, 3)))

    def save(self, folder: str | Path) -> None:
        from safetensors.torch import save_file

        folder = Path(folder)
        save_file({k: v.contiguous() for k, v in self.state_dict().items()}, str(folder / WEIGHTS))
        (folder / CONFIG).write_text(json.dumps(self.config, indent=2) + "\n")


def load_classifier(folder: str | Path, device: torch.device | str = "cpu") -> ShapeClassifier:
    """The classifier saved in ``folder``, in eval mode; FileNotFoundError names the missing file."""
    from safetensors.torch import load_file

    folder = Path(folder)
    for name in (WEIGHTS, CONFIG):
        if not (folder / name).is_file():
            raise FileNotFoundError(f"{folder / name} is missing; the built-in model's classifier ships there")
    model = ShapeClassifier(**json.loads((folder / CONFIG).read_text()))
    model.load_state_dict(load_file(str(folder / WEIGHTS)))
    return model.to(device).eval().requires_grad_(False)
