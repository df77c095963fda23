"""``dqk features --distributed``: one rank of a torchrun job that extracts image features.

The images (an image folder's listing or an image array's rows) are split into contiguous
shards of whole batches, one per rank, so every batch holds the same images as in a
single-process run. Each rank runs the model over its shard (``extract_image_features``); the
ranks then agree on the unreadable images, rank 0 creates the output arrays as memory-mapped
``.npy`` files in a staging folder beside the output, every rank writes its rows there, and rank
0 writes labels, items and sidecar and commits the feature set as one unit
(:func:`dqkernels.pipeline.stages.write_extracted_features`, the arrays moved in). The result is
the feature set one process writes: the same rows in the same order, the same skipped images,
the same sidecar. Any rank's error is raised on every rank and leaves no output.
"""

from __future__ import annotations

import datetime
import inspect
import os
import shutil
import tempfile
from pathlib import Path
from typing import Optional

import numpy as np
import torch
import torch.distributed as dist

from dqkernels.core.atomic import _temp_prefix, sweep_temporaries
from dqkernels.core.errors import InputError, InputTypeError
from dqkernels.features.image import ImageFeatures, extract_image_features
from dqkernels.formats.inputs import input_kind
from dqkernels.graphcut.distributed import PeerFailureError, _Ranks, require_torchrun
from dqkernels.pipeline.stages import (
    _image_features,
    extract_features,
    write_extracted_features,
)

# The longest a rank waits for another, in seconds. A rank that finishes its shard first waits
# this long for the slowest one, so it must exceed the spread of the ranks' extraction times.
DEFAULT_TIMEOUT_S = 4 * 3600
# ImageFeatures field → feature-set array name (the sidecar's "files" keys).
_ARRAY_NAMES = {"pooled": "features", "delta": "delta", "embed": "embed"}


