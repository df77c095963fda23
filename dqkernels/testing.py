"""Public name of the replay checker (docs/method.md §2): ``dqkernels.testing.check_binning``.
The implementation lives in :mod:`dqkernels.graphcut.testing`."""

from dqkernels.graphcut.testing import ReplayReport, check_binning

__all__ = ["ReplayReport", "check_binning"]
