"""Outputs that appear whole or not at all.

Every file is written to a temporary name beside its target and renamed into place; a directory
output (a feature set, an export folder, a patch store) is built in a temporary directory beside
its target and swapped in with one rename (``renameat2(RENAME_EXCHANGE)`` where the kernel has it),
so a reader never sees a half-written output and a failed command leaves the previous one as it
was. Temporary names carry the writer's process id — ``.NAME.PID.XXXX.tmp`` — so the next write
to the same target removes what a killed writer left, and never what a live one is writing.

Created files and folders get the permissions the umask allows (``tempfile`` alone would make
them private to the owner).

``DQK_CRASH_AT_WRITE=k`` (tests only) kills the process with SIGKILL at the k-th commit point —
every point where a temporary output is complete but not yet in place, and right after it is —
so tests can check that every crash leaves a state the next run recovers from.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import errno
import json
import os
import shutil
import signal
import tempfile
import threading
from pathlib import Path
from typing import IO, Iterable, Iterator

import numpy as np

from dqkernels.core.errors import InputError

_UMASK_LOCK = threading.Lock()
_commit_points = 0


def current_umask() -> int:
    """The process umask (read by setting and restoring it, under a lock)."""
    with _UMASK_LOCK:
        mask = os.umask(0o022)
        os.umask(mask)
    return mask


def honour_umask(path: str | os.PathLike) -> None:
    """Give ``path`` the mode a plain ``open``/``mkdir`` would have: 0666/0777 minus the umask."""
    base = 0o777 if os.path.isdir(path) else 0o666
    os.chmod(path, base & ~current_umask())


def commit_point() -> None:
    """Count one commit point; the test hook ``DQK_CRASH_AT_WRITE=k`` dies at the k-th."""
    global _commit_points
    target = os.environ.get("DQK_CRASH_AT_WRITE")
    if not target:
        return
    _commit_points += 1
    if _commit_points == int(target):
        os.kill(os.getpid(), signal.SIGKILL)


def _temp_prefix(name: str) -> str:
    return f".{name}.{os.getpid()}."


def _writer_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def sweep_temporaries(target: str | os.PathLike) -> list[Path]:
    """Remove the temporaries that dead writers left for ``target``; returns what was removed."""
    target = Path(target)
    directory = target.parent if str(target.parent) else Path(".")
    removed = []
    prefix = f".{target.name}."
    try:
        entries = list(os.scandir(directory))
    except OSError:
        return removed
    for entry in entries:
        name = entry.name
        if not (name.startswith(prefix) and name.endswith(".tmp")):
            continue
        pid_text = name[len(prefix):].split(".", 1)[0]
        if not pid_text.isdigit() or _writer_alive(int(pid_text)):
            continue
        path = Path(entry.path)
        with contextlib.suppress(FileNotFoundError):
            if entry.is_dir(follow_symlinks=False):
                shutil.rmtree(path)
            else:
                path.unlink()
        removed.append(path)
    return removed


def _output_directory(target: Path) -> Path:
    directory = target.parent if str(target.parent) else Path(".")
    if not directory.is_dir():
        raise InputError(f"output directory does not exist: {directory}")
    return directory


@contextlib.contextmanager
def atomic_output(path: str | os.PathLike, mode: str = "wb") -> Iterator[IO]:
    """Open a temporary file beside ``path``; on success it replaces ``path`` in one rename.

    On any exception the temporary file is removed and ``path`` is left untouched.
    """
    target = Path(path)
    directory = _output_directory(target)
    sweep_temporaries(target)
    fd, tmp_name = tempfile.mkstemp(prefix=_temp_prefix(target.name), suffix=".tmp", dir=directory)
    try:
        with os.fdopen(fd, mode) as handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        honour_umask(tmp_name)
        commit_point()
        os.replace(tmp_name, target)
        commit_point()
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp_name)
        raise


_RENAME_EXCHANGE = 2
_AT_FDCWD = -100


def _renameat2():
    library = ctypes.util.find_library("c")
    if library is None:
        return None
    function = getattr(ctypes.CDLL(library, use_errno=True), "renameat2", None)
    if function is not None:
        function.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
        function.restype = ctypes.c_int
    return function


_RENAMEAT2 = _renameat2()


def _exchange(first: Path, second: Path) -> bool:
    """Swap two paths in one step; False where the system cannot (then the caller renames twice)."""
    if _RENAMEAT2 is None:
        return False
    status = _RENAMEAT2(_AT_FDCWD, os.fsencode(first), _AT_FDCWD, os.fsencode(second), _RENAME_EXCHANGE)
    if status == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP):
        return False
    raise OSError(code, os.strerror(code), str(second))


def replace_directory(staging: Path, target: Path) -> None:
    """Put the finished directory ``staging`` at ``target``, removing what ``target`` held.

    With an existing ``target`` the two are exchanged in one step where the system allows it,
    so ``target`` always names a complete output; the old one is then deleted.
    """
    commit_point()
    if not os.path.lexists(target):
        os.rename(staging, target)
        commit_point()
        return
    if not target.is_dir() or target.is_symlink():
        raise InputError(f"output {str(target)!r} exists and is not a directory")
    if _exchange(staging, target):
        commit_point()
        shutil.rmtree(staging)
        return
    retired = Path(tempfile.mkdtemp(prefix=_temp_prefix(target.name), suffix=".tmp", dir=target.parent))
    os.rename(target, retired / "old")
    os.rename(staging, target)
    commit_point()
    shutil.rmtree(retired)


@contextlib.contextmanager
def staged_directory(path: str | os.PathLike) -> Iterator[Path]:
    """Build a directory output in a temporary directory beside ``path``; yields that directory.

    On success the finished directory replaces ``path`` (:func:`replace_directory`); on any
    exception it is deleted and ``path`` is left as it was. The caller decides beforehand
    whether replacing an existing ``path`` is allowed.
    """
    target = Path(path)
    directory = _output_directory(target)
    sweep_temporaries(target)
    staging = Path(tempfile.mkdtemp(prefix=_temp_prefix(target.name), suffix=".tmp", dir=directory))
    try:
        honour_umask(staging)
        yield staging
        replace_directory(staging, target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def save_npy(path: str | os.PathLike, array: np.ndarray) -> None:
    """``np.save`` through a temporary file beside ``path`` (the name is kept, no '.npy' added)."""
    with atomic_output(path) as handle:
        np.save(handle, array)


def write_json(path: str | os.PathLike, document: dict) -> None:
    """Write ``document`` as indented UTF-8 JSON through a temporary file beside ``path``."""
    with atomic_output(path) as handle:
        handle.write((json.dumps(document, indent=2, ensure_ascii=False) + "\n").encode("utf-8"))


def write_lines(path: str | os.PathLike, lines: Iterable[str]) -> None:
    """Write UTF-8 text lines (each ending in a newline) through a temporary file beside ``path``."""
    with atomic_output(path) as handle:
        for line in lines:
            handle.write((line + "\n").encode("utf-8"))
