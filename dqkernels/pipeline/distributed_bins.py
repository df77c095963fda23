"""``dqk bin --distributed``: one rank of a torchrun job that bins a feature set and writes the
bins file from rank 0 (the engine is :func:`dqkernels.graphcut.distributed.graphcut_bins_distributed`)."""

from __future__ import annotations

import datetime
import os
import time
from pathlib import Path
from typing import Optional

import torch
import torch.distributed as dist

from dqkernels.core.errors import InputError
from dqkernels.formats.feature_set import open_feature_set
from dqkernels.graphcut.distributed import (
    DEFAULT_TIMEOUT_S,
    PeerFailureError,
    _Ranks,
    graphcut_bins_distributed,
    require_torchrun,
)
from dqkernels.pipeline.stages import BinsOutcome


def make_bins_distributed(
    features,
    bins: int = 10,
    *,
    out=None,
    labels=None,
    use_labels: bool = True,
    metric: str = "cosine",
    lam: float = 1.0,
    device: Optional[str] = None,
    sizes: str = "split",
    timeout_s: float = DEFAULT_TIMEOUT_S,
):
    """One rank of a ``torchrun`` job: ``pipeline.make_bins`` with the work spread over the job.

    Joins the job's process group from torchrun's environment (gloo on the CPU; NCCL when
    ``device`` is cuda, each rank on cuda:LOCAL_RANK), with ``timeout_s`` seconds as the longest
    any rank waits for another — in per-class mode that includes waiting for the slowest rank's
    classes, so it must exceed the binning time of the largest class. Opens the features memory-mapped (each rank reads its own rows),
    bins per class when there are labels and by row shards otherwise, and writes ``out``
    (default: bins.npz beside the features) from rank 0, atomically, once every rank has
    finished: a failed job leaves no output file. Any rank's error is raised on every rank.
    Returns the ``pipeline.BinsOutcome`` on rank 0, None on the other ranks.
    """
    require_torchrun(
        "distributed binning", "torchrun --nproc-per-node 4 -m dqkernels.cli bin --features F --distributed"
    )
    cuda = device is not None and str(device).startswith("cuda")
    if cuda:
        if not torch.cuda.is_available():
            raise InputError(f"device={device!r}: no CUDA device is available to torch")
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    try:
        dist.init_process_group("nccl" if cuda else "gloo", timeout=datetime.timedelta(seconds=timeout_s))
    except RuntimeError as error:
        raise PeerFailureError(f"could not join the torchrun job ({' '.join(str(error).split())})") from error
    try:
        ranks = _Ranks.of(None)
        feature_set, failure = None, None
        try:
            feature_set = open_feature_set(features, labels=labels, use_labels=use_labels)
            if out is None:
                base = feature_set.path if feature_set.path.is_dir() else feature_set.path.parent
                out = base / "bins.npz"
            if ranks.rank == 0:
                Path(out).parent.mkdir(parents=True, exist_ok=True)
        except (ValueError, TypeError, OSError) as error:
            failure = error
        ranks.agree(failure, "opening the features")

        started = time.perf_counter()
        result = graphcut_bins_distributed(
            feature_set.features, bins, feature_set.labels, metric, lam, sizes=sizes
        )
        seconds = time.perf_counter() - started
        failure = None
        if result is not None:
            result.meta["features_path"] = str(feature_set.path.resolve())
            result.meta["features_sidecar"] = (
                str(feature_set.sidecar_path.resolve()) if feature_set.sidecar_path is not None else None
            )
            result.meta["stage_fingerprint"] = None
            try:
                result.save(out)
            except (ValueError, OSError) as error:
                failure = ValueError(f"could not write {out}: {error}")
        ranks.agree(failure, "writing the bins file")
        return None if result is None else BinsOutcome(result, Path(out), seconds)
    finally:
        dist.destroy_process_group()
