"""A patch store: the kept patches of quantized images, stored compactly and read in batches.

A store is a directory of plain ``.npy`` arrays described by one JSON header, so every array can
be memory-mapped and a reader streams batches without loading the store:

* ``header.json`` — ``format: "dqkernels.patches"``, ``version``, ``geometry`` (image ``height``,
  ``width``, ``channels``, ``patch`` size in pixels), ``count`` (images N), ``patch_count``
  (stored patches T), ``bytes`` (``images``: N·H·W·C of the full uint8 images, ``patches``: T·P
  of the stored ones), ``class_names`` (image folders) and what the writer recorded about the
  source and the scoring; written last, so a directory with a header is complete;
* ``patches.npy`` — (T, P) uint8, P = patch·patch·channels, each patch in MAE's ``patchify``
  layout (row, column, channel within the patch);
* ``indices.npy`` — (T,) int32, the position of each stored patch in its image's row-major patch
  grid (``grid_h × grid_w`` = L), ascending within an image;
* ``offsets.npy`` — (N+1,) int64, image i owns stored patches ``offsets[i]:offsets[i+1]``
  (images may keep different numbers of patches);
* ``sample_ids.npy`` — (N,) int64, the dataset id of each image: the explicit map back to the
  data set, never derived from file names;
* ``labels.npy`` — (N,) int64 class indices, when known;
* ``items.jsonl`` — image folders only: each image's path relative to the folder, one JSON string
  per line.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Optional, Sequence

import numpy as np

from dqkernels.core.atomic import staged_directory
from dqkernels.core.errors import InputError

STORE_FORMAT = "dqkernels.patches"
STORE_VERSION = 1
HEADER_FILE = "header.json"
PATCHES_FILE = "patches.npy"
INDICES_FILE = "indices.npy"
OFFSETS_FILE = "offsets.npy"
SAMPLE_IDS_FILE = "sample_ids.npy"
LABELS_FILE = "labels.npy"
ITEMS_FILE = "items.jsonl"


@dataclass(frozen=True)
class PatchGeometry:
    """Images of ``height × width`` pixels and ``channels`` channels cut into square patches."""

    height: int
    width: int
    patch: int
    channels: int = 3

    def __post_init__(self):
        for name in ("height", "width", "patch", "channels"):
            value = getattr(self, name)
            if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < 1:
                raise InputError(f"{name} must be a positive integer, got {value!r}")
        if self.height % self.patch or self.width % self.patch:
            raise InputError(
                f"image size {self.height}x{self.width} is not a multiple of the patch size {self.patch}"
            )

    @property
    def grid(self) -> tuple[int, int]:
        """Patches per column and per row: (grid_h, grid_w)."""
        return self.height // self.patch, self.width // self.patch

    @property
    def num_patches(self) -> int:
        """Patches per image L = grid_h · grid_w."""
        return (self.height // self.patch) * (self.width // self.patch)

    @property
    def patch_values(self) -> int:
        """Values per patch P = patch · patch · channels."""
        return self.patch * self.patch * self.channels

    def as_dict(self) -> dict:
        return {"height": self.height, "width": self.width, "channels": self.channels, "patch": self.patch}


def patchify(images, patch: int):
    """(N, H, W, C) images → (N, L, patch·patch·C) patches, row-major grid, MAE's patch layout.

    Works on numpy arrays and torch tensors alike (any dtype); H and W must be multiples of patch.
    """
    count, height, width, channels = images.shape
    grid_h, grid_w = height // patch, width // patch
    blocks = images.reshape(count, grid_h, patch, grid_w, patch, channels).swapaxes(2, 3)
    return blocks.reshape(count, grid_h * grid_w, patch * patch * channels)


def unpatchify(patches, geometry: PatchGeometry):
    """(N, L, P) patches → (N, H, W, C) images; the inverse of :func:`patchify` (numpy or torch)."""
    grid_h, grid_w = geometry.grid
    patch, channels = geometry.patch, geometry.channels
    blocks = patches.reshape(patches.shape[0], grid_h, grid_w, patch, patch, channels).swapaxes(2, 3)
    return blocks.reshape(patches.shape[0], geometry.height, geometry.width, channels)


@dataclass
class PatchBatch:
    """Images of a store, dense: every patch slot present, the dropped ones zero.

    rows: (B,) int64 positions of the images in the store.
    sample_ids: (B,) int64 dataset ids. labels: (B,) int64 or None.
    patches: (B, L, P) uint8 in MAE's patch layout; dropped patches are 0.
    keep_mask: (B, L) bool, True where the patch was kept.
    geometry: the images' :class:`PatchGeometry`.
    """

    rows: np.ndarray
    sample_ids: np.ndarray
    labels: Optional[np.ndarray]
    patches: np.ndarray
    keep_mask: np.ndarray
    geometry: PatchGeometry

    def __len__(self) -> int:
        return int(self.rows.shape[0])

    def images(self) -> np.ndarray:
        """(B, H, W, C) uint8 images with the dropped patches black."""
        return unpatchify(self.patches, self.geometry)


def check_empty_destination(path: str | os.PathLike, what: str) -> Path:
    """Raise ValueError unless ``path`` is missing or an empty directory; returns it as a Path."""
    path = Path(path)
    if path.exists() and (not path.is_dir() or any(path.iterdir())):
        raise InputError(f"{what} {str(path)!r} already exists and is not empty")
    return path


class PatchStoreWriter:
    """Write a store batch by batch into a staging directory that replaces ``out_dir`` on close
    (:func:`dqkernels.core.atomic.staged_directory`).

    out_dir: the store directory; must be missing or empty.
    geometry: the images' size and patch size.
    count: images N that will be appended. patch_count: patches T they keep in total.
    class_names: names of the label indices (image folders), or None.
    meta: extra header entries (e.g. ``source``, ``scoring``).

    Use as a context manager: on an exception the staging directory is removed and nothing
    appears at ``out_dir``.
    """

    def __init__(self, out_dir: str | os.PathLike, geometry: PatchGeometry, count: int, patch_count: int,
                 *, class_names: Optional[Sequence[str]] = None, meta: Optional[dict] = None):
        self.out_dir = check_empty_destination(out_dir, "patch store")
        self.geometry = geometry
        self.count = int(count)
        self.patch_count = int(patch_count)
        self.class_names = list(class_names) if class_names is not None else None
        self.meta = dict(meta or {})
        self.out_dir.parent.mkdir(parents=True, exist_ok=True)
        self._stage = staged_directory(self.out_dir)
        self.staging = self._stage.__enter__()
        self._finished = False  # set by close() and abort()
        try:
            self._patches = np.lib.format.open_memmap(
                self.staging / PATCHES_FILE, mode="w+", dtype=np.uint8, shape=(self.patch_count, geometry.patch_values)
            )
            self._indices = np.lib.format.open_memmap(
                self.staging / INDICES_FILE, mode="w+", dtype=np.int32, shape=(self.patch_count,)
            )
        except BaseException:
            self.abort()
            raise
        self._offsets = np.zeros(self.count + 1, dtype=np.int64)
        self._sample_ids = np.empty(self.count, dtype=np.int64)
        self._labels = np.empty(self.count, dtype=np.int64)
        self._items: list[str] = []
        self._with_labels: Optional[bool] = None  # fixed by the first batch
        self._with_items: Optional[bool] = None
        self._images_written = 0

    def __enter__(self) -> "PatchStoreWriter":
        return self

    def __exit__(self, exc_type, exc, traceback) -> None:
        if self._finished:
            return
        if exc_type is None:
            self.close()
        else:
            self.abort()

    def append(self, images: np.ndarray, keep_mask: np.ndarray, sample_ids: np.ndarray,
               labels: Optional[np.ndarray] = None, items: Optional[Sequence[str]] = None) -> None:
        """Store the kept patches of a batch.

        images: (B, H, W, C) uint8. keep_mask: (B, L) bool, True = keep.
        sample_ids: (B,) integer dataset ids. labels: (B,) integer class indices, given for every
        batch or none. items: B relative image paths, given for every batch or none.
        """
        images = np.asarray(images)
        keep_mask = np.asarray(keep_mask)
        geometry = self.geometry
        expected = (geometry.height, geometry.width, geometry.channels)
        if images.dtype != np.uint8 or images.ndim != 4 or images.shape[1:] != expected:
            raise InputError(
                f"images must be uint8 of shape (B, {', '.join(map(str, expected))}), "
                f"got {images.dtype} {images.shape}"
            )
        batch = images.shape[0]
        if keep_mask.dtype != np.bool_ or keep_mask.shape != (batch, geometry.num_patches):
            raise InputError(
                f"keep_mask must be bool of shape ({batch}, {geometry.num_patches}), "
                f"got {keep_mask.dtype} {keep_mask.shape}"
            )
        sample_ids = _as_int64(sample_ids, (batch,), "sample_ids")
        if labels is not None:
            labels = _as_int64(labels, (batch,), "labels")
        if items is not None and len(items) != batch:
            raise InputError(f"items must name {batch} images, got {len(items)}")
        if self._with_labels is not None and (labels is not None) != self._with_labels:
            raise InputError("labels must be given for every batch or for none")
        if self._with_items is not None and (items is not None) != self._with_items:
            raise InputError("items must be given for every batch or for none")
        start = self._images_written
        if start + batch > self.count:
            raise InputError(f"the store was opened for {self.count} images; {start + batch} appended")
        kept_rows, kept_slots = np.nonzero(keep_mask)  # row-major: per image, ascending slots
        first = int(self._offsets[start])
        last = first + kept_rows.shape[0]
        if last > self.patch_count:
            raise InputError(f"the store was opened for {self.patch_count} patches; {last} appended")

        self._with_labels, self._with_items = labels is not None, items is not None
        self._patches[first:last] = patchify(images, geometry.patch)[kept_rows, kept_slots]
        self._indices[first:last] = kept_slots
        self._offsets[start + 1 : start + batch + 1] = first + np.cumsum(keep_mask.sum(axis=1))
        self._sample_ids[start : start + batch] = sample_ids
        if labels is not None:
            self._labels[start : start + batch] = labels
        if items is not None:
            self._items.extend(str(item) for item in items)
        self._images_written += batch

    def close(self) -> Path:
        """Check that everything announced was appended, write the header and move the store in place."""
        if self._images_written != self.count or self._offsets[-1] != self.patch_count:
            self.abort()
            raise InputError(
                f"the store was opened for {self.count} images and {self.patch_count} patches; got "
                f"{self._images_written} images and {int(self._offsets[self._images_written])} patches"
            )
        self._patches.flush()
        self._indices.flush()
        self._patches = self._indices = None  # closes the memory maps
        files = {"patches": PATCHES_FILE, "indices": INDICES_FILE, "offsets": OFFSETS_FILE,
                 "sample_ids": SAMPLE_IDS_FILE}
        np.save(self.staging / OFFSETS_FILE, self._offsets)
        np.save(self.staging / SAMPLE_IDS_FILE, self._sample_ids)
        if self._with_labels:
            np.save(self.staging / LABELS_FILE, self._labels)
            files["labels"] = LABELS_FILE
        if self._with_items:
            with open(self.staging / ITEMS_FILE, "w", encoding="utf-8") as handle:
                handle.writelines(json.dumps(item) + "\n" for item in self._items)
            files["items"] = ITEMS_FILE
        geometry = self.geometry
        header = {
            "format": STORE_FORMAT,
            "version": STORE_VERSION,
            "geometry": geometry.as_dict(),
            "count": self.count,
            "patch_count": self.patch_count,
            "num_patches": geometry.num_patches,
            "bytes": {
                "images": self.count * geometry.height * geometry.width * geometry.channels,
                "patches": self.patch_count * geometry.patch_values,
            },
            "class_names": self.class_names,
            "files": files,
            **self.meta,
        }
        (self.staging / HEADER_FILE).write_text(json.dumps(header, indent=2) + "\n", encoding="utf-8")
        self._finished = True
        self._stage.__exit__(None, None, None)  # swaps the store in (an empty directory there is replaced)
        return self.out_dir

    def abort(self) -> None:
        """Discard everything written so far."""
        self._patches = self._indices = None
        self._finished = True
        discarded = InputError(f"patch store {str(self.out_dir)!r} was not completed")
        self._stage.__exit__(InputError, discarded, None)  # removes the staging directory


def _as_int64(values, shape: tuple, name: str) -> np.ndarray:
    array = np.asarray(values)
    if array.shape != shape or not np.issubdtype(array.dtype, np.integer):
        raise InputError(f"{name} must be integers of shape {shape}, got {array.dtype} {array.shape}")
    return array.astype(np.int64)


def write_patch_store(out_dir: str | os.PathLike, images: np.ndarray, keep_mask: np.ndarray,
                      sample_ids: np.ndarray, *, patch: int, labels: Optional[np.ndarray] = None,
                      items: Optional[Sequence[str]] = None, class_names: Optional[Sequence[str]] = None,
                      meta: Optional[dict] = None) -> Path:
    """Write a whole store at once (see :class:`PatchStoreWriter.append` for the arrays)."""
    images = np.asarray(images)
    if images.ndim != 4:
        raise InputError(f"images must be (N, H, W, C) uint8, got shape {images.shape}")
    geometry = PatchGeometry(images.shape[1], images.shape[2], patch, images.shape[3])
    keep_mask = np.asarray(keep_mask)
    with PatchStoreWriter(out_dir, geometry, images.shape[0], int(keep_mask.sum()),
                          class_names=class_names, meta=meta) as writer:
        writer.append(images, keep_mask, sample_ids, labels, items)
    return Path(out_dir)


class PatchStore:
    """Read a store written by :class:`PatchStoreWriter`; patches stay memory-mapped.

    header: the parsed ``header.json``. geometry: :class:`PatchGeometry`.
    sample_ids: (N,) int64. labels: (N,) int64 or None. items: N relative paths or None.
    class_names: names of the label indices, or None. keep_counts: (N,) int64 patches kept per image.
    """

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        header_path = self.path / HEADER_FILE
        if not self.path.is_dir():
            raise InputError(f"patch store {str(self.path)!r} is not a directory")
        try:
            header = json.loads(header_path.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError, UnicodeDecodeError) as error:
            raise InputError(f"{str(self.path)!r} is not a patch store: cannot read {HEADER_FILE} ({error})") from None
        if not isinstance(header, dict) or header.get("format") != STORE_FORMAT:
            raise InputError(f"{str(header_path)!r} is not a {STORE_FORMAT} header")
        if header.get("version") != STORE_VERSION:
            raise InputError(f"patch store {str(self.path)!r} has version {header.get('version')!r}; "
                             f"this library reads version {STORE_VERSION}")
        self.header = header
        self.geometry = PatchGeometry(**header["geometry"])
        count, patch_count = int(header["count"]), int(header["patch_count"])
        files = header["files"]
        self._patches = self._array(files["patches"], (patch_count, self.geometry.patch_values), np.uint8, mmap=True)
        self._indices = self._array(files["indices"], (patch_count,), np.int32, mmap=True)
        self._offsets = self._array(files["offsets"], (count + 1,), np.int64)
        self.sample_ids = self._array(files["sample_ids"], (count,), np.int64)
        self.labels = self._array(files["labels"], (count,), np.int64) if "labels" in files else None
        self.items = self._read_items(files["items"], count) if "items" in files else None
        self.class_names = header.get("class_names")
        self.keep_counts = np.diff(self._offsets)
        if self._offsets[0] != 0 or self._offsets[-1] != patch_count or np.any(self.keep_counts < 0):
            raise InputError(f"{str(self.path / files['offsets'])!r} does not partition the {patch_count} patches")

    def _array(self, name: str, shape: tuple, dtype, mmap: bool = False) -> np.ndarray:
        path = self.path / name
        try:
            array = np.load(path, mmap_mode="r" if mmap else None)
        except (OSError, ValueError, EOFError) as error:
            raise InputError(f"patch store file {str(path)!r} is missing or unreadable ({error})") from None
        if array.shape != shape or array.dtype != dtype:
            raise InputError(f"patch store file {str(path)!r} holds {array.dtype} {array.shape}, "
                             f"expected {np.dtype(dtype)} {shape}")
        return array

    def _read_items(self, name: str, count: int) -> list[str]:
        path = self.path / name
        try:
            with open(path, encoding="utf-8") as handle:
                items = [json.loads(line) for line in handle]
        except (OSError, json.JSONDecodeError, UnicodeDecodeError) as error:
            raise InputError(f"patch store file {str(path)!r} is missing or unreadable ({error})") from None
        if len(items) != count:
            raise InputError(f"patch store file {str(path)!r} names {len(items)} images, expected {count}")
        return items

    def __len__(self) -> int:
        return int(self.sample_ids.shape[0])

    def stored_bytes(self) -> int:
        """Size on disk of every file of the store, header included."""
        return sum(entry.stat().st_size for entry in self.path.iterdir() if entry.is_file())

    def batch(self, rows) -> PatchBatch:
        """The images at store positions ``rows`` (a sequence of ints or a slice), dense."""
        rows = np.arange(len(self))[rows] if isinstance(rows, slice) else np.asarray(rows, dtype=np.int64)
        if rows.ndim != 1 or (rows.size and (rows.min() < 0 or rows.max() >= len(self))):
            raise InputError(f"rows must be positions in [0, {len(self)}), got {rows!r}")
        starts, counts = self._offsets[rows], self.keep_counts[rows]
        image_of = np.repeat(np.arange(rows.shape[0]), counts)
        # stored patch numbers of every requested image, concatenated without a Python loop
        local = np.arange(image_of.shape[0]) - np.repeat(np.cumsum(counts) - counts, counts)
        stored = starts[image_of] + local
        if rows.size and np.all(np.diff(rows) == 1):
            first = int(starts[0])
            patches = np.asarray(self._patches[first : first + stored.shape[0]])
            slots = np.asarray(self._indices[first : first + stored.shape[0]])
        else:
            patches, slots = self._patches[stored], self._indices[stored]
        geometry = self.geometry
        dense = np.zeros((rows.shape[0], geometry.num_patches, geometry.patch_values), dtype=np.uint8)
        keep_mask = np.zeros((rows.shape[0], geometry.num_patches), dtype=bool)
        dense[image_of, slots] = patches
        keep_mask[image_of, slots] = True
        return PatchBatch(
            rows=rows,
            sample_ids=self.sample_ids[rows],
            labels=self.labels[rows] if self.labels is not None else None,
            patches=dense,
            keep_mask=keep_mask,
            geometry=geometry,
        )

    def batches(self, batch_size: int) -> Iterator[PatchBatch]:
        """Stream the store in order, ``batch_size`` images at a time."""
        if not isinstance(batch_size, int) or batch_size < 1:
            raise InputError(f"batch_size must be a positive integer, got {batch_size!r}")
        for start in range(0, len(self), batch_size):
            yield self.batch(slice(start, start + batch_size))
