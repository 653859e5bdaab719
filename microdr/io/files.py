"""Reading the user's files and writing ours: one clear error per failure, atomic writes.

Every output microDR writes goes through :func:`write_files`: a temporary file beside each
target, flushed to disk, then renamed over it, so a crash or a full disk leaves either the old
file or the new one, never a part.
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import secrets
import stat
from pathlib import Path

from ..errors import InputError

#: The name of a temporary file of :func:`write_files` (and of the output folder's lock), beside
#: the file it becomes: ``.<name>.<pid of the writer>.<8 hex digits>.tmp``.
TEMPORARY = re.compile(r"\.(?P<name>.+)\.(?P<pid>[1-9][0-9]{0,9})\.[0-9a-f]{8}\.tmp")


#: What a path that names no regular file names instead, as errors say it.
_NOT_FILES = (
    (stat.S_ISDIR, "a directory"),
    (stat.S_ISFIFO, "a named pipe (FIFO)"),
    (stat.S_ISCHR, "a character device"),
    (stat.S_ISBLK, "a block device"),
    (stat.S_ISSOCK, "a socket"),
)


def read_bytes(path: str | os.PathLike, max_bytes: int | None = None) -> bytes:
    """A regular file's contents; a missing or unreadable file, anything that is not a regular
    file (checked before opening it: a named pipe would block forever, a device never end), or
    a file of more than ``max_bytes`` raises :class:`InputError` naming ``str(path)``."""
    source = str(path)
    status = _status(path)
    if isinstance(status, str):
        raise InputError(source, "", status)
    if max_bytes is not None and status.st_size > max_bytes:
        raise InputError(
            source, "", f"{status.st_size:,} bytes: more than the limit of {max_bytes:,} bytes"
        )
    try:
        return Path(path).read_bytes()
    except OSError as error:
        raise InputError(source, "", f"cannot read: {error.strerror}") from None


def file_problem(path: Path) -> str | None:
    """Why ``path`` names no regular file that could be read (``"PATH: no such file"``, a
    folder, a device, a name the system refuses), or ``None``; for callers that report the
    problem where the path was written, such as a scene's mesh entry."""
    status = _status(path)
    return f"{path}: {status}" if isinstance(status, str) else None


def _status(path: str | os.PathLike) -> os.stat_result | str:
    """``os.stat(path)`` of a regular file, or why there is none (``"no such file"``)."""
    try:
        status = os.stat(path)
    except FileNotFoundError:
        return "no such file"
    except OSError as error:  # a name too long, a file used as a folder, a loop of links...
        return f"cannot read: {error.strerror}"
    except ValueError:  # a NUL character, which no file name can hold
        return "no such file"
    if stat.S_ISREG(status.st_mode):
        return status
    kind = next((name for test, name in _NOT_FILES if test(status.st_mode)), "no regular file")
    return f"is {kind}, not a file"


def read_text(path: str | os.PathLike, max_bytes: int | None = None) -> str:
    """A UTF-8 text file's contents; the problems of :func:`read_bytes`, or bytes that are not
    UTF-8, raise :class:`InputError` naming ``str(path)`` (and the line of the first bad byte).
    """
    source = str(path)
    data = read_bytes(path, max_bytes)
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as error:
        line_start = data.rfind(b"\n", 0, error.start) + 1
        line = data.count(b"\n", 0, error.start) + 1
        raise InputError(
            source,
            f"line {line}",
            f"not UTF-8 text (byte 0x{data[error.start]:02x} at byte {error.start - line_start + 1}"
            " of the line)",
        ) from None


def check_writable_folder(folder: Path) -> None:
    """Raise :class:`InputError` now if files could not be written into ``folder`` (created if
    missing): it, or the nearest part of its path that exists, is a file, or is not writable.

    Creates nothing; for runs that write only at their end, so that they fail at once instead.
    The words are those the write itself would fail with.
    """
    existing = next((p for p in (folder, *folder.parents) if os.path.lexists(p)), Path("."))
    if not os.path.isdir(existing):
        reason = errno.EEXIST if existing == folder else errno.ENOTDIR
        raise InputError(str(folder), "", f"cannot create folder: {os.strerror(reason)}")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise InputError(str(folder), "", f"cannot write: {os.strerror(errno.EACCES)}")


def check_writable_file(path: Path) -> None:
    """:func:`check_writable_folder` for ``path``'s folder, and raise if ``path`` is a folder."""
    check_writable_folder(path.parent)
    if path.is_dir():
        raise _is_a_folder(path)


def _is_a_folder(path: Path) -> InputError:
    return InputError(str(path), "", "cannot write: is a folder")


def remove_stale_temporaries(folder: Path) -> list[Path]:
    """Remove the temporary files in ``folder`` (:data:`TEMPORARY`) of processes that no longer
    exist, and return their paths: a process killed while writing leaves its own. For a run that
    holds the folder's lock, so that no live process can be about to rename one."""
    removed = []
    with contextlib.suppress(OSError):  # no folder, or not readable: nothing of ours there
        for entry in os.scandir(folder):
            match = TEMPORARY.fullmatch(entry.name)
            if match and not process_exists(int(match["pid"])) and entry.is_file():
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(entry.path)
                    removed.append(Path(entry.path))
    return removed


def process_exists(pid: int) -> bool:
    """Whether a process with id ``pid`` exists on this host (another user's counts); assumed
    where that cannot be asked."""
    if os.name != "posix":  # os.kill would end the process on Windows
        return True
    try:
        os.kill(pid, 0)  # signal 0: only asks whether the process exists
    except (ProcessLookupError, OverflowError):  # none has it, or none could
        return False
    except OSError:  # it exists, but is another user's
        return True
    return True


def write_files(files: dict[Path, bytes]) -> None:
    """Write every file atomically, and either all of them or (barring a crash) none.

    Each file's bytes first go to a temporary file beside it; only once all are on disk are
    they renamed over their targets, and a failure before that removes them again.
    """
    written: list[tuple[Path, Path]] = []
    try:
        for path, data in files.items():
            written.append((_write_temporary(path, data), path))
        for temporary, path in written:
            try:
                os.replace(temporary, path)
            except OSError as error:
                raise InputError(str(path), "", f"cannot write: {error.strerror}") from None
    finally:
        for temporary, _ in written:
            temporary.unlink(missing_ok=True)


def temporary_beside(path: Path) -> Path:
    """A new name :data:`TEMPORARY` for a temporary file of this process that becomes ``path``."""
    return path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")


def _write_temporary(path: Path, data: bytes) -> Path:
    """Write ``data`` to a new temporary file in ``path``'s folder (created if missing)."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise InputError(str(path.parent), "", f"cannot create folder: {error.strerror}") from None
    if path.is_dir():  # found now, before any file is renamed into place
        raise _is_a_folder(path)
    temporary = temporary_beside(path)
    try:
        # "x" never clobbers an existing file; the umask sets permissions as for any new file.
        with open(temporary, "xb") as handle:
            try:
                handle.write(data)
                # On disk before the rename, or a power cut can leave the name on a partial file.
                handle.flush()
                os.fsync(handle.fileno())
            except OSError:
                temporary.unlink(missing_ok=True)
                raise
    except OSError as error:
        raise InputError(str(path), "", f"cannot write: {error.strerror}") from None
    return temporary
