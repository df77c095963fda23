"""dqkernels: Dataset Quantization (DQ) bin generation and sampling.

    result = dqkernels.graphcut_bins(features, bins=10)        # docs/method.md §1
    subset = dqkernels.sample_bins(result, ratio=0.1, seed=0)  # docs/method.md §3
"""

from dqkernels import testing
from dqkernels.core.validate import GradEmbedding
from dqkernels.core.version import __version__
from dqkernels.graphcut.api import BinResult, graphcut_bins, load_bins
from dqkernels.sampling import SubsetResult, sample_bins

__all__ = [
    "BinResult",
    "GradEmbedding",
    "SubsetResult",
    "graphcut_bins",
    "load_bins",
    "sample_bins",
    "testing",
    "__version__",
]
