"""Write a :class:`Report` as its schema-v1 JSON document, atomically.

"Atomically" means a reader of ``path`` sees either the previous file or the complete new
document, never a torn one: the bytes go to a temporary file in the same directory (so the
final rename never crosses a file system), are flushed and fsynced, and then replace the
target with ``os.replace``.  On any failure the temporary file is removed and whatever was at
``path`` before is left untouched.

The parent directory must already exist: creating directories is the caller's decision
(a typo in ``--output`` should be an error, not a new directory tree).

A symbolic link is followed: the file it points to is replaced, the link stays.  A target
that is not a regular file (``/dev/null``, a FIFO, a pipe) or is named in /dev or /proc
(``/dev/stdout``) is written through, as the shell's ``>>`` would: replacing it would put
a plain file where a device was, or throw away what the program printed.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import stat
from pathlib import Path

from ..attribution.report import Report

__all__ = ["ExportError", "export_json_async", "missing_directory", "report_path", "write_json", "writes_through"]


class ExportError(Exception):
    """A report could not be exported.  The message is one line naming the target and the
    reason; the underlying exception, if any, is chained as ``__cause__``."""


def write_json(report: Report, path: str | os.PathLike[str], *, indent: bool = False) -> Path:
    """Write ``report.to_json_bytes(indent=indent)`` to ``path`` atomically and return ``Path(path)``.

    Raises :class:`ExportError` if the parent directory is missing, the report cannot be
    serialised, or any write, fsync or rename fails.  In every failure case the previous
    file at ``path`` (if any) is left intact and no temporary file remains.
    """
    named = report_path(path)
    target, stream = _resolve(named)
    if stream:
        data = _serialise(report, named, indent)
        try:
            with open(target, "ab") as fh:  # ("a": a file behind /dev/stdout keeps what is in it)
                fh.write(data)
        except OSError as exc:
            raise _error(named, exc) from exc
        return named
    _check_parent(target, target.parent.is_dir())
    data = _serialise(report, target, indent)
    tmp = _temp_name(target)
    try:
        # "x": exclusive create, so we never clobber a stranger's file; the mode follows the
        # umask like any file the user creates (mkstemp would force 0600 on the report).
        with open(tmp, "xb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, target)
    except BaseException as exc:
        _discard(tmp)
        if isinstance(exc, OSError):
            raise _error(target, exc) from exc
        raise
    _fsync_dir(target.parent)
    return named


async def export_json_async(report: Report, path: str | os.PathLike[str], *, indent: bool = False) -> Path:
    """Asynchronous :func:`write_json`: the file I/O runs off the event loop (aiofiles).

    Same contract: returns ``Path(path)``; raises :class:`ExportError`; on failure the old
    file is intact and the temporary file is removed.  If the calling task is cancelled
    while the rename is in flight, ``path`` holds either the old or the new document.
    Serialising the report (orjson) runs on the loop thread; it is fast and needs the GIL
    anyway.
    """
    # Imported here, not with the package: aiofiles brings tempfile, shutil, bz2, lzma, ...
    # (~2,000 long-lived objects that every full collection of the profiled program walks)
    # into programs that never export asynchronously.
    import aiofiles
    import aiofiles.os

    named = report_path(path)
    loop = asyncio.get_running_loop()
    target, stream = await loop.run_in_executor(None, _resolve, named)
    if stream:  # (a FIFO's open waits for a reader: off the loop too)
        data = _serialise(report, named, indent)
        try:
            async with aiofiles.open(target, "ab") as fh:
                await fh.write(data)
        except OSError as exc:
            raise _error(named, exc) from exc
        return named
    _check_parent(target, await aiofiles.os.path.isdir(target.parent))
    data = _serialise(report, target, indent)
    tmp = _temp_name(target)
    # Made here, exclusively (one short system call on the loop thread), and opened below
    # without "create": an open still in flight in a worker thread when the task is
    # cancelled would otherwise make the file after the cleanup removed it.
    try:
        os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0), 0o666))
    except OSError as exc:
        raise _error(target, exc) from exc
    try:
        async with aiofiles.open(tmp, "r+b") as fh:
            await fh.write(data)
            await fh.flush()
            await loop.run_in_executor(None, os.fsync, fh.fileno())
        await aiofiles.os.replace(tmp, target)
    except BaseException as exc:
        # A plain unlink, not an await: cleanup must also happen while the task is being
        # cancelled, and a second cancellation could interrupt an awaited remove.
        _discard(tmp)
        if isinstance(exc, OSError):
            raise _error(target, exc) from exc
        raise
    await loop.run_in_executor(None, _fsync_dir, target.parent)
    return named


def report_path(path: str | os.PathLike[str]) -> Path:
    """``path`` as a Path, if it can name a report file: not empty, not a directory (a name
    ending in a slash means one, which Path would drop).  Raises :class:`ExportError`."""
    text = os.fspath(path)
    if isinstance(text, bytes):
        text = os.fsdecode(text)
    if not text.strip():
        raise ExportError("cannot write report to an empty path")
    named = Path(text)
    if text.endswith((os.sep, "/")) or named.name in ("", ".", "..") or named.is_dir():
        reason = "it is a directory" if named.is_dir() else "no such directory"
        raise ExportError(f"cannot write report to {text}: {reason}")
    return named


def _resolve(named: Path) -> tuple[Path, bool]:
    """Where the bytes for ``named`` go, and whether they are written through (not
    replaced): a device, FIFO or pipe, and a name in /dev or /proc (``/dev/stdout``, which
    may lead to the file the shell redirected stdout to: that file is appended to, not
    replaced, so what the program printed stays).  Otherwise the file a symbolic link
    points to is replaced, the link stays."""
    try:
        mode = os.stat(named).st_mode  # (follows /proc/self/fd/N to the pipe or file behind it)
    except OSError:  # nothing there yet (or unreadable: the write will say why)
        mode = None
    if mode is not None and not stat.S_ISDIR(mode) and (not stat.S_ISREG(mode) or _is_special_name(named)):
        return named, True
    return (Path(os.path.realpath(named)) if named.is_symlink() else named), False


def writes_through(path: str | os.PathLike[str]) -> bool:
    """Whether a report written to ``path`` goes through to what is there (a device, FIFO,
    pipe, /dev/stdout) instead of replacing it atomically."""
    return _resolve(Path(path))[1]


def _is_special_name(named: Path) -> bool:
    parts = Path(os.path.abspath(named)).parts
    return len(parts) > 1 and parts[1] in ("dev", "proc")


def missing_directory(parent: Path) -> str:
    """Why a report cannot go into ``parent``, which is not a directory: it is something
    else (a file named as if it were a directory), or nothing at all."""
    if os.path.lexists(parent):
        return f"{parent} is not a directory"
    return f"directory {parent} does not exist"


def _check_parent(target: Path, parent_is_dir: bool) -> None:
    if not parent_is_dir:
        raise ExportError(f"cannot write report to {target}: {missing_directory(target.parent)}")


def _serialise(report: Report, target: Path, indent: bool) -> bytes:
    try:
        return report.to_json_bytes(indent=indent)
    except (TypeError, ValueError) as exc:  # orjson.JSONEncodeError is a TypeError
        raise ExportError(f"cannot write report to {target}: report is not serialisable: {exc}") from exc
    except MemoryError as exc:
        raise ExportError(f"cannot write report to {target}: out of memory") from exc


def _temp_name(target: Path) -> Path:
    # Hidden, same directory (same file system, so os.replace is atomic), random suffix so
    # two concurrent exports to one path never share a temporary file.
    return target.with_name(f".{target.name}.{os.urandom(8).hex()}.tmp")


def _discard(tmp: Path) -> None:
    with contextlib.suppress(OSError):
        os.unlink(tmp)


def _fsync_dir(directory: Path) -> None:
    # Makes the rename itself durable on POSIX.  Best effort: the document is already complete
    # and in place, and some platforms or file systems cannot open or fsync a directory.
    with contextlib.suppress(OSError, AttributeError):
        fd = os.open(directory, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _error(target: Path, exc: OSError) -> ExportError:
    reason = exc.strerror or str(exc) or type(exc).__name__
    if isinstance(exc, (FileNotFoundError, NotADirectoryError)) and not target.parent.is_dir():
        reason = missing_directory(target.parent)
    return ExportError(f"cannot write report to {target}: {reason}")
