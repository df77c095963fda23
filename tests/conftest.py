import secrets

import numpy as np
import pytest


@pytest.fixture
def rng():
    """A fresh generator per test; the seed is printed so a failure can be replayed."""
    seed = secrets.randbits(32)
    print(f"rng seed = {seed}")
    return np.random.default_rng(seed)


def pytest_collection_modifyitems(config, items):
    try:
        import torch

        has_gpu = torch.cuda.is_available()
    except ImportError:
        has_gpu = False
    if has_gpu:
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
