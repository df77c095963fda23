"""The DQ pipeline as files: stages (features → bins → subset → export → patches), the resumable
runner and the descriptions `dqk info` prints."""

from dqkernels.pipeline.export import check_export_destination, export_subset
from dqkernels.pipeline.info import describe
from dqkernels.pipeline.runner import PipelineConfig, run_pipeline
from dqkernels.pipeline.stages import (
    BinsOutcome,
    draw_subset,
    extract_features,
    make_bins,
    save_subset,
)

__all__ = [
    "BinsOutcome",
    "PipelineConfig",
    "check_export_destination",
    "describe",
    "draw_subset",
    "export_subset",
    "extract_features",
    "make_bins",
    "run_pipeline",
    "save_subset",
]
