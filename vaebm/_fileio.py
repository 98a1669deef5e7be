"""Small file-system helpers shared by the readers and writers (no dependencies)."""

from __future__ import annotations

import os
import stat

__all__ = ["file_kind", "fsync_dir"]


def file_kind(mode: int) -> str:
    """What a ``st_mode`` that is not a regular file is, in words (for error messages)."""
    for test, name in ((stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a FIFO"),
                       (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"),
                       (stat.S_ISSOCK, "a socket")):
        if test(mode):
            return name
    return "not a regular file"


def fsync_dir(d: str) -> None:
    """fsync a folder so a rename inside it survives a crash (best effort: some systems, e.g.
    Windows, cannot open folders)."""
    try:
        fd = os.open(d, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
