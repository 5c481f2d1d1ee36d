"""FID (pytorch-fid's Inception), LPIPS (lpips, AlexNet), MS-SSIM (torchmetrics), and, with the built-in model's
shape classifier, prompt accuracy and the Fréchet distance of its features, with an update/compute split.

Every ``update`` takes float image batches of shape ``(N, 3, H, W)`` with values in ``[0, 1]``; anything else is a
``ValueError``. Weights load the way the libraries load them (the torch hub cache, downloaded on first use); a
local file can be given instead, and a missing one is a :class:`MetricUnavailable` naming file, URL and folder.
"""

from __future__ import annotations

import contextlib
import math
import tempfile
from pathlib import Path

import numpy as np
import torch

from .errors import MetricUnavailable

FID_WEIGHTS = "pt_inception-2015-12-05-6726825d.pth"
FID_URL = f"https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/{FID_WEIGHTS}"
ALEXNET_WEIGHTS = "alexnet-owt-7be5be79.pth"
ALEXNET_URL = f"https://download.pytorch.org/models/{ALEXNET_WEIGHTS}"
MS_SSIM_BETAS = (0.0448, 0.2856, 0.3001, 0.2363, 0.1333)  # Wang et al. 2003


def check_images(images: torch.Tensor) -> torch.Tensor:
    """Validate a float ``(N, 3, H, W)`` batch in ``[0, 1]``."""
    if not isinstance(images, torch.Tensor) or images.ndim != 4 or images.shape[1] != 3:
        shape = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
        raise ValueError(f"expected images of shape (N, 3, H, W), got {shape}")
    if not images.is_floating_point():
        raise ValueError(f"expected float images in [0, 1], got dtype {images.dtype}; divide uint8 images by 255")
    if images.numel() and (images.min() < 0 or images.max() > 1):
        raise ValueError(
            f"expected values in [0, 1], got [{images.min().item():.3g}, {images.max().item():.3g}]"
        )
    return images


@contextlib.contextmanager
def _hub_file(weights: str | Path | None, filename: str):
    """Make the torch hub cache hold ``weights`` under ``filename`` for the library's own loader, if given."""
    if weights is None:
        yield
        return
    weights = Path(weights).expanduser().resolve()
    if not weights.is_file():
        raise MetricUnavailable(f"weights file {weights} does not exist")
    # Restore torch.hub's own setting, not get_dir()'s value: set_dir(get_dir()) would pin the folder and make
    # torch.hub ignore later changes of TORCH_HOME in this process.
    previous = getattr(torch.hub, "_hub_dir", None)
    with tempfile.TemporaryDirectory(prefix="tofu_sd_hub_") as tmp:
        (Path(tmp) / "checkpoints").mkdir()
        (Path(tmp) / "checkpoints" / filename).symlink_to(weights)
        torch.hub.set_dir(tmp)
        try:
            yield
        finally:
            torch.hub._hub_dir = previous


def _unavailable(what: str, filename: str, url: str, option: str, error: Exception) -> MetricUnavailable:
    folder = Path(torch.hub.get_dir()) / "checkpoints"
    return MetricUnavailable(
        f"{what} weights {filename} are not in {folder} and could not be downloaded from {url} "
        f"({type(error).__name__}: {error}). Download that file into {folder}, or pass its path with {option}."
    )


def load_inception(weights: str | Path | None = None, device: str | torch.device = "cpu") -> torch.nn.Module:
    """pytorch-fid's FID Inception-v3 (pool3 features), from the hub cache or ``weights``."""
    from pytorch_fid.inception import InceptionV3

    try:
        with _hub_file(weights, FID_WEIGHTS):
            model = InceptionV3([InceptionV3.BLOCK_INDEX_BY_DIM[2048]])
    except MetricUnavailable:
        raise
    except Exception as error:  # a download attempt fails with URLError, OSError, ...
        raise _unavailable("FID Inception", FID_WEIGHTS, FID_URL, "--fid-weights", error) from error
    return model.eval().to(device)


