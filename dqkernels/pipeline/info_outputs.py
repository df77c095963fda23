"""``dqk info`` for the folders the tool writes — a ``dqk run`` work directory, an export, a patch
store, a reconstruction, a DQ-V2 output — and for the files inside them that have no format of
their own (exported and reconstructed images, class folders, a store's arrays)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable, Optional

import numpy as np

from dqkernels.core.errors import InputError
from dqkernels.formats.bins import load_bins_file
from dqkernels.formats.feature_set import SIDECAR_NAME, open_feature_set
from dqkernels.formats.items import EXPORT_MANIFEST, read_export_manifest
from dqkernels.pipeline.info_sets import (
    count_table,
    describe_bins,
    describe_feature_set,
    describe_subset,
    file_size,
    first_line,
    indent,
    percent,
    read_json,
)
from dqkernels.pixel.patch_store import HEADER_FILE as STORE_HEADER
from dqkernels.pixel.patch_store import STORE_FORMAT, PatchStore

RUN_RECORD = "run.json"
RUN_FORMAT = "dqkernels.run"
RECON_SAMPLES = "samples.jsonl"  # what ``dqk reconstruct`` writes beside its images
V2_SUMMARY = "v2.json"
V2_FORMAT = "dqkernels.v2"
V2_ITEMS = "subset_items.jsonl"
# How far above a file ``dqk info`` looks for the dqk folder it belongs to.
OWNER_DEPTH = 4


def _json_format(path: Path) -> Optional[str]:
    """The ``format`` entry of a JSON document, None when it is unreadable or has none."""
    try:
        document = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError, RecursionError):
        return None
    return document.get("format") if isinstance(document, dict) else None


def _is_recon(folder: Path) -> bool:
    try:
        with open(folder / RECON_SAMPLES, encoding="utf-8") as handle:
            record = json.loads(handle.readline())
    except (OSError, UnicodeDecodeError, ValueError, RecursionError):
        return False
    return isinstance(record, dict) and {"id", "path"} <= record.keys()


def folder_kind(folder: Path) -> Optional[str]:
    """Which dqk output ``folder`` is: "run", "features", "export", "patches", "recon", "v2" or None."""
    if not folder.is_dir():
        return None
    checks = (
        ("run", lambda: _json_format(folder / RUN_RECORD) == RUN_FORMAT),
        ("v2", lambda: _json_format(folder / V2_SUMMARY) == V2_FORMAT),
        ("export", lambda: (folder / EXPORT_MANIFEST).is_file()),
        ("patches", lambda: _json_format(folder / STORE_HEADER) == STORE_FORMAT),
        ("features", lambda: (folder / SIDECAR_NAME).is_file()),
        ("recon", lambda: _is_recon(folder)),
    )
    return next((kind for kind, check in checks if check()), None)


def owner_of(path: Path) -> Optional[tuple[str, Path]]:
    """(kind, folder) of the nearest dqk output folder above ``path``, or None."""
    for folder in list(path.parents)[:OWNER_DEPTH]:
        kind = folder_kind(folder)
        if kind is not None:
            return kind, folder
    return None


def describe_folder(folder: Path, kind: str) -> str:
    return FOLDER_DESCRIPTIONS[kind](folder)


# --------------------------------------------------------------------------- run work directory


def describe_run(folder: Path) -> str:
    record = read_json(folder / RUN_RECORD, "run record")
    stages = record.get("stages") if isinstance(record, dict) else None
    if not isinstance(stages, dict):
        raise InputError(f"run record {str(folder / RUN_RECORD)!r} lists no stages")
    lines = [f"{folder}: dqk run work directory, stages {', '.join(stages) or 'none yet'} (record {RUN_RECORD})"]
    for stage, entry in stages.items():
        if not isinstance(entry, dict):
            continue
        outputs = entry.get("outputs") if isinstance(entry.get("outputs"), dict) else {}
        missing = [name for name in outputs if not (folder / name).exists()]
        state = "unfinished (interrupted)" if "fingerprint" not in entry else (
            f"missing {', '.join(missing)}" if missing else "outputs present")
        fingerprint = str(entry.get("fingerprint", ""))[:19]
        lines.append(f"  {stage}: {len(outputs)} outputs, {state}" + (f", fingerprint {fingerprint}…"
                                                                      if fingerprint else ""))
    sections = [
        ("features", folder / "features", lambda p: describe_feature_set(open_feature_set(p, use_labels=True))),
        ("bins", folder / "bins.npz", describe_bins),
        ("subset", folder / "subset.npy", describe_subset),
        ("patches", folder / "patches", describe_patch_store),
    ]
    export_dir = stages.get("export", {}).get("dir") if isinstance(stages.get("export"), dict) else None
    if export_dir and (Path(export_dir) / EXPORT_MANIFEST).is_file():
        sections.insert(3, ("export", Path(export_dir), describe_export))
    shown_lines = {"features": 4, "bins": 4, "export": 1, "patches": 3}
    for name, path, describe in sections:
        if path.exists():
            text = describe(path)
            lines.append(indent("\n".join(text.splitlines()[: shown_lines.get(name)])))
    return "\n".join(lines)


# --------------------------------------------------------------------------- export


def _export_totals(manifest: dict) -> tuple[Optional[np.ndarray], Optional[np.ndarray]]:
    """(bin of every row, label of every row) of the data the export was drawn from, when its
    bins file (and for labels, its feature set) can still be read; else None for each."""
    bin_of = labels = None
    if isinstance(manifest.get("bins_file"), str) and Path(manifest["bins_file"]).is_file():
        result = load_bins_file(manifest["bins_file"])
        bin_of, labels = result.bin_of, result.labels
    sidecar = manifest.get("features_sidecar")
    if labels is None and isinstance(sidecar, str) and Path(sidecar).is_file():
        labels = open_feature_set(sidecar, use_labels=True).labels
    return bin_of, labels


def describe_export(folder: Path) -> str:
    manifest = read_export_manifest(folder)
    samples = [s for s in manifest.get("samples", []) if isinstance(s, dict)]
    how = "linked" if manifest.get("link") else "copied"
    lines = [f"{folder}: export of {manifest.get('count', len(samples))} samples ({manifest.get('kind')}), "
             f"{how} from {manifest.get('source')}"]
    for key, label in (("bins_file", "bins"), ("features_sidecar", "features")):
        if manifest.get(key):
            lines.append(f"  {label}: {manifest[key]}")
    bin_of, labels = _export_totals(manifest)
    ids = np.array([int(s["id"]) for s in samples], dtype=np.int64)
    chosen_bins = [s.get("bin") for s in samples]
    if samples and all(b is not None for b in chosen_bins):
        bins = np.array(chosen_bins, dtype=np.int64)
        n_bins = int(bin_of.max()) + 1 if bin_of is not None and bin_of.size else int(bins.max()) + 1
        totals = np.bincount(bin_of, minlength=n_bins) if bin_of is not None else None
        lines += count_table("bin", list(range(n_bins)), np.bincount(bins, minlength=n_bins), totals)
    chosen_labels = [s.get("label") for s in samples]
    if samples and all(label is not None for label in chosen_labels):
        names = {int(s["label"]): s.get("class", s["label"]) for s in samples}
        if labels is not None and ids.size and ids.max() < labels.shape[0]:
            classes, totals = np.unique(labels, return_counts=True)
            selected = [sum(1 for label in chosen_labels if label == c) for c in classes]
            lines += count_table("class", [names.get(int(c), int(c)) for c in classes], selected, totals)
        else:
            classes = sorted(names)
            lines += count_table("class", [names[c] for c in classes],
                                 [chosen_labels.count(c) for c in classes], None)
    files = sorted(entry.name for entry in folder.iterdir() if entry.name != EXPORT_MANIFEST)
    lines.append(f"  holds: {', '.join(files[:12])}{' ...' if len(files) > 12 else ''} and {EXPORT_MANIFEST}")
    return "\n".join(lines)


def _describe_export_member(path: Path, folder: Path) -> str:
    manifest = read_export_manifest(folder)
    relative = path.relative_to(folder).as_posix()
    samples = [s for s in manifest.get("samples", []) if isinstance(s, dict)]
    if path.is_dir():
        inside = [s for s in samples if str(s.get("path", "")).startswith(relative + "/")]
        return f"{path}: class folder {relative!r} of the export {folder}: {len(inside)} exported sample(s)"
    record = next((s for s in samples if s.get("path") == relative), None)
    if record is not None:
        how = f"a link to {path.resolve()}" if path.is_symlink() else f"copied from {manifest.get('source')}"
        return (f"{path}: exported sample id {record['id']} (bin {record.get('bin')}, class "
                f"{record.get('class', record.get('label'))!r}, {file_size(path)}) of the export {folder}, {how}")
    if Path(str(manifest.get("source", ""))).name == path.name:
        return (f"{path}: the exported data of {folder}: {len(samples)} samples of {manifest.get('source')}, "
                f"in their id order (ids in {EXPORT_MANIFEST})")
    return f"{path}: a file inside the export {folder} that its manifest does not list"


# --------------------------------------------------------------------------- patch store


def describe_patch_store(folder: Path) -> str:
    store = PatchStore(folder)
    header, geometry = store.header, store.geometry
    kept = store.keep_counts
    sizes = header.get("bytes", {})
    lines = [
        f"{folder}: patch store, {len(store)} images of {geometry.height}x{geometry.width}x{geometry.channels}, "
        f"{geometry.patch} px patches ({geometry.grid[0]}x{geometry.grid[1]} grid)",
        f"  kept patches per image: {int(kept.min()) if kept.size else 0} to {int(kept.max()) if kept.size else 0}"
        f" of {geometry.num_patches} ({header.get('patch_count')} stored)",
        f"  bytes: {sizes.get('images')} as full images -> {sizes.get('patches')} as patches "
        f"({percent(sizes.get('patches', 0), sizes.get('images', 0))}); on disk {store.stored_bytes()}",
    ]
    if store.labels is not None:
        lines.append(f"  labels: {np.unique(store.labels).size} classes"
                     + (f" ({len(store.class_names)} class names)" if store.class_names else ""))
    source, scoring = header.get("source"), header.get("scoring")
    if isinstance(source, dict):
        lines.append(f"  source: {source.get('kind')} {source.get('path')}"
                     + (f", subset {source['subset']}" if source.get("subset") else ""))
    if isinstance(scoring, dict):
        lines.append(f"  scoring: {scoring.get('method')} with {scoring.get('cam_model')} "
                     f"({scoring.get('cam_checkpoint')})")
    return "\n".join(lines)


def _describe_store_member(path: Path, folder: Path) -> str:
    store = PatchStore(folder)
    role = next((role for role, name in store.header.get("files", {}).items() if name == path.name), None)
    if role is None:
        return f"{path}: a file inside the patch store {folder} that its {STORE_HEADER} does not list"
    if path.suffix == ".npy":
        array = np.load(path, mmap_mode="r")
        head = f"{path}: the {role} array of a patch store: shape {array.shape}, dtype {array.dtype}"
    else:
        head = f"{path}: the {role} list of a patch store ({len(store)} images)"
    return head + "\n" + indent(first_line(describe_patch_store(folder)))


# --------------------------------------------------------------------------- reconstruction


def _recon_records(folder: Path) -> list[dict]:
    path = folder / RECON_SAMPLES
    try:
        with open(path, encoding="utf-8") as handle:
            return [json.loads(line) for line in handle if line.strip()]
    except (OSError, UnicodeDecodeError, ValueError, RecursionError) as error:
        raise InputError(f"{str(path)!r} is not readable ({error})") from None


def describe_recon(folder: Path) -> str:
    records = _recon_records(folder)
    labels = {r.get("label") for r in records} - {None}
    lines = [f"{folder}: reconstructed images (dqk reconstruct), {len(records)} PNG images as an ImageFolder"
             + (f" of {len(labels)} classes" if labels else "")]
    if records:
        first = folder / records[0]["path"]
        if first.is_file():
            lines.append(f"  image size: {_image_size(first)}")
        lines.append(f"  {RECON_SAMPLES}: sample id, path, label and source of each image "
                     f"(ids {min(r['id'] for r in records)} to {max(r['id'] for r in records)})")
    return "\n".join(lines)


def _describe_recon_member(path: Path, folder: Path) -> str:
    records = _recon_records(folder)
    relative = path.relative_to(folder).as_posix()
    if path.is_dir():
        inside = sum(1 for r in records if str(r.get("path", "")).startswith(relative + "/"))
        return f"{path}: class folder {relative!r} of the reconstruction {folder}: {inside} image(s)"
    if path.name == RECON_SAMPLES:
        return f"{path}: the sample list of a reconstruction, {len(records)} images\n" + indent(
            first_line(describe_recon(folder)))
    record = next((r for r in records if r.get("path") == relative), None)
    if record is None:
        return f"{path}: a file inside the reconstruction {folder} that {RECON_SAMPLES} does not list"
    source = f", reconstructed from {record['source']}" if record.get("source") else ""
    return (f"{path}: reconstructed image of sample id {record['id']} (label {record.get('label')}, "
            f"{_image_size(path)}){source}")


def _image_size(path: Path) -> str:
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as image:
            return f"{image.width}x{image.height} {image.mode}"
    except (OSError, UnidentifiedImageError):
        return "not a readable image"


def describe_image(path: Path) -> str:
    return f"{path}: image, {_image_size(path)}, {file_size(path)} (not written by a dqk command)"


# --------------------------------------------------------------------------- DQ-V2


def _v2_items(folder: Path) -> list[dict]:
    path = folder / V2_ITEMS
    if not path.is_file():
        return []
    try:
        return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    except (OSError, UnicodeDecodeError, ValueError, RecursionError) as error:
        raise InputError(f"{str(path)!r} is not readable ({error})") from None


def describe_v2(folder: Path) -> str:
    summary = read_json(folder / V2_SUMMARY, "DQ-V2 summary")
    pool, subset, options = summary.get("pool", {}), summary.get("subset", {}), summary.get("options", {})
    originals, tobias = pool.get("originals", 0), pool.get("tobias", 0)
    lines = [
        f"{folder}: DQ-V2 output, pool of {originals} originals + {tobias} Tobias images "
        f"({pool.get('swapped')} with a swapped background); subset {subset.get('selected')} "
        f"({subset.get('originals')} originals, {subset.get('tobias')} Tobias)",
        f"  input: {summary.get('input', {}).get('kind')} {summary.get('input', {}).get('path')}",
        "  options: " + ", ".join(f"{key} {options[key]}" for key in (
            "mix", "bins", "ratio", "allocation", "grid", "mask_model", "model", "seed") if key in options),
    ]
    cells = [c for c in summary.get("cells", []) if isinstance(c, dict)]
    if cells:
        n_bins = max(c["bin"] for c in cells) + 1
        per_bin = np.zeros((2, n_bins), dtype=np.int64)
        for cell in cells:
            per_bin[0, cell["bin"]] += cell["selected_originals"] + cell["selected_tobias"]
            per_bin[1, cell["bin"]] += cell["originals"] + cell["tobias"]
        lines += count_table("bin", list(range(n_bins)), per_bin[0], per_bin[1])
        classes = sorted({c["class"] for c in cells if c["class"] is not None})
        if classes:
            selected = [sum(c["selected_originals"] + c["selected_tobias"] for c in cells if c["class"] == k)
                        for k in classes]
            totals = [sum(c["originals"] + c["tobias"] for c in cells if c["class"] == k) for k in classes]
            lines += count_table("class", classes, selected, totals)
    held = sorted(entry.name for entry in folder.iterdir())
    lines.append(f"  holds: {', '.join(held)}")
    return "\n".join(lines)


def describe_masks(path: Path) -> str:
    with np.load(path, allow_pickle=False) as archive:
        masks, meta = archive["masks"], _archive_meta(archive, path)
    foreground = float(masks.mean()) if masks.size else 0.0
    return (f"{path}: DQ-V2 foreground masks, {masks.shape[0]} images on a {masks.shape[1]}x{masks.shape[2]} grid "
            f"({foreground:.0%} of cells foreground)\n"
            f"  mask model: {meta.get('kind')} (input {meta.get('count')} images, {meta.get('input_fingerprint')})\n"
            "  reuse with dqk v2 --masks on the same images")


def describe_recipes(path: Path) -> str:
    with np.load(path, allow_pickle=False) as archive:
        base, partner, meta = archive["base"], archive["partner"], _archive_meta(archive, path)
    swapped = int((partner >= 0).sum())
    offset = meta.get("pool_offset")
    ids = f"pool ids {offset} to {offset + base.shape[0] - 1}" if isinstance(offset, int) and base.size else "none"
    return (f"{path}: DQ-V2 Tobias recipes, {base.shape[0]} images ({swapped} with a partner's background), {ids}\n"
            f"  grid {meta.get('grid')}, cell {meta.get('cell_px')} px, bg_prob {meta.get('bg_prob')}, "
            f"seed {meta.get('seed')}; every image is regenerated from base, partner and key")


def _archive_meta(archive, path: Path) -> dict:
    try:
        meta = json.loads(str(archive["meta"]))
    except (KeyError, ValueError, RecursionError):
        meta = None
    if not isinstance(meta, dict):
        raise InputError(f"{str(path)!r} has no readable meta entry")
    return meta


def _describe_v2_member(path: Path, folder: Path) -> str:
    summary = read_json(folder / V2_SUMMARY, "DQ-V2 summary")
    pool = summary.get("pool", {})
    originals, tobias = pool.get("originals", 0), pool.get("tobias", 0)
    relative = path.relative_to(folder).as_posix()
    if relative in ("pool_features.npy", "pool_labels.npy"):
        array = np.load(path, mmap_mode="r")
        what = "features" if relative == "pool_features.npy" else "labels"
        return (f"{path}: DQ-V2 pool {what}, shape {array.shape}, dtype {array.dtype}: rows 0 to {originals - 1} "
                f"the originals, then {tobias} Tobias images (recipe order)")
    items = _v2_items(folder)
    if relative == V2_ITEMS:
        kinds = [item.get("kind") for item in items]
        return (f"{path}: the DQ-V2 subset's items, {len(items)} samples ({kinds.count('original')} originals, "
                f"{kinds.count('tobias')} Tobias): pool id, kind, label, file and source or recipe")
    if relative == "subset":
        return (f"{path}: the DQ-V2 subset in the input's format, {len(items)} samples "
                f"(listed in {V2_ITEMS} of {folder})")
    inner = relative[len("subset/"):] if relative.startswith("subset/") else None
    if inner is not None and path.is_dir():
        count = sum(1 for item in items if str(item.get("file", "")).startswith(inner + "/"))
        return f"{path}: class folder {inner!r} of the DQ-V2 subset in {folder}: {count} sample(s)"
    item = next((i for i in items if i.get("file") == inner), None) if inner is not None else None
    if item is not None:
        if item.get("kind") == "tobias":
            origin = f"Tobias image of {item.get('base_file')} with the background of {item.get('partner_file')}"
        else:
            origin = f"original {item.get('source')}"
        return f"{path}: DQ-V2 subset sample, pool id {item['pool_id']}, label {item.get('label')}: {origin}"
    if inner is not None:
        return f"{path}: the DQ-V2 subset's data ({len(items)} samples, rows in {V2_ITEMS} order)"
    return f"{path}: a file of the DQ-V2 output {folder} (see its {V2_SUMMARY})"


FOLDER_DESCRIPTIONS: dict[str, Callable[[Path], str]] = {
    "run": describe_run,
    "features": lambda folder: describe_feature_set(open_feature_set(folder, use_labels=True)),
    "export": describe_export,
    "patches": describe_patch_store,
    "recon": describe_recon,
    "v2": describe_v2,
}

MEMBER_DESCRIPTIONS: dict[str, Callable[[Path, Path], str]] = {
    "export": _describe_export_member,
    "patches": _describe_store_member,
    "recon": _describe_recon_member,
    "v2": _describe_v2_member,
}
