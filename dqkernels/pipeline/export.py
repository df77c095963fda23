"""Export: the chosen samples written in the input's own format into a new directory.

Ids are rows of the feature set (docs/method.md §3.5). For an image folder each id is resolved to
a file through the feature set's recorded item — by relative path, with the recorded size —
never by its position in a fresh listing of the folder. Every export directory carries a
manifest (``dqk_export.json``, :func:`dqkernels.formats.items.write_export_manifest`) tying
each exported sample to its id, source item, bin and class.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Callable, Optional

import numpy as np

from dqkernels.core.atomic import staged_directory
from dqkernels.core.errors import InputError
from dqkernels.formats.bins import load_bins_file
from dqkernels.formats.feature_set import read_feature_items, read_sidecar
from dqkernels.formats.inputs import input_kind
from dqkernels.formats.items import (
    EXPORT_FORMAT,
    EXPORT_MANIFEST,
    list_image_folder,
    resolve_items,
    write_export_manifest,
)
from dqkernels.pipeline.progress import Reporter, as_reporter


def export_subset(
    indices: np.ndarray,
    dest: str | os.PathLike,
    *,
    features_sidecar: Optional[str | os.PathLike] = None,
    source: Optional[str | os.PathLike] = None,
    link: bool = False,
    replace: bool = False,
    bins_file: Optional[str | os.PathLike] = None,
    progress: bool | Reporter = False,
) -> Path:
    """Write the samples at ``indices`` (sorted int64 row ids) to the new directory ``dest``.

    The samples keep the input's own format: image folder → ``dest/<class>/...`` copies
    (with ``link``, symlinks to the resolved source files); instruction data →
    ``dest/<input file name>`` with the chosen records; image array → ``dest/<input file name>``
    with the chosen images (and labels). The input is the one recorded in ``features_sidecar``;
    ``source`` points at it instead (e.g. after the data moved, or for features without a
    sidecar). ``bins_file``: the bins the subset was drawn from, for the manifest's ``bin`` of
    each sample. ``dest`` must be missing or empty, unless ``replace``: then a previous export
    there is swapped for the new one once it is complete.

    Image folders: every id is resolved through the feature set's items — the file must exist
    at the recorded relative path under the source, with the recorded size, and must not lead
    outside it (``..``, absolute paths and links out are refused); the first failure raises
    InputError naming it, and nothing is written. Features without recorded items are mapped to
    a listing of the folder only when the number of rows (from ``bins_file``) equals the number
    of images. Arrays and instruction data: the ids are rows; their row count must match the
    feature set's. progress: report the files written (:mod:`dqkernels.pipeline.progress`), or a
    Reporter.
    """
    dest = Path(dest)
    if not replace:
        check_export_destination(dest)
    sidecar_path = Path(features_sidecar) if features_sidecar else None
    sidecar = read_sidecar(sidecar_path) if sidecar_path is not None else None
    if sidecar is None and source is None:
        raise InputError("the features have no dqk sidecar naming their input; give the input data with --source")
    source_path = Path(source) if source is not None else Path(sidecar["source"]["path"])
    kind = input_kind(source_path)
    if sidecar is not None and sidecar["source"]["kind"] != kind:
        raise InputError(
            f"the features were extracted from {sidecar['source']['kind']} data but {str(source_path)!r} "
            f"is {kind} data"
        )
    _check_apart(dest, source_path)
    row_count = sidecar["count"] if sidecar is not None else None
    bin_of = _bin_of(bins_file, row_count) if bins_file is not None else None
    if row_count is None and bin_of is not None:
        row_count = int(bin_of.shape[0])
    indices = np.asarray(indices, dtype=np.int64)
    if row_count is not None:
        _check_ids_fit(indices, row_count, f"the features ({row_count} rows)")

    if kind != "image-folder" and source_path.name == EXPORT_MANIFEST:
        raise InputError(f"an input named {EXPORT_MANIFEST!r} cannot be exported: the export manifest has that name")
    reporter = as_reporter(progress)
    writer, samples = _export_plan(kind, source_path, sidecar_path, sidecar, row_count, indices, link)
    for record in samples:
        record["bin"] = int(bin_of[record["id"]]) if bin_of is not None else None
    manifest = {
        "format": EXPORT_FORMAT,
        "kind": kind,
        "source": str(source_path.resolve()),
        "features_sidecar": str(sidecar_path.resolve()) if sidecar_path is not None else None,
        "bins_file": str(Path(bins_file).resolve()) if bins_file is not None else None,
        "link": bool(link and kind == "image-folder"),
        "count": len(samples),
        "samples": samples,
    }
    dest.parent.mkdir(parents=True, exist_ok=True)
    with staged_directory(dest) as staging, reporter.step("export", len(samples), "samples") as exported:
        writer(staging, exported)
        write_export_manifest(staging, manifest)
    return dest


def check_export_destination(dest: str | os.PathLike) -> None:
    """Raise InputError unless ``dest`` is missing or an empty directory."""
    dest = Path(dest)
    if dest.is_symlink() or (dest.exists() and (not dest.is_dir() or any(dest.iterdir()))):
        raise InputError(f"export directory {str(dest)!r} already exists and is not empty")


def _check_apart(dest: Path, source_path: Path) -> None:
    """The export must neither hold the input (a replace would delete it) nor sit inside a folder input."""
    dest_resolved = dest.resolve()
    source_resolved = source_path.resolve()
    if source_resolved.is_relative_to(dest_resolved):
        raise InputError(f"export directory {str(dest)!r} holds the input {str(source_path)!r}")
    if source_path.is_dir() and dest_resolved.is_relative_to(source_resolved):
        raise InputError(f"export directory {str(dest)!r} is inside the input folder {str(source_path)!r}")


def _bin_of(bins_file: str | os.PathLike, row_count: Optional[int]) -> np.ndarray:
    """(M,) int64 bin of every row, from the bins file; its M must be the features' row count."""
    bin_of = load_bins_file(bins_file).bin_of
    if row_count is not None and bin_of.shape[0] != row_count:
        raise InputError(
            f"bins file {str(bins_file)!r} bins {bin_of.shape[0]} samples but the features have {row_count} rows"
        )
    return bin_of


