"""GraphCut bin generation (docs/method.md §1–2): the API, the problem preparation shared by
single-process and distributed runs, the engines (C++, torch, Triton), the float64 reference
and the replay checker."""

from dqkernels.graphcut.api import (
    BACKENDS,
    METRICS,
    BinResult,
    graphcut_bins,
    load_bins,
)

__all__ = ["BACKENDS", "METRICS", "BinResult", "graphcut_bins", "load_bins"]
