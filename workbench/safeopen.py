"""Open only regular files: never block on a FIFO, never read a device or directory,
optionally refuse symbolic links, and cap how much is read.

Every open is non-blocking (a FIFO with no writer would otherwise block ``open()``
forever), then checked with ``fstat`` on the descriptor actually opened (no race between
a ``stat`` and the ``open``), then switched back to blocking reads. Refusals are
:class:`NotRegularFileError`, an ``OSError`` whose ``strerror`` says what the path is, so
callers that already turn ``OSError`` into a one-line error naming the file keep working.
"""

from __future__ import annotations

import errno
import fcntl
import os
import stat
from typing import BinaryIO

PROMPT_FILE_CAP = 16 * 2**20  # bytes: the largest prompt file read (about 4M tokens of text)


class NotRegularFileError(OSError):
    """The path is a FIFO, device, socket, directory or (with ``follow=False``) a link."""


def kind_of(mode: int) -> str:
    """A plain-words name of a file type from an ``st_mode``."""
    for test, name in ((stat.S_ISREG, "a regular file"), (stat.S_ISDIR, "a directory"),
                       (stat.S_ISFIFO, "a FIFO"), (stat.S_ISLNK, "a symbolic link"),
                       (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"),
                       (stat.S_ISSOCK, "a socket")):
        if test(mode):
            return name
    return "not a regular file"


def open_regular(path: str | os.PathLike[str], follow: bool = True, dir_fd: int | None = None) -> BinaryIO:
    """``path`` opened for binary reading if it is a regular file.

    ``follow=False`` adds ``O_NOFOLLOW``: a symbolic link is refused (inside a cache
    directory, links are foreign files). Raises :class:`NotRegularFileError` for anything
    but a regular file, and the usual ``OSError`` when it cannot be opened.
    """
    flags = os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC | (0 if follow else os.O_NOFOLLOW)
    try:
        fd = os.open(path, flags, dir_fd=dir_fd)
    except OSError as err:
        if err.errno == errno.ELOOP and not follow:
            raise NotRegularFileError(errno.ELOOP, "is a symbolic link, not a regular file", os.fspath(path)) from None
        if err.errno == errno.ENXIO:  # a socket, or a FIFO opened for writing
            raise NotRegularFileError(errno.ENXIO, "is not a regular file", os.fspath(path)) from None
        raise
    try:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            raise NotRegularFileError(errno.EINVAL, f"is {kind_of(mode)}, not a regular file", os.fspath(path))
        fcntl.fcntl(fd, fcntl.F_SETFL, fcntl.fcntl(fd, fcntl.F_GETFL) & ~os.O_NONBLOCK)
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def read_capped(path: str | os.PathLike[str], cap: int) -> bytes:
    """All bytes of the regular file ``path``; ``OSError(EFBIG)`` when it holds more than
    ``cap`` bytes (checked on the size and again on what is read, as a file may grow)."""
    with open_regular(path) as f:
        size = os.fstat(f.fileno()).st_size
        data = f.read(cap + 1) if size <= cap else b""
        if size > cap or len(data) > cap:
            raise OSError(errno.EFBIG, f"is larger than the {cap / 2**20:g} MiB limit", os.fspath(path))
        return data