def _export_plan(
    kind: str,
    source_path: Path,
    sidecar_path: Optional[Path],
    sidecar: Optional[dict],
    row_count: Optional[int],
    indices: np.ndarray,
    link: bool,
) -> tuple[Callable[[Path, Callable[[int], None]], None], list[dict]]:
    """Check the source against the subset; return (a function writing the export into a
    directory and telling a progress callback how many samples are written, the manifest
    record of every exported sample without its bin)."""
    if kind == "image-folder":
        return _image_folder_plan(source_path, sidecar_path, sidecar, row_count, indices, link)

    if kind == "text":
        from dqkernels.features.text import (
            read_instruction_records,
            write_instruction_records,
        )

        instructions = read_instruction_records(source_path)
        _check_same_count(len(instructions.records), row_count, source_path)
        _check_ids_fit(indices, len(instructions.records), repr(str(source_path)))
        samples = [{"id": int(row)} for row in indices]
        def write_records(staging: Path, progress: Callable[[int], None]) -> None:
            write_instruction_records(instructions, indices, staging / source_path.name)
            progress(len(samples))

        return write_records, samples

    from dqkernels.features.image import load_image_array

    images, labels = load_image_array(source_path)
    _check_same_count(images.shape[0], row_count, source_path)
    _check_ids_fit(indices, images.shape[0], repr(str(source_path)))
    samples = [
        {"id": int(row), **({"label": int(labels[row])} if labels is not None else {})} for row in indices
    ]

    def write_arrays(staging: Path, progress: Callable[[int], None]) -> None:
        if source_path.suffix == ".npz":
            chosen = {"images": images[indices]}
            if labels is not None:
                chosen["labels"] = labels[indices]
            np.savez(staging / source_path.name, **chosen)
        else:
            np.save(staging / source_path.name, images[indices])
        progress(len(samples))

    return write_arrays, samples


def _image_folder_plan(source_path, sidecar_path, sidecar, row_count, indices, link):
    """Resolve every id to its file under ``source_path`` (by recorded path and size) first."""
    items = read_feature_items(sidecar_path, sidecar) if sidecar is not None else None
    class_names = sidecar["source"].get("classes") if sidecar is not None else None
    if items is None:
        listing = list_image_folder(source_path)
        if row_count != len(listing.relative_paths):
            known = "an unknown number of" if row_count is None else str(row_count)
            raise InputError(
                f"the features record no items, so their {known} rows cannot be tied to the "
                f"{len(listing.relative_paths)} images of {str(source_path)!r} by path; extract them "
                "with `dqk features` (or give the bins file, when the features list exactly this folder)"
            )
        items, class_names = listing.items, listing.class_names
    _check_ids_fit(indices, len(items), f"the items of the features ({len(items)})")
    files = resolve_items(source_path, items, indices.tolist())
    class_index = {name: index for index, name in enumerate(class_names or [])}
    samples = []
    for row, file in zip(indices.tolist(), files):
        item = items[row]
        class_name = item.path.split("/")[0]
        samples.append({
            "id": row,
            "path": item.path,
            "size": file.stat().st_size,
            "class": class_name,
            "label": class_index.get(class_name),
        })

    def write(staging: Path, progress: Callable[[int], None]) -> None:
        for written, (record, file) in enumerate(zip(samples, files), start=1):
            target = staging / record["path"]
            target.parent.mkdir(parents=True, exist_ok=True)
            if link:
                os.symlink(file, target)
            else:
                shutil.copy2(file, target)
            progress(written)

    return write, samples


def _check_same_count(count: int, row_count: Optional[int], source_path: Path) -> None:
    if row_count is not None and count != row_count:
        raise InputError(
            f"{str(source_path)!r} holds {count} samples but the features have {row_count} rows; "
            "its rows are the ids, so it must be the data the features were extracted from"
        )


def _check_ids_fit(indices: np.ndarray, count: int, what: str) -> None:
    if indices.size and indices.min() < 0:
        raise InputError(f"subset id {int(indices.min())} is negative")
    if indices.size and indices.max() >= count:
        raise InputError(f"subset id {int(indices.max())} is out of range for {what}")
