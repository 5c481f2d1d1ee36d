import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never download
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


@pytest.fixture
def unet_sd15():
    from evaluation.tiny_random import tiny_unet

    return tiny_unet("sd15")


@pytest.fixture(scope="session")
def tiny_pipe_factory():
    from evaluation.tiny_random import tiny_pipeline

    return tiny_pipeline


def _write_metric_weights(checkpoints):
    """Weight files of pytorch-fid's Inception and torchvision's AlexNet with random values, where the libraries look."""
    import sys

    import pytorch_fid.inception as fid_inception
    import torchvision

    checkpoints.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    torch.save(torchvision.models.alexnet(weights=None).state_dict(), checkpoints / "alexnet-owt-7be5be79.pth")
    # Build the FID Inception exactly as pytorch-fid does, and take its (random) state where it would load one.
    original = fid_inception.load_state_dict_from_url
    fid_inception.load_state_dict_from_url = lambda *a, **k: sys._getframe(1).f_locals["inception"].state_dict()
    try:
        inception = fid_inception.fid_inception_v3()
    finally:
        fid_inception.load_state_dict_from_url = original
    for module in inception.modules():  # variance-preserving random values, so features stay informative
        if isinstance(module, torch.nn.Conv2d):
            torch.nn.init.kaiming_normal_(module.weight, nonlinearity="relu")
    state = inception.state_dict()
    torch.save(state, checkpoints / "pt_inception-2015-12-05-6726825d.pth")


@pytest.fixture(scope="session")
def metric_weights_dir(tmp_path_factory):
    """A torch home whose hub cache holds both metric weight files."""
    home = tmp_path_factory.mktemp("torch_home")
    _write_metric_weights(home / "hub" / "checkpoints")
    return home


@pytest.fixture
def torch_home(metric_weights_dir, monkeypatch):
    """TORCH_HOME with the metric weights: the libraries' real loading code runs, offline."""
    monkeypatch.setenv("TORCH_HOME", str(metric_weights_dir))
    return metric_weights_dir


@pytest.fixture
def empty_torch_home(tmp_path, monkeypatch):
    """TORCH_HOME with no weights, and downloads that fail at once as they do offline."""
    import urllib.error

    def refuse(url, *args, **kwargs):
        raise urllib.error.URLError("no network in tests")

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    monkeypatch.setattr(torch.hub, "download_url_to_file", refuse)
    return tmp_path / "torch_home"


@pytest.fixture
def one_thread():
    """One torch thread for the test (tiny matrices are fastest on one; torchrun's processes run with one)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def matches(monkeypatch):
    """Every matching the hooks compute, in call order (a spy on ``tofu_sd.state.match``)."""
    from tofu_sd import state

    seen = []
    real_match = state.match
    monkeypatch.setattr(state, "match", lambda *a, **kw: seen.append(real_match(*a, **kw)) or seen[-1])
    return seen
