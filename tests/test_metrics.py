"""FID, LPIPS and MS-SSIM: closed-form cases, identity and perturbation, input ranges, weight loading."""

import numpy as np
import pytest
import torch
from torchmetrics.functional.image import multiscale_structural_similarity_index_measure

from evaluation.errors import MetricUnavailable
from evaluation.metrics import (
    FrechetInceptionDistance,
    PairwiseLPIPS,
    PairwiseMSSSIM,
    frechet_distance,
    load_inception,
    load_lpips,
    ms_ssim_scales,
)


def images(n=6, size=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    base = torch.rand(n, 3, 8, 8, generator=g)
    return torch.nn.functional.interpolate(base, size=size, mode="bilinear", align_corners=False).clamp(0, 1)


def perturbed(x, amount=0.15, seed=1):
    g = torch.Generator().manual_seed(seed)
    return (x + amount * torch.randn(x.shape, generator=g)).clamp(0, 1)


def test_frechet_distance_of_two_gaussians_matches_closed_form():
    rng = np.random.default_rng(0)
    mu1, mu2 = np.array([0.0, 1.0, -1.0]), np.array([0.5, 0.0, -1.0])
    s1, s2 = np.array([1.0, 2.0, 0.5]), np.array([2.0, 0.5, 0.5])  # diagonal covariances
    a = rng.normal(mu1, np.sqrt(s1), size=(200_000, 3))
    b = rng.normal(mu2, np.sqrt(s2), size=(200_000, 3))
    # ||mu1 - mu2||^2 + tr(S1 + S2 - 2 (S1 S2)^(1/2)), diagonal: sum (sqrt s1 - sqrt s2)^2
    expected = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(s1) - np.sqrt(s2)) ** 2)
    assert frechet_distance(a, b) == pytest.approx(expected, abs=0.03)
    assert frechet_distance(a, a) == pytest.approx(0.0, abs=1e-9)


def test_fid_lpips_msssim_identity_and_perturbation(torch_home):
    x, y = images(), perturbed(images())
    fid_same, fid_diff = FrechetInceptionDistance(load_inception()), FrechetInceptionDistance(load_inception())
    fid_same.update(x, real=True), fid_same.update(x, real=False)
    fid_diff.update(x, real=True), fid_diff.update(y, real=False)
    assert abs(fid_same.compute()) < 1e-3 and fid_diff.compute() > 1e-2

    lpips_model = load_lpips()
    same, diff = PairwiseLPIPS(lpips_model), PairwiseLPIPS(lpips_model)
    same.update(x, x), diff.update(y, x)
    assert same.compute()[0] == pytest.approx(0.0, abs=1e-6)
    mean, std, n = diff.compute()
    # One pair at a time through the lpips package itself (inputs in [-1, 1]): the per-pair values and their spread.
    alone = [lpips_model(2 * y[i : i + 1] - 1, 2 * x[i : i + 1] - 1).item() for i in range(6)]
    assert diff.per_pair() == pytest.approx(alone, rel=1e-5)
    assert mean == pytest.approx(np.mean(alone), rel=1e-5) and std == pytest.approx(np.std(alone), rel=1e-4)
    assert mean > 1e-3 and std > 0 and n == 6

    same, diff = PairwiseMSSSIM(), PairwiseMSSSIM()
    same.update(x, x), diff.update(y, x)
    assert same.compute()[0] == pytest.approx(1.0, abs=1e-9)
    assert diff.compute()[0] < 0.99
    worse = PairwiseMSSSIM()
    worse.update(perturbed(x, 0.4, seed=2), x)
    assert worse.compute()[0] < diff.compute()[0]


def test_ms_ssim_is_torchmetrics_standard_at_full_size():
    x = images(2, size=192)
    y = perturbed(x)
    metric = PairwiseMSSSIM()
    metric.update(y, x)
    assert metric.scales == 5
    expected = multiscale_structural_similarity_index_measure(y.double(), x.double(), data_range=1.0, reduction="none")
    assert metric.compute()[0] == pytest.approx(expected.mean().item(), rel=1e-9)
    assert [ms_ssim_scales(s, s) for s in (512, 161, 160, 64, 32, 11)] == [5, 5, 4, 3, 2, 1]
    with pytest.raises(ValueError, match="too small"):
        ms_ssim_scales(10, 64)


@pytest.mark.parametrize(
    "bad,match",
    [
        (torch.zeros(2, 3, 8, 8, dtype=torch.uint8), "float images"),
        (torch.full((2, 3, 8, 8), 1.5), r"values in \[0, 1\]"),
        (torch.zeros(2, 1, 8, 8), r"shape \(N, 3, H, W\)"),
    ],
)
def test_inputs_outside_the_documented_range_are_refused(bad, match):
    with pytest.raises(ValueError, match=match):
        PairwiseMSSSIM().update(bad, bad)


def test_missing_weights_name_file_url_folder_and_option(empty_torch_home):
    with pytest.raises(MetricUnavailable) as fid_error:
        load_inception()
    message = str(fid_error.value)
    assert "pt_inception-2015-12-05-6726825d.pth" in message and "github.com/mseitzer/pytorch-fid" in message
    assert str(empty_torch_home / "hub" / "checkpoints") in message and "--fid-weights" in message
    with pytest.raises(MetricUnavailable, match="alexnet-owt-7be5be79.pth.*download.pytorch.org.*--lpips-weights"):
        load_lpips()


def test_weights_from_an_explicit_path(empty_torch_home, metric_weights_dir, monkeypatch):
    checkpoints = metric_weights_dir / "hub" / "checkpoints"
    # The models carry the files' values (not, say, freshly initialized ones).
    inception_file = torch.load(checkpoints / "pt_inception-2015-12-05-6726825d.pth", weights_only=True)
    inception = load_inception(checkpoints / "pt_inception-2015-12-05-6726825d.pth")
    assert torch.equal(inception.blocks[0][0].conv.weight, inception_file["Conv2d_1a_3x3.conv.weight"])
    alexnet_file = torch.load(checkpoints / "alexnet-owt-7be5be79.pth", weights_only=True)
    first_conv = load_lpips(checkpoints / "alexnet-owt-7be5be79.pth").net.slice1[0].weight
    assert torch.equal(first_conv, alexnet_file["features.0.weight"])
    assert torch.hub.get_dir() == str(empty_torch_home / "hub")  # the hub folder is restored
    monkeypatch.setenv("TORCH_HOME", str(metric_weights_dir))  # ... and not pinned: TORCH_HOME still counts
    assert torch.hub.get_dir() == str(metric_weights_dir / "hub")
    with pytest.raises(MetricUnavailable, match="does not exist"):
        load_inception(checkpoints / "missing.pth")
