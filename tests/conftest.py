import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never download
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


@pytest.fixture
def unet_sd15():
    from evaluation.tiny import tiny_unet

    return tiny_unet("sd15")


@pytest.fixture(scope="session")
def tiny_pipe_factory():
    from evaluation.tiny import tiny_pipeline

    return tiny_pipeline