def shard_bounds(total: int, batch_size: int, rank: int, world: int) -> tuple[int, int]:
    """Rows [lo, hi) of ``total`` that ``rank`` of ``world`` extracts: a contiguous run of whole
    batches of ``batch_size`` rows (the last batch may be short), batches dealt as evenly as
    possible; a rank may get none when there are fewer batches than ranks."""
    batches = -(-total // batch_size)
    first, last = rank * batches // world, (rank + 1) * batches // world
    return min(first * batch_size, total), min(last * batch_size, total)


def extract_features_distributed(
    input_path: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    device: Optional[str] = None,
    stage_fingerprint: Optional[str] = None,
    timeout_s: float = DEFAULT_TIMEOUT_S,
    **options,
) -> Optional[dict]:
    """One rank of a ``torchrun`` job: ``pipeline.extract_features`` of an image input, the
    images split among the ranks.

    Joins the job's process group from torchrun's environment: gloo on the CPU; NCCL on GPUs
    (``device`` cuda, or none given and CUDA available), each rank on cuda:LOCAL_RANK.
    ``timeout_s`` is the longest any rank waits for another. ``options`` are those of
    ``extract_features`` for images (model, weights, mode, img_size, batch_size, strict, ...);
    with the same options the feature set equals a single-process one (on the CPU, the same
    bytes). ``out_dir``'s parent must be a folder every rank sees. The text options are accepted
    for the same call shape; instruction data is refused (extract it in one process).
    Returns the sidecar on rank 0, None on the other ranks.
    """
    options = _image_options(options)
    require_torchrun(
        "distributed feature extraction",
        "torchrun --nproc-per-node 4 -m dqkernels.cli features DATA -o feats/ --distributed",
    )
    cuda = str(device).startswith("cuda") if device is not None else torch.cuda.is_available()
    if cuda:
        if not torch.cuda.is_available():
            raise InputError(f"device={device!r}: no CUDA device is available to torch")
        local_rank = int(os.environ["LOCAL_RANK"])
        torch.cuda.set_device(local_rank)
        device = f"cuda:{local_rank}"
    else:
        device = "cpu"
    try:
        dist.init_process_group("nccl" if cuda else "gloo", timeout=datetime.timedelta(seconds=timeout_s))
    except RuntimeError as error:
        raise PeerFailureError(f"could not join the torchrun job ({' '.join(str(error).split())})") from error
    try:
        return _extract_on_ranks(
            _Ranks.of(None), Path(input_path).resolve(), Path(out_dir), device, stage_fingerprint, options
        )
    finally:
        dist.destroy_process_group()


def _image_options(options: dict) -> dict:
    """``options`` completed with ``extract_features``'s image defaults (its text options are
    dropped); a name it does not take is refused."""
    defaults = {
        name: parameter.default for name, parameter in inspect.signature(extract_features).parameters.items()
        if parameter.kind is parameter.KEYWORD_ONLY and name not in ("device", "stage_fingerprint")
    }
    unknown = sorted(set(options) - set(defaults))
    if unknown:
        raise InputTypeError(f"extract_features_distributed got unknown options {unknown}")
    return {name: value for name, value in {**defaults, **options}.items() if not name.startswith("text_")}


def _extract_on_ranks(ranks: _Ranks, input_path: Path, out_dir: Path, device: str,
                      stage_fingerprint: Optional[str], options: dict) -> Optional[dict]:
    """The job on every rank; collectives in the same order on all of them, whatever fails."""
    staging, kind, failure = None, None, None
    try:
        kind = input_kind(input_path)
        if kind == "text":
            raise InputError(
                "distributed extraction is for images; extract instruction data in one process "
                "(without --distributed)"
            )
        if os.path.lexists(out_dir) and not out_dir.is_dir():
            raise InputError(f"output directory {str(out_dir)!r} exists and is not a directory")
        if ranks.rank == 0:
            out_dir.parent.mkdir(parents=True, exist_ok=True)
            sweep_temporaries(out_dir)
            staging = tempfile.mkdtemp(prefix=_temp_prefix(out_dir.name), suffix=".tmp", dir=out_dir.parent)
    except (ValueError, TypeError, OSError) as error:
        failure = error
    try:
        staging = Path(ranks.agree(failure, "preparing the output", info=staging)[0])
        shards = _ShardedExtraction(ranks, staging)
        extracted = None
        try:
            extracted = _image_features(input_path, kind, device=device, extract_images=shards, **options)
        except (ValueError, TypeError, OSError) as error:
            if shards.started and not shards.finished:
                raise  # raised on every rank by the shards' own agreement
            failure = error
        if not shards.started:  # the other ranks are in the shards' first agreement
            ranks.agree(failure, "extracting the features")
        ranks.agree(failure, "describing the features")

        sidecar = None
        if ranks.rank == 0:
            array_files = {
                _ARRAY_NAMES[field]: path for field, path in shards.files.items()
                if _ARRAY_NAMES[field] in extracted.arrays
            }
            try:
                sidecar = write_extracted_features(
                    out_dir, extracted, options["mode"], stage_fingerprint, array_files=array_files
                )
            except (ValueError, OSError) as error:
                failure = error
        ranks.agree(failure, "writing the feature set")
        return sidecar
    finally:
        if ranks.rank == 0 and staging is not None:
            shutil.rmtree(staging, ignore_errors=True)


class _ShardedExtraction:
    """``extract_image_features`` for ``stages._image_features``, over this rank's shard.

    Called on every rank with the same arguments; returns, on every rank, the ImageFeatures of
    all the images: arrays memory-mapped read-only from the shared ``.npy`` files in
    ``staging`` (``files``: {ImageFeatures field: path}), global kept rows and skipped images.
    Errors are agreed on, so they are raised on every rank (``started`` / ``finished`` tell the
    caller whether a failure happened inside).
    """

    def __init__(self, ranks: _Ranks, staging: Path):
        self.ranks, self.staging = ranks, staging
        self.started = self.finished = False
        self.files: dict[str, Path] = {}

    def __call__(self, model, *, image_paths=None, images=None, labels=None, batch_size: int = 64,
                 strict: bool = False, progress: bool = False, **options) -> ImageFeatures:
        self.started = True
        ranks = self.ranks
        total, local, failure, info = 0, None, None, None
        try:
            total = len(image_paths) if image_paths is not None else int(images.shape[0])
            lo, hi = shard_bounds(total, batch_size, ranks.rank, ranks.size)
            local = _extract_shard(
                model, lo, hi, image_paths=image_paths, images=images, labels=labels, batch_size=batch_size,
                strict=strict, progress=progress if ranks.rank == 0 else False, **options
            )
            arrays = _arrays_of(local)
            info = {
                "skipped": [(row + lo, reason) for row, reason in local.skipped],
                "kept": len(local.kept_rows),
                "columns": {field: (values.shape[1], values.dtype.str) for field, values in arrays.items()},
            }
        except (ValueError, TypeError, OSError) as error:
            failure = error
        reports = ranks.agree(failure, "extracting this rank's images", info=info)

        skipped = [entry for report in reports for entry in report["skipped"]]
        kept_counts = [report["kept"] for report in reports]
        kept = sum(kept_counts)
        if kept == 0:  # the same error as one process
            raise InputError(f"none of the {total} images could be read (first: {skipped[0][1]})")
        columns = next(report["columns"] for report in reports if report["kept"])
        self.files = {field: self.staging / f"{field}.npy" for field in columns}

        failure = None
        if ranks.rank == 0:
            try:
                for field, (width, dtype) in columns.items():
                    created = np.lib.format.open_memmap(
                        self.files[field], mode="w+", dtype=np.dtype(dtype), shape=(kept, width)
                    )
                    del created
            except (ValueError, OSError) as error:
                failure = error
        ranks.agree(failure, "creating the shared output")

        failure = None
        start = sum(kept_counts[: ranks.rank])
        try:
            for field, values in _arrays_of(local).items():
                shared = np.load(self.files[field], mmap_mode="r+")
                shared[start : start + len(values)] = values
                shared.flush()
                del shared
        except (ValueError, OSError) as error:
            failure = error
        ranks.agree(failure, "writing this rank's rows")

        skipped_rows = np.array([row for row, _ in skipped], dtype=np.int64)
        shared = {field: np.load(path, mmap_mode="r") for field, path in self.files.items()}
        self.finished = True
        return ImageFeatures(
            pooled=shared.get("pooled"),
            delta=shared.get("delta"),
            embed=shared.get("embed"),
            kept_rows=np.setdiff1d(np.arange(total, dtype=np.int64), skipped_rows),
            skipped=skipped,
        )


def _arrays_of(features: ImageFeatures) -> dict:
    """{ImageFeatures field: (n, width) array} of the arrays ``features`` holds."""
    return {field: getattr(features, field) for field in _ARRAY_NAMES if getattr(features, field) is not None}


def _extract_shard(model, lo: int, hi: int, *, image_paths, images, labels, strict: bool,
                   **options) -> ImageFeatures:
    """``extract_image_features`` of rows [lo, hi) (row numbers local to the shard)."""
    if lo == hi:
        return ImageFeatures(None, None, None, np.empty(0, dtype=np.int64), [])
    try:
        return extract_image_features(
            model,
            image_paths=image_paths[lo:hi] if image_paths is not None else None,
            images=images[lo:hi] if images is not None else None,
            labels=labels[lo:hi] if labels is not None else None,
            strict=strict,
            **options,
        )
    except InputError as error:
        # A pass in which no image could be read is an error for one process; for a shard it is
        # not (other shards may hold readable images): every row of the shard was skipped.
        prefix = f"none of the {hi - lo} images could be read (first: "
        if strict or not str(error).startswith(prefix):
            raise
        first_reason = str(error)[len(prefix) : -1]
        skipped = [(row, first_reason if row == 0 else "unreadable") for row in range(hi - lo)]
        return ImageFeatures(None, None, None, np.empty(0, dtype=np.int64), skipped)
