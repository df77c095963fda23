"""Bin sampling (docs/method.md §3): how many samples every (bin, class) cell gives, and which."""

from dqkernels.sampling.rounding import controlled_rounding
from dqkernels.sampling.sample import ALLOCATIONS, SubsetResult, sample_bins

__all__ = ["ALLOCATIONS", "SubsetResult", "controlled_rounding", "sample_bins"]
