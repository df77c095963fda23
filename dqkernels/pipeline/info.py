"""``dqk info``: a readable description of every file and folder the tool writes.

Folders: a ``dqk run`` work directory, a feature set, an export, a patch store, a reconstruction
and a DQ-V2 output (:mod:`dqkernels.pipeline.info_outputs`). Files: feature-set arrays and lists,
bins, subsets with per-bin and per-class selected-of-total tables, DQ-V2 masks and recipes,
label and other arrays (:mod:`dqkernels.pipeline.info_sets`), and the files inside an output
folder that have no format of their own (an exported image: its id, bin and class). Anything
else gets one line saying what it is and that no dqk command wrote it. A file of a known kind
that cannot be read is an InputError naming it.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from dqkernels.core.errors import InputError
from dqkernels.formats.feature_set import SIDECAR_NAME, open_feature_set
from dqkernels.formats.items import EXPORT_MANIFEST
from dqkernels.pipeline.info_outputs import (
    MEMBER_DESCRIPTIONS,
    RUN_FORMAT,
    RUN_RECORD,
    STORE_HEADER,
    V2_FORMAT,
    V2_SUMMARY,
    describe_export,
    describe_folder,
    describe_image,
    describe_masks,
    describe_patch_store,
    describe_recipes,
    describe_run,
    describe_v2,
    folder_kind,
    owner_of,
)
from dqkernels.pipeline.info_sets import (
    describe_archive,
    describe_array,
    describe_bins,
    describe_feature_member,
    describe_feature_set,
    describe_subset,
    feature_set_member,
    file_size,
    indent,
    npz_arrays,
    subset_manifest_of,
)

# Entries of a plain folder looked at for dqk outputs.
FOLDER_SCAN = 200
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm"}
KNOWN = ("dqk info describes run work directories, feature sets, bins, subsets, exports, patch stores, "
         "reconstructions, DQ-V2 outputs and the files in them")


def describe(path: str | os.PathLike) -> str:
    """Human-readable, multi-line description of any file or folder a ``dqk`` command writes.

    Raises InputError when ``path`` does not exist or a file of a known kind cannot be read.
    """
    path = Path(path)
    if not os.path.lexists(path):
        raise InputError(f"{str(path)!r} does not exist")
    try:
        return _describe(path)
    except InputError:
        raise
    except (KeyError, TypeError, AttributeError, IndexError, ValueError) as error:
        # A record of a known kind with entries of the wrong shape: hand-edited or from elsewhere.
        raise InputError(
            f"{str(path)!r} looks like a dqk output but its records are malformed ({type(error).__name__}: {error})"
        ) from None


def _describe(path: Path) -> str:
    if path.is_dir():
        return _describe_directory(path)
    if not path.exists():
        return f"{path}: a broken link to {os.readlink(path)}"
    own = _describe_named_file(path)
    if own is not None:
        return own
    owner = owner_of(path)
    if owner is not None and owner[0] in MEMBER_DESCRIPTIONS:
        return MEMBER_DESCRIPTIONS[owner[0]](path, owner[1])
    if path.suffix == ".npy":
        return describe_array(path)
    if path.suffix.lower() in IMAGE_SUFFIXES:
        return describe_image(path)
    if path.suffix in (".json", ".jsonl"):
        return _describe_json_data(path)
    return f"{path}: a {file_size(path)} file that no dqk command writes ({KNOWN})"


def _describe_directory(path: Path) -> str:
    kind = folder_kind(path)
    if kind is not None:
        return describe_folder(path, kind)
    owner = owner_of(path)
    if owner is not None and owner[0] in MEMBER_DESCRIPTIONS:
        return MEMBER_DESCRIPTIONS[owner[0]](path, owner[1])
    entries = sorted(os.scandir(path), key=lambda entry: entry.name)
    folders = sum(1 for entry in entries if entry.is_dir())
    held = [line for line in (_held_output(Path(entry.path)) for entry in entries[:FOLDER_SCAN]) if line]
    if not held:
        return (f"{path}: a folder that no dqk command wrote ({len(entries) - folders} files, {folders} folders); "
                f"{KNOWN}")
    more = f", first {FOLDER_SCAN} entries looked at" if len(entries) > FOLDER_SCAN else ""
    return "\n".join([f"{path}: a folder holding {len(held)} dqk outputs ({len(entries)} entries{more})", *held])


def _held_output(path: Path):
    """'  name: what it is' for a dqk output directly inside a plain folder, else None."""
    if path.is_dir():
        kind = folder_kind(path)
        described = describe_folder(path, kind) if kind is not None else None
    elif path.suffix == ".npz":
        arrays = npz_arrays(path)
        described = describe_bins(path) if {"order", "bin_offsets"} <= arrays.keys() else None
    elif path.suffix == ".npy" and subset_manifest_of(path):
        described = describe_subset(path)
    else:
        described = None
    if described is None:
        return None
    return f"  {path.name}:{described.splitlines()[0][len(str(path)) + 1:]}"


def _json_format(path: Path):
    try:
        document = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError, RecursionError):
        return None
    return document.get("format") if isinstance(document, dict) else None


def _describe_named_file(path: Path):
    """The description of a file whose name or content says what it is, else None."""
    parent, name = path.parent, path.name
    if name == SIDECAR_NAME:
        return _record_of(path, "sidecar", describe_feature_set(open_feature_set(path, use_labels=True)))
    if name == RUN_RECORD and _json_format(path) == RUN_FORMAT:
        return _record_of(path, "run record", describe_run(parent))
    if name == EXPORT_MANIFEST:
        return _record_of(path, "manifest", describe_export(parent))
    if name == STORE_HEADER and folder_kind(parent) == "patches":
        return _record_of(path, "header", describe_patch_store(parent))
    if name == V2_SUMMARY and _json_format(path) == V2_FORMAT:
        return _record_of(path, "summary", describe_v2(parent))
    if path.suffix in (".npy", ".json") and subset_manifest_of(path):
        subset = describe_subset(path.with_suffix(".npy"))
        return subset if path.suffix == ".npy" else _record_of(path, "manifest", subset)
    if path.suffix == ".npz":
        arrays = npz_arrays(path)
        if {"order", "bin_offsets"} <= arrays.keys():
            return describe_bins(path)
        if {"masks", "meta"} <= arrays.keys():
            return describe_masks(path)
        if {"base", "partner", "key", "meta"} <= arrays.keys():
            return describe_recipes(path)
        owner = owner_of(path)
        if owner is not None and owner[0] in MEMBER_DESCRIPTIONS:
            return MEMBER_DESCRIPTIONS[owner[0]](path, owner[1])
        return describe_archive(path, arrays)
    role = feature_set_member(path)
    if role is not None:
        return describe_feature_member(path, role)
    return None


def _record_of(path: Path, what: str, described: str) -> str:
    """A record file (a sidecar, manifest, header...) described as the output it belongs to."""
    return f"{path}: the {what} of\n" + indent(described)


def _describe_json_data(path: Path) -> str:
    """A JSON / JSONL file no dqk command wrote: its records, e.g. instruction data."""
    try:
        text = path.read_text(encoding="utf-8")
        records = (json.loads(text) if path.suffix == ".json"
                   else [json.loads(line) for line in text.splitlines() if line.strip()])
    except (OSError, UnicodeDecodeError, ValueError, RecursionError) as error:
        return f"{path}: a {file_size(path)} file that is not readable JSON ({error}); {KNOWN}"
    if isinstance(records, list):
        fields = sorted({key for record in records[:100] if isinstance(record, dict) for key in record})
        shown = ", ".join(fields[:8]) + (", ..." if len(fields) > 8 else "")
        return f"{path}: JSON data, {len(records)} records" + (f" (fields {shown})" if fields else "")
    if isinstance(records, dict):
        return f"{path}: a JSON object with keys {', '.join(sorted(records)[:8])}; not written by a dqk command"
    return f"{path}: a JSON {type(records).__name__}; not written by a dqk command"
