"""The classifier FD: the FID formula on the shipped shape classifier's penultimate features, against a closed form,
on the real classifier's layer, and in `tofu-sd evaluate`'s report."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

from evaluation.cli import main
from evaluation.evaluate import load_image
from evaluation.metrics import ClassifierFrechetDistance, frechet_distance, load_prompt_classifier
from evaluation.shapes.data import draw_dataset


class LinearFeatures(torch.nn.Module):
    """A stand-in classifier: its penultimate features are ``M @ rgb + b`` of the top-left pixel, then a head."""

    def __init__(self, m, b, classes=5):
        super().__init__()
        self.m, self.b = torch.as_tensor(m, dtype=torch.float64), torch.as_tensor(b, dtype=torch.float64)
        self.head = torch.nn.Linear(len(b), classes, dtype=torch.float64)
        torch.nn.init.normal_(self.head.weight, generator=torch.Generator().manual_seed(0))

    def forward(self, images):
        return self.head(images[:, :, 0, 0].double() @ self.m.T + self.b)


def gaussian_pixels(mean, cov, n, seed):
    """``n`` RGB values drawn from N(mean, cov), then moved so that their sample mean and sample covariance
    (n - 1 in the denominator) are exactly ``mean`` and ``cov``."""
    z = np.random.default_rng(seed).standard_normal((n, 3))
    z -= z.mean(0)
    z = z @ np.linalg.inv(np.linalg.cholesky(np.cov(z, rowvar=False))).T  # sample covariance exactly I
    return mean + z @ np.linalg.cholesky(cov).T


def as_images(pixels, seed):
    """Images of 4x4 pixels whose top-left pixel holds ``pixels``; the others are noise the features ignore."""
    g = torch.Generator().manual_seed(seed)
    images = torch.rand(len(pixels), 3, 4, 4, generator=g, dtype=torch.float64)
    images[:, :, 0, 0] = torch.from_numpy(pixels)
    assert images.min() >= 0 and images.max() <= 1
    return images


def sqrtm_psd(a):
    w, v = np.linalg.eigh(a)
    return (v * np.sqrt(np.clip(w, 0, None))) @ v.T


def closed_form(mu1, s1, mu2, s2):
    """||mu1 - mu2||^2 + tr(S1 + S2 - 2 (S1 S2)^(1/2)), with tr (S1 S2)^(1/2) = tr (S1^(1/2) S2 S1^(1/2))^(1/2)."""
    root = sqrtm_psd(s1)
    return float(np.sum((mu1 - mu2) ** 2) + np.trace(s1) + np.trace(s2) - 2 * np.trace(sqrtm_psd(root @ s2 @ root)))


def test_classifier_fd_matches_the_closed_form_of_two_gaussians():
    m = np.array([[1.0, 0.5, 0.0], [0.0, 2.0, -1.0], [0.3, 0.0, 1.5]])
    b = np.array([0.1, -0.2, 0.3])
    mean1, mean2 = np.array([0.5, 0.45, 0.55]), np.array([0.4, 0.5, 0.6])
    cov1 = np.array([[0.010, 0.004, 0.000], [0.004, 0.008, 0.002], [0.000, 0.002, 0.006]])
    cov2 = np.array([[0.006, -0.002, 0.001], [-0.002, 0.009, 0.000], [0.001, 0.000, 0.012]])  # not commuting with cov1
    real, fake = as_images(gaussian_pixels(mean1, cov1, 300, 1), 2), as_images(gaussian_pixels(mean2, cov2, 200, 3), 4)
    metric = ClassifierFrechetDistance(LinearFeatures(m, b))
    for start, stop in ((0, 100), (100, 250), (250, 300)):  # in batches of different sizes
        metric.update(real[start:stop], real=True)
    metric.update(fake[:70], real=False), metric.update(fake[70:], real=False)
    # The features are M x + b of Gaussians: means M mu + b, covariances M S M^T.
    expected = closed_form(m @ mean1 + b, m @ cov1 @ m.T, m @ mean2 + b, m @ cov2 @ m.T)
    assert expected > 0.01
    assert metric.compute() == pytest.approx(expected, rel=1e-7)

    # The generated set can be replaced, keeping the reference's features: a set against itself is 0.
    metric.reset(real=False)
    metric.update(real, real=False)
    assert metric.compute() == pytest.approx(0.0, abs=1e-9)


def test_the_shipped_classifiers_penultimate_layer_is_used():
    classifier = load_prompt_classifier()
    x = torch.from_numpy(draw_dataset(0, 8)[0]).permute(0, 3, 1, 2).float() / 255
    y = (x + 0.1 * torch.randn(x.shape, generator=torch.Generator().manual_seed(0))).clamp(0, 1)
    pooled = []  # the last conv stage's output, averaged over the image: what the linear head reads
    handle = classifier.features.register_forward_hook(lambda module, args, out: pooled.append(out.mean(dim=(2, 3))))
    try:
        metric = ClassifierFrechetDistance(classifier)
        metric.update(x, real=True), metric.update(y, real=False)
    finally:
        handle.remove()
    features = [p.double().numpy() for p in pooled]
    assert features[0].shape == (8, 128)  # 128 features, not the 48 logits
    np.testing.assert_allclose(metric.features[True][0], features[0], rtol=1e-6)
    np.testing.assert_allclose(metric.features[False][0], features[1], rtol=1e-6)
    assert metric.compute() == pytest.approx(frechet_distance(*features), rel=1e-6)
    assert metric.compute() > 0.1

    same = ClassifierFrechetDistance(classifier)
    same.update(x, real=True), same.update(x, real=False)
    assert same.compute() == pytest.approx(0.0, abs=1e-6)


@pytest.mark.parametrize(
    "bad,match",
    [(torch.full((2, 3, 8, 8), 1.5), r"values in \[0, 1\]"), (torch.zeros(2, 3, 8, 8, dtype=torch.uint8), "float images")],
)
def test_inputs_outside_zero_one_are_refused(bad, match):
    with pytest.raises(ValueError, match=match):
        ClassifierFrechetDistance(LinearFeatures(np.eye(3), np.zeros(3))).update(bad, real=True)


# --- in the report -----------------------------------------------------------------------------------------------


def shapes_run(folder, prompts="shapes", n=4):
    """A run directory of the built-in model's prompts: `full` shows shape pictures, `tofu` and `tome` noisy copies."""
    pictures, labels = draw_dataset(0, n)
    rng = np.random.default_rng(0)
    noisy = {m: np.clip(pictures + rng.normal(0, sd, pictures.shape), 0, 255).astype(np.uint8) for m, sd in (("tofu", 25), ("tome", 50))}
    for method, images in (("full", pictures), *noisy.items()):
        (folder / method).mkdir(parents=True)
        for k, (image, label) in enumerate(zip(images, labels)):
            Image.fromarray(image).save(folder / method / f"{label:04d}_{k}.png")
    methods = {m: {"seconds": 1.0, "images_timed": n, "peak_mem_bytes": 2**30} for m in ("full", "tofu", "tome")}
    config = {"model": "tiny", "prompts": prompts, "steps": 2, "reduction": {"ratio": 0.5}}
    (folder / "manifest.json").write_text(json.dumps({"config": config, "methods": methods, "per_class": 1}))
    return folder, [f"{label:04d}_{k}.png" for k, label in enumerate(labels)]


