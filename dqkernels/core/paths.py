"""No input is ever an output: the check every command makes before it starts any work."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Collection, Mapping, Optional

from dqkernels.core.errors import InputError

PathArgument = Optional["str | os.PathLike"]


def _resolved(path: str | os.PathLike) -> Path:
    """The absolute path with every link resolved (components that do not exist yet are kept)."""
    return Path(os.path.realpath(os.path.abspath(os.fspath(path))))


def _identity(path: Path) -> Optional[tuple[int, int]]:
    """(device, inode) of an existing path, followed through links; None when it does not exist."""
    try:
        status = os.stat(path)
    except OSError:
        return None
    return status.st_dev, status.st_ino


def _same(first: Path, second: Path) -> bool:
    """The same file or directory: one resolved path, or one inode (hard links)."""
    if first == second:
        return True
    first_id = _identity(first)
    return first_id is not None and first_id == _identity(second)


def _inside(inner: Path, outer: Path) -> bool:
    """``inner`` lies below the directory ``outer`` (resolved paths; also through a hard-linked
    or bind-mounted copy of ``outer`` that is one of ``inner``'s existing ancestors)."""
    if outer in inner.parents:
        return True
    outer_id = _identity(outer)
    if outer_id is None or not os.path.isdir(outer):
        return False
    return any(_identity(parent) == outer_id for parent in inner.parents if parent != parent.parent)


def _named(label: str, given: dict) -> str:
    """``label 'path'`` with the path as the user gave it (made absolute, links not followed)."""
    return f"{label} {os.path.abspath(os.fspath(given[label]))!r}"


def refuse_overlap(
    inputs: Mapping[str, PathArgument],
    outputs: Mapping[str, PathArgument],
    *,
    folders: Collection[str] = (),
    shallow: Collection[str] = (),
) -> None:
    """Raise InputError, naming both paths, when writing ``outputs`` could change an input.

    inputs: {what the user calls it (e.g. "--features"): path} of everything the command reads;
        None entries are skipped. An input that is a directory is read whole (an image folder, a
        model directory), so no output may lie inside it — unless its name is in ``shallow``
        (a feature-set directory, whose named files are read and beside which outputs belong).
    outputs: {what: path} of everything the command writes, files and directories; None entries
        are skipped. Those named in ``folders`` are directories the command builds and puts in
        place whole, so no input may lie inside them either.

    Refused: an output that is an input (the same path once links are resolved, or the same
    file through a hard link), an output inside a directory input, an input or another output
    inside a folder output, and two outputs that are the same path. Messages show the paths as
    given. Call it before any work starts.
    """
    given = {**inputs, **outputs}
    resolved_inputs = {label: _resolved(path) for label, path in inputs.items() if path is not None}
    resolved_outputs = {label: _resolved(path) for label, path in outputs.items() if path is not None}
    for out_label, out_path in resolved_outputs.items():
        for in_label, in_path in resolved_inputs.items():
            if _same(out_path, in_path):
                raise InputError(
                    f"{_named(out_label, given)} is the same file as {_named(in_label, given)}; "
                    "an output must not overwrite an input"
                )
            if in_label not in shallow and in_path.is_dir() and _inside(out_path, in_path):
                raise InputError(
                    f"{_named(out_label, given)} lies inside {_named(in_label, given)}, which is "
                    "read as input; write it elsewhere"
                )
            if out_label in folders and _inside(in_path, out_path):
                raise InputError(
                    f"{_named(in_label, given)} lies inside {_named(out_label, given)}, which is "
                    "replaced as a whole; write it elsewhere"
                )
    labels = list(resolved_outputs)
    for position, first in enumerate(labels):
        for second in labels[position + 1:]:
            first_path, second_path = resolved_outputs[first], resolved_outputs[second]
            if _same(first_path, second_path):
                raise InputError(
                    f"{_named(first, given)} and {second} are the same path; give them different paths"
                )
            for folder, folder_path, other, other_path in (
                (first, first_path, second, second_path), (second, second_path, first, first_path)
            ):
                if folder in folders and _inside(other_path, folder_path):
                    raise InputError(
                        f"{_named(other, given)} lies inside {_named(folder, given)}, "
                        "which is replaced as a whole; write them to separate places"
                    )