def load_lpips(weights: str | Path | None = None, device: str | torch.device = "cpu") -> torch.nn.Module:
    """The lpips package's AlexNet LPIPS (v0.1); the AlexNet trunk comes from torchvision's hub file or ``weights``."""
    import warnings

    import lpips

    try:
        with _hub_file(weights, ALEXNET_WEIGHTS), warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*(pretrained|weight enum).*", category=UserWarning)
            model = lpips.LPIPS(net="alex", verbose=False)
    except MetricUnavailable:
        raise
    except Exception as error:
        raise _unavailable("LPIPS AlexNet", ALEXNET_WEIGHTS, ALEXNET_URL, "--lpips-weights", error) from error
    return model.eval().to(device)


def frechet_distance(features_a: np.ndarray, features_b: np.ndarray) -> float:
    """Fréchet distance between Gaussians fitted to two feature sets (rows are samples)."""
    from pytorch_fid.fid_score import calculate_frechet_distance

    for features in (features_a, features_b):
        if features.ndim != 2 or features.shape[0] < 2:
            raise ValueError(f"a Fréchet distance needs at least 2 feature vectors per set, got shape {features.shape}")
    mu_a, mu_b = features_a.mean(0), features_b.mean(0)
    sigma_a = np.atleast_2d(np.cov(features_a, rowvar=False))
    sigma_b = np.atleast_2d(np.cov(features_b, rowvar=False))
    return float(max(calculate_frechet_distance(mu_a, sigma_a, mu_b, sigma_b), 0.0))


class _FrechetDistance:
    """Fréchet distance between the features of two image sets: ``update(images, real=True/False)`` any number of
    times, then ``compute()``. Subclasses say which features (``_features``: one row per image)."""

    def __init__(self) -> None:
        self.features: dict[bool, list[np.ndarray]] = {True: [], False: []}

    @torch.no_grad()
    def update(self, images: torch.Tensor, real: bool) -> None:
        self.features[bool(real)].append(self._features(check_images(images)))

    def reset(self, real: bool = False) -> None:
        """Forget one set's features (by default the generated one's: the real set can be kept for the next)."""
        self.features[bool(real)] = []

    def compute(self) -> float:
        return frechet_distance(np.concatenate(self.features[True]), np.concatenate(self.features[False]))

    def _features(self, images: torch.Tensor) -> np.ndarray:
        raise NotImplementedError


