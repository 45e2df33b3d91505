"""Atomic, durable writes shared by everything that writes a file or a folder (data, checkpoints, exports, reports).

Each write (a file: :func:`atomic_path`, :func:`write_text`, :func:`write_json`; a folder: :func:`atomic_dir`) goes
to a temporary name beside the target, is flushed to disk (fsync), gets the usual permissions
(``0666`` / ``0777`` minus the umask: ``mkstemp``, ``mkdtemp`` and safetensors make private ``0600`` files), and is
renamed over the target; the folder is then fsync'ed so the rename survives a power cut.

Example:
    >>> from pathlib import Path
    >>> import tempfile
    >>> target = Path(tempfile.mkdtemp()) / "a.json"
    >>> write_text(target, "{}")
    >>> target.read_text()
    '{}'
"""

from __future__ import annotations

import json
import os
import shutil
import stat
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any


def umask() -> int:
    """The process umask (from /proc where it is listed, so no other thread sees it change)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def usual_mode(path: Path) -> None:
    """Give a private file or folder (no group / other bits) the mode a plain ``open`` / ``mkdir`` would."""
    mode = stat.S_IMODE(path.lstat().st_mode)
    if path.is_symlink() or mode & 0o077:
        return
    full = 0o777 if path.is_dir() or mode & 0o100 else 0o666
    os.chmod(path, full & ~umask())


def fsync_file(path: Path) -> None:
    """Flush one file's data to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_dir(path: Path) -> None:
    """Flush a folder's entries (a rename into it) to disk; a no-op where folders cannot be opened."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def replace_file(tmp: str | os.PathLike, path: str | os.PathLike) -> None:
    """Move the finished temporary file ``tmp`` over ``path``: fsync, usual mode, rename, fsync the folder."""
    tmp, path = Path(tmp), Path(path)
    fsync_file(tmp)
    usual_mode(tmp)
    os.replace(tmp, path)
    fsync_dir(path.parent)


def temp_path(path: str | os.PathLike, suffix: str = ".tmp") -> Path:
    """A fresh hidden temporary name beside ``path`` (same folder, so the final rename is atomic)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=suffix, dir=path.parent)
    os.close(fd)
    return Path(name)


@contextmanager
def atomic_path(path: str | os.PathLike, suffix: str = ".tmp") -> Iterator[Path]:
    """A temporary name beside ``path`` to write to (by any library); on success it replaces ``path`` atomically.

    ``suffix`` keeps the extension a writer reads the format from (``".tmp.png"`` for ``savefig``). On an error
    the temporary file is removed and ``path`` is left as it was.

    Example:
        >>> with atomic_path(Path(tempfile.mkdtemp()) / "b.txt") as tmp:
        ...     _ = tmp.write_text("done")
    """
    tmp = temp_path(path, suffix)
    try:
        yield tmp
        replace_file(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically and durably."""
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def write_text(path: str | os.PathLike, text: str) -> None:
    """Write UTF-8 ``text`` to ``path`` atomically and durably (a lone surrogate, from a file name that is not
    UTF-8, is written as its ``\\udcXX`` escape, which JSON reads back as the same character)."""
    write_bytes(path, text.encode("utf-8", "backslashreplace"))


def write_json(path: str | os.PathLike, obj: Any, *, sort_keys: bool = False,
               default: Callable[[Any], Any] | None = None) -> None:
    """Write ``obj`` as indented UTF-8 JSON (one trailing newline) to ``path`` atomically and durably.

    ``sort_keys`` gives stable bytes (manifests); ``default`` (e.g. ``str``) turns values JSON lacks into text.
    """
    write_text(path, json.dumps(obj, indent=2, sort_keys=sort_keys, ensure_ascii=False, default=default) + "\n")


def replace_dir(src: Path, dst: Path) -> None:
    """Move folder ``src`` to ``dst``; an existing ``dst`` is moved aside first, so readers never see a half folder.

    Every file in ``src`` is fsync'ed and private files and folders get the usual permissions first.
    """
    src, dst = Path(src), Path(dst)
    for folder, dirs, files in os.walk(src):
        for name in files:
            file = Path(folder) / name
            if not file.is_symlink():
                fsync_file(file)
            usual_mode(file)
        for name in dirs:
            usual_mode(Path(folder) / name)
    usual_mode(src)
    if dst.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{dst.name}.old.", dir=dst.parent))
        os.replace(dst, old / "x")
        os.replace(src, dst)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(src, dst)
    fsync_dir(dst.parent)


@contextmanager
def atomic_dir(path: str | os.PathLike) -> Iterator[Path]:
    """A fresh temporary folder beside ``path`` to fill; on success it replaces ``path`` (:func:`replace_dir`).

    On an error the temporary folder is removed and ``path`` is left as it was. A block that finds it has nothing
    to publish after all (another process finished the same folder meanwhile) removes the temporary folder itself
    (``shutil.rmtree(tmp)``); ``path`` is then left as it is.

    Example:
        >>> with atomic_dir(Path(tempfile.mkdtemp()) / "export") as tmp:
        ...     _ = (tmp / "a.txt").write_text("done")
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    try:
        yield tmp
        if tmp.exists():
            replace_dir(tmp, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
