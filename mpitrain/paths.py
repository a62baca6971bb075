"""The paths a user names, checked before anything is read or written, in one place.

Every input is a regular file or a directory of the kind expected (a FIFO, a
device or a socket is refused: reading one may never end), existing and
readable; every output lies in a directory that exists and takes a file
(probed: created, written, removed), and an existing file is not replaced
unless the user said so (``overwrite``).  ``replace`` writes an output whole
or not at all: a temporary file in the same directory, renamed into place.

Standard library only: usable before numpy or MPI is loaded.  Errors are
``MpitrainError`` (``ConfigError`` where a parameter names the path), one line
naming the path and what is wrong.
"""
from __future__ import annotations

import errno
import os
import stat
import tempfile
from contextlib import contextmanager
from typing import Iterator, Optional

from .runtime import ConfigError, MpitrainError, literal

__all__ = ["kind_of", "input_file", "input_dir", "output_file", "output_dir", "replace",
           "reason"]


def kind_of(path: str) -> Optional[str]:
    """'file', 'directory', or what else ``path`` is ('a FIFO', 'a device'...); None if it
    does not exist.  Symbolic links are followed."""
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        return None
    except OSError as exc:  # ELOOP, EACCES on a parent...
        return f"unreachable ({reason(exc)})"
    if stat.S_ISREG(mode):
        return "file"
    if stat.S_ISDIR(mode):
        return "directory"
    for test, name in ((stat.S_ISFIFO, "a FIFO"), (stat.S_ISCHR, "a character device"),
                       (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket")):
        if test(mode):
            return name
    return "not a regular file"


def reason(exc: OSError) -> str:
    """One line: what an OS error means (``No space left on device (errno 28)``)."""
    if exc.errno:
        return f"{os.strerror(exc.errno)} (errno {exc.errno})"
    return str(exc) or type(exc).__name__


def _fail(message: str, param: Optional[str]) -> MpitrainError:
    if param:
        return ConfigError("{" + param + "} " + literal(message), [param])
    return MpitrainError(message)


def input_file(path: str, what: str = "file", param: Optional[str] = None) -> str:
    """``path``, a regular file that can be read; else the error naming it."""
    kind = kind_of(path)
    if kind is None:
        raise _fail(f"{path}: no such {what}", param)
    if kind != "file":
        shown = "a directory" if kind == "directory" else kind
        raise _fail(f"{path}: {shown}, not a {what} (a regular file)", param)
    if not os.access(path, os.R_OK):
        raise _fail(f"{path}: the {what} cannot be read (permission denied)", param)
    return path


def input_dir(path: str, what: str = "directory", param: Optional[str] = None) -> str:
    """``path``, a directory that can be read; else the error naming it."""
    kind = kind_of(path)
    if kind is None:
        raise _fail(f"{path}: no such {what}", param)
    if kind != "directory":
        raise _fail(f"{path}: {'a ' + kind if kind == 'file' else kind}, not a {what}", param)
    if not os.access(path, os.R_OK | os.X_OK):
        raise _fail(f"{path}: the {what} cannot be read (permission denied)", param)
    return path


def _probe(directory: str) -> None:
    """Create, write and remove a file in ``directory``: OSError if it takes none."""
    fd, probe = tempfile.mkstemp(prefix=".mpitrain-probe-", dir=directory)
    try:
        os.write(fd, b"mpitrain checks that this directory takes a file\n")
    finally:
        os.close(fd)
        os.remove(probe)


def output_file(path: str, what: str = "output", param: Optional[str] = None,
                overwrite: bool = False) -> str:
    """Check that ``path`` can be written: its directory exists and takes a file, and
    no file is there unless ``overwrite`` (never a directory, FIFO or device)."""
    kind = kind_of(path)
    if kind is not None and kind != "file":
        shown = "a directory" if kind == "directory" else kind
        raise _fail(f"{path}: {shown}; the {what} is written as a file there", param)
    if kind == "file" and not overwrite:
        raise _fail(f"{path}: already exists; the {what} would replace it (choose another "
                    "path, or overwrite)", param)
    parent = os.path.dirname(os.path.abspath(path))
    there = kind_of(parent)
    if there != "directory":
        raise _fail(f"{path}: the directory {parent} " + (
            "does not exist" if there is None else f"is {there}, not a directory")
            + f" (the {what} is written there)", param)
    try:
        _probe(parent)
    except OSError as exc:
        raise _fail(f"{path}: cannot write the {what} in {parent}: {reason(exc)}",
                    param) from None
    return path


def output_dir(path: str, what: str = "directory", param: Optional[str] = None) -> str:
    """Check that ``path`` is, or can be made, a directory that takes files (made if
    missing; probed)."""
    kind = kind_of(path)
    if kind is not None and kind != "directory":
        raise _fail(f"{path}: {'a ' + kind if kind == 'file' else kind}, not a directory "
                    f"(the {what})", param)
    try:
        os.makedirs(path, exist_ok=True)
        _probe(path)
    except OSError as exc:
        raise _fail(f"{path}: cannot write the {what} there: {reason(exc)}", param) from None
    return path


@contextmanager
def replace(path: str, mode: str = "w") -> Iterator:
    """Write ``path`` whole or not at all: yields a file object on a temporary file in the
    same directory, renamed onto ``path`` once the block ends without an error (removed
    after an error)."""
    directory = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.tmp-", dir=directory)
    try:
        with os.fdopen(fd, mode) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.remove(tmp)
        except OSError:
            pass
        raise


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def is_disk_full(exc: BaseException) -> bool:
    """Whether ``exc`` says the disk or the quota is full."""
    return isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)
