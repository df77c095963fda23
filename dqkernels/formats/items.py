"""Items: what a sample id names in an image folder (docs/method.md §3.5).

A sample id is a row of a feature set. For an image folder each row is an **item**: the image's
path relative to the folder (POSIX separators) and its size in bytes. This module holds

* the listing of an image folder, in torchvision ``ImageFolder`` order, with each file's size;
* the reader and writer of a feature set's ``items.jsonl`` (one item per line);
* the checks that keep item paths inside their root, and the resolution of an item to its file;
* the reader and writer of the manifest an export directory carries.

``items.jsonl`` holds one JSON object per line, ``{"path": "cat/001.png", "size": 1234}``.
The older form — one JSON string per line, the path alone, no size — is still read; its items
are then resolved by path without a size check.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Optional, Sequence

import numpy as np

from dqkernels.core.atomic import write_json, write_lines
from dqkernels.core.errors import InputError

# The extensions torchvision's ImageFolder reads (torchvision.datasets.folder.IMG_EXTENSIONS),
# matched case-insensitively.
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")

EXPORT_MANIFEST = "dqk_export.json"
EXPORT_FORMAT = "dqkernels.export"


@dataclass(frozen=True)
class Item:
    """One sample of an image folder.

    path: relative to the folder, POSIX separators, normalised (no ``.``/``..``/empty parts).
    size: the file's size in bytes, or None when it is not known (an older ``items.jsonl``).
    """

    path: str
    size: Optional[int] = None


@dataclass(frozen=True)
class ImageFolderListing:
    """Images of an ImageFolder tree in torchvision ``ImageFolder`` order.

    relative_paths: N paths relative to ``root`` (POSIX separators).
    sizes: (N,) int64 file sizes in bytes; -1 for a file whose size cannot be read (a broken
        link — feature extraction then skips it as unreadable).
    labels: (N,) int64 class index of each image (position of its class folder in class_names).
    class_names: sorted names of the class folders that hold at least one image.
    """

    root: Path
    relative_paths: list[str]
    sizes: np.ndarray
    labels: np.ndarray
    class_names: list[str]

    @property
    def items(self) -> list[Item]:
        """The N items (path and size; size None where it could not be read)."""
        return [
            Item(path, int(size) if size >= 0 else None)
            for path, size in zip(self.relative_paths, self.sizes.tolist())
        ]


def list_image_folder(root: str | os.PathLike) -> ImageFolderListing:
    """List an ImageFolder tree as ``torchvision.datasets.ImageFolder`` does.

    Classes are the sorted subfolders of ``root`` (links to folders included). Within a class the
    files come from ``sorted(os.walk(class_folder, followlinks=True))`` — directories ordered by
    their full path, each directory's files sorted by name — keeping names that end, in any case,
    with one of ``IMAGE_EXTENSIONS``; this is ``torchvision.datasets.folder.make_dataset``.
    Files directly in ``root`` are ignored, and so are class folders without images (torchvision
    refuses those). Raises InputError when no image is found.
    """
    root = Path(root)
    if not root.is_dir():
        raise InputError(f"image folder {str(root)!r} is not a directory")
    root_text = str(root)
    try:
        class_dirs = sorted(entry.name for entry in os.scandir(root_text) if entry.is_dir())
    except OSError as error:
        raise InputError(f"cannot list image folder {str(root)!r}: {error}") from None
    relative_paths: list[str] = []
    sizes: list[int] = []
    labels: list[int] = []
    class_names: list[str] = []
    for class_name in class_dirs:
        class_root = os.path.join(root_text, class_name)
        class_files = []
        for dir_path, _, file_names in sorted(os.walk(class_root, followlinks=True)):
            for file_name in sorted(file_names):
                if file_name.lower().endswith(IMAGE_EXTENSIONS):
                    path = os.path.join(dir_path, file_name)
                    class_files.append(path)
        if not class_files:
            continue
        for path in class_files:
            relative_paths.append(os.path.relpath(path, root_text).replace(os.sep, "/"))
            try:
                sizes.append(os.stat(path).st_size)
            except OSError:
                sizes.append(-1)
        labels.extend([len(class_names)] * len(class_files))
        class_names.append(class_name)
    if not relative_paths:
        raise InputError(
            f"image folder {str(root)!r} holds no images (expected class subfolders with "
            f"{', '.join(IMAGE_EXTENSIONS)} files)"
        )
    return ImageFolderListing(
        root,
        relative_paths,
        np.asarray(sizes, dtype=np.int64),
        np.asarray(labels, dtype=np.int64),
        class_names,
    )


# --------------------------------------------------------------------------- paths stay inside


def check_item_path(path: object, where: str) -> str:
    """Return ``path`` if it is a relative, normalised POSIX path that cannot leave its root.

    Refused (InputError naming ``where`` and the path): a non-string or empty path, an absolute
    path, a ``..`` component, an empty or ``.`` component (``a//b``, ``./a``, ``a/``), a NUL.
    """
    if not isinstance(path, str) or not path:
        raise InputError(f"{where}: item path must be a non-empty string, got {path!r}")
    if "\x00" in path:
        raise InputError(f"{where}: item path {path!r} contains a NUL character")
    if path.startswith("/"):
        raise InputError(f"{where}: item path {path!r} is absolute; item paths are relative to their root")
    parts = path.split("/")
    if ".." in parts:
        raise InputError(f"{where}: item path {path!r} has a '..' component and would leave its root")
    if any(part in ("", ".") for part in parts):
        raise InputError(f"{where}: item path {path!r} is not normalised (empty or '.' component)")
    return path


def resolve_item(root: Path, item: Item, where: str) -> Path:
    """The file ``item`` names under ``root``, resolved through links; InputError unless it is safe.

    root: the data root, already resolved (``Path.resolve()``).
    The item's path must pass :func:`check_item_path`, resolve (following every link) to a
    regular file inside ``root``, and have the recorded size when one is recorded.
    """
    check_item_path(item.path, where)
    resolved = Path(os.path.realpath(root / item.path))
    if not resolved.is_relative_to(root):
        raise InputError(f"{where}: item {item.path!r} is a link leading outside {str(root)!r} (to {str(resolved)!r})")
    try:
        status = resolved.stat()
    except OSError:
        raise InputError(f"{where}: item {item.path!r} is not found in {str(root)!r}") from None
    if not resolved.is_file():
        raise InputError(f"{where}: item {item.path!r} in {str(root)!r} is not a file")
    if item.size is not None and status.st_size != item.size:
        raise InputError(
            f"{where}: item {item.path!r} in {str(root)!r} has {status.st_size} bytes but {item.size} "
            "were recorded; the data changed since the features were extracted"
        )
    return resolved


def resolve_items(root: str | os.PathLike, items: Sequence[Item], ids: Iterable[int]) -> list[Path]:
    """Resolve ``items[id]`` for every id in ``ids`` under ``root`` (:func:`resolve_item`).

    Returns the resolved files in the order of ``ids``; the first item that cannot be resolved
    raises InputError naming its id and path.
    """
    resolved_root = Path(root).resolve()
    return [resolve_item(resolved_root, items[row], f"sample id {row}") for row in ids]


# --------------------------------------------------------------------------- items.jsonl


def item_line(item: Item) -> str:
    """One ``items.jsonl`` line (without the newline): ``{"path": ..., "size": ...}``."""
    return json.dumps({"path": item.path, "size": item.size})


def write_items(path: str | os.PathLike, items: Iterable[Item]) -> None:
    """Write ``items.jsonl`` (one :func:`item_line` per item) through a temporary file.

    Every path must pass :func:`check_item_path` (checked before anything is written).
    """
    items = list(items)
    for number, item in enumerate(items, start=1):
        check_item_path(item.path, f"item {number} for {str(path)!r}")
    write_lines(path, (item_line(item) for item in items))


def _parse_item(line: str, where: str) -> Item:
    try:
        value = json.loads(line)
    except (json.JSONDecodeError, RecursionError) as error:
        reason = "nested too deeply" if isinstance(error, RecursionError) else str(error)
        raise InputError(f"{where}: not a JSON item ({reason})") from None
    if isinstance(value, str):
        return Item(check_item_path(value, where))
    if not isinstance(value, dict) or set(value) - {"path", "size"} or "path" not in value:
        raise InputError(f"{where}: an item is a JSON object {{\"path\": ..., \"size\": ...}} or a path string")
    size = value.get("size")
    if size is not None and (isinstance(size, bool) or not isinstance(size, int) or size < 0):
        raise InputError(f"{where}: item size must be a non-negative integer or null, got {size!r}")
    return Item(check_item_path(value["path"], where), size)


def read_items(path: str | os.PathLike) -> list[Item]:
    """Read an ``items.jsonl`` (either form); InputError naming the file and line on any problem.

    Every path must pass :func:`check_item_path`, and no path may appear twice.
    """
    path = Path(path)
    try:
        text = path.read_bytes().decode("utf-8")
    except OSError as error:
        raise InputError(f"cannot read items file {str(path)!r}: {error}") from None
    except UnicodeDecodeError as error:
        raise InputError(f"items file {str(path)!r} is not UTF-8 text ({error})") from None
    lines = text.split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    items = []
    seen = set()
    for number, line in enumerate(lines, start=1):
        where = f"items file {str(path)!r}, line {number}"
        item = _parse_item(line, where)
        if item.path in seen:
            raise InputError(f"{where}: item {item.path!r} appears twice")
        seen.add(item.path)
        items.append(item)
    return items


# --------------------------------------------------------------------------- export manifest


def write_export_manifest(directory: str | os.PathLike, document: dict) -> None:
    """Write the manifest of an export into its (staging) ``directory``.

    document: ``format`` (EXPORT_FORMAT), ``kind``, ``source``, ``features_sidecar``,
    ``bins_file``, ``link``, ``count`` and ``samples`` — one record per exported sample with its
    ``id``, ``bin`` (None when no bins file was given), and per input kind its ``path`` and
    ``size`` (image folders), ``class`` (image folders) and ``label`` (when known).
    """
    write_json(Path(directory) / EXPORT_MANIFEST, document)


def read_export_manifest(directory: str | os.PathLike) -> dict:
    """The manifest of an export directory; InputError when it is missing or not one."""
    path = Path(directory) / EXPORT_MANIFEST
    try:
        document = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError) as error:
        reason = "nested too deeply" if isinstance(error, RecursionError) else str(error)
        raise InputError(f"cannot read export manifest {str(path)!r}: {reason}") from None
    if not isinstance(document, dict) or document.get("format") != EXPORT_FORMAT:
        raise InputError(f"{str(path)!r} is not a dqk export manifest")
    return document