def test_evaluate_reports_fd_classifier(tmp_path, empty_torch_home):
    run, names = shapes_run(tmp_path / "run")
    assert main(["evaluate", str(run), "--batch-size", "3"]) == 0
    report = json.loads((run / "report.json").read_text())
    # Independently: the classifier's pooled conv features of the PNGs as read back, and pytorch-fid's formula.
    classifier = load_prompt_classifier()
    with torch.no_grad():
        features = {m: classifier.features(torch.stack([load_image(run / m / n) for n in names]) * 2 - 1).mean(dim=(2, 3))
                    for m in ("full", "tofu", "tome")}  # fmt: skip
    for method in ("tofu", "tome"):
        expected = frechet_distance(features["full"].double().numpy(), features[method].double().numpy())
        assert report["methods"][method]["fd_classifier"] == pytest.approx(expected, rel=1e-5) and expected > 0.1
    assert report["methods"]["full"]["fd_classifier"] == 0.0 and "fd_classifier" not in report["unavailable"]
    assert "fd_classifier" in report["pareto"]["metrics"]
    assert all("fd_classifier" not in scores for scores in report["per_pair"].values())  # set-level: not per pair
    md = (run / "report.md").read_text()
    assert "Classifier FD ↓" in md and f"| {report['methods']['tofu']['fd_classifier']:.3f} |" in md
    assert "not in the paired test" in md


def test_fd_classifier_is_null_with_a_reason_outside_the_shapes_prompts(tmp_path, empty_torch_home):
    run, _ = shapes_run(tmp_path / "run", prompts="imagenet", n=2)
    assert main(["evaluate", str(run)]) == 0
    report = json.loads((run / "report.json").read_text())
    assert report["methods"]["tofu"]["fd_classifier"] is None and report["methods"]["full"]["fd_classifier"] is None
    assert "'shapes' prompt set" in report["unavailable"]["fd_classifier"]
    assert "fd_classifier" not in report["pareto"]["metrics"]
    assert "**Classifier FD unavailable**" in (run / "report.md").read_text()