class FrechetInceptionDistance(_FrechetDistance):
    """FID: the Fréchet distance of pytorch-fid's Inception pool3 features (2048 per image)."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model

    def _features(self, images):
        pooled = self.model(images.to(next(self.model.parameters()).device))[0].squeeze(-1).squeeze(-1)
        return pooled.double().cpu().numpy()


class ClassifierFrechetDistance(_FrechetDistance):
    """The FID formula on a classifier's penultimate features: the input of its last layer (``layer``, by default
    ``classifier.head``), taken with a forward pre-hook while the classifier runs on the images.

    For the built-in model's shape classifier that is the global average of its last conv stage, 128 values per
    image. An offline distribution-level number: how far a method's images are from the reference's, as the
    classifier sees them. With fewer images than features the covariances are singular and the distance is biased
    upwards, so compare methods at the same number of images only.
    """

    def __init__(self, classifier: torch.nn.Module, layer: torch.nn.Module | None = None) -> None:
        super().__init__()
        self.classifier = classifier
        self.layer = classifier.head if layer is None else layer

    def _features(self, images):
        captured: list[torch.Tensor] = []
        handle = self.layer.register_forward_pre_hook(lambda module, args: captured.append(args[0]))
        try:
            self.classifier(images.to(next(self.classifier.parameters()).device))
        finally:
            handle.remove()
        if len(captured) != 1:
            raise RuntimeError(f"the classifier ran its last layer {len(captured)} times for one batch, expected once")
        return captured[0].flatten(1).double().cpu().numpy()


class _PairwiseMetric:
    """A per-pair score over same-seed image pairs; ``compute()`` gives ``(mean, std, n)``."""

    def __init__(self) -> None:
        self.values: list[torch.Tensor] = []

    def update(self, preds: torch.Tensor, target: torch.Tensor) -> None:
        check_images(preds), check_images(target)
        if preds.shape != target.shape:
            raise ValueError(f"image pairs differ in shape: {tuple(preds.shape)} vs {tuple(target.shape)}")
        self.values.append(self._score(preds, target).detach().double().cpu().reshape(-1))

    def per_pair(self) -> list[float]:
        """Every pair's score, in update order."""
        return torch.cat(self.values).tolist() if self.values else []

    def compute(self) -> tuple[float, float, int]:
        values = torch.cat(self.values) if self.values else torch.zeros(0, dtype=torch.float64)
        if not values.numel():
            raise ValueError("no image pairs were given")
        std = values.std(unbiased=False).item() if values.numel() > 1 else 0.0
        return values.mean().item(), std, values.numel()

    def _score(self, preds: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError


class PairwiseLPIPS(_PairwiseMetric):
    """LPIPS (AlexNet) per pair; lower is closer. Inputs in [0, 1] are mapped to LPIPS's [-1, 1]."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model

    @torch.no_grad()
    def _score(self, preds, target):
        device = next(self.model.parameters()).device
        return self.model(preds.to(device) * 2 - 1, target.to(device) * 2 - 1)


def ms_ssim_scales(height: int, width: int, kernel_size: int = 11) -> int:
    """How many of MS-SSIM's 5 scales fit an image: the coarsest must stay larger than the Gaussian kernel."""
    side = min(height, width)
    fits = [n for n in range(1, 6) if side / 2 ** (n - 1) > kernel_size - 1]
    if not fits:
        raise ValueError(f"images of {height}x{width} are too small for MS-SSIM with an {kernel_size}-pixel kernel")
    return max(fits)


class PairwiseMSSSIM(_PairwiseMetric):
    """MS-SSIM per pair (torchmetrics, data range 1); higher is closer.

    Images smaller than 161 pixels use the first scales that fit, with weights renormalized to sum 1; the
    number of scales used is ``scales`` (5 for Stable Diffusion's sizes).
    """

    def __init__(self) -> None:
        super().__init__()
        self.scales: int | None = None

    def _score(self, preds, target):
        from torchmetrics.functional.image import multiscale_structural_similarity_index_measure

        self.scales = ms_ssim_scales(*preds.shape[-2:])
        betas = MS_SSIM_BETAS
        if self.scales < len(MS_SSIM_BETAS):
            betas = tuple(b / math.fsum(betas[: self.scales]) for b in betas[: self.scales])
        return multiscale_structural_similarity_index_measure(
            preds.double(), target.double(), data_range=1.0, betas=betas, reduction="none"
        )


class PromptAccuracy:
    """Fraction of images that a classifier assigns to the class they were prompted with.

    ``update(images, labels)`` takes images in ``[0, 1]`` and their prompted class indices; ``compute()`` returns
    ``(accuracy, count)``. With the built-in model's shape classifier this is an offline fidelity number: does
    the picture still show the prompted colour and shape?
    """

    def __init__(self, classifier: torch.nn.Module) -> None:
        self.classifier = classifier
        self.correct = 0
        self.count = 0
        self.hits: list[int] = []  #: 1 or 0 per image, in update order

    @torch.no_grad()
    def update(self, images: torch.Tensor, labels: torch.Tensor | list[int]) -> None:
        images = check_images(images)
        labels = torch.as_tensor(labels, dtype=torch.int64)
        if labels.shape != (images.shape[0],):
            raise ValueError(f"expected one label per image ({images.shape[0]}), got shape {tuple(labels.shape)}")
        device = next(self.classifier.parameters()).device
        predicted = self.classifier(images.to(device)).argmax(dim=1).cpu()
        hits = (predicted == labels).long()
        self.hits += hits.tolist()
        self.correct += int(hits.sum())
        self.count += len(labels)

    def compute(self) -> tuple[float | None, int]:
        return (self.correct / self.count if self.count else None), self.count


def load_prompt_classifier(device: str | torch.device = "cpu") -> torch.nn.Module:
    """The built-in model's shape classifier; MetricUnavailable if its files are missing."""
    from .shapes import MODEL_DIR
    from .shapes.classifier import load_classifier

    try:
        return load_classifier(MODEL_DIR, device)
    except FileNotFoundError as error:
        raise MetricUnavailable(f"{error}; reinstall tofu-sd to get it back") from error
