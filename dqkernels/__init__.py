"""dqkernels: Dataset Quantization (DQ) bin generation and sampling.

    result = dqkernels.graphcut_bins(features, bins=10)        # SPEC §1
    subset = dqkernels.sample_bins(result, ratio=0.1, seed=0)  # SPEC §3
"""

__version__ = "0.1.0"

from dqkernels import testing
from dqkernels.core.validate import GradEmbedding
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
