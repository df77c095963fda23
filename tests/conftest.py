import os
import secrets

import numpy as np
import pytest
from hypothesis import HealthCheck, settings

# Property tests: a fixed, reproducible sample in CI (DQK_HYPOTHESIS=explore draws fresh examples).
settings.register_profile(
    "ci", derandomize=True, max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)
settings.register_profile(
    "explore", max_examples=int(os.environ.get("DQK_HYPOTHESIS_EXAMPLES", "1000")), deadline=None
)
settings.load_profile(os.environ.get("DQK_HYPOTHESIS", "ci"))

try:
    import torch

    HAS_GPU = torch.cuda.is_available()
except ImportError:
    HAS_GPU = False
if not HAS_GPU:
    # Triton kernels run through the interpreter on CPU tensors (read when a kernel is defined).
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture
def rng():
    """A fresh generator per test; the seed is printed so a failure can be replayed."""
    seed = secrets.randbits(32)
    print(f"rng seed = {seed}")
    return np.random.default_rng(seed)


def pytest_collection_modifyitems(config, items):
    if HAS_GPU:
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
