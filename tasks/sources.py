"""A source's parts as every step sees them: the objects of a work unit, and the one safe way to
open a source entry (never anything but a regular file inside the source: a FIFO would block,
a symlink could lead out).
"""

from __future__ import annotations

import errno
import os
import stat
from dataclasses import dataclass, field
from typing import BinaryIO

from fsspec.implementations.local import LocalFileSystem


@dataclass(frozen=True)
class UnitObject:
    """One object of a work unit as discovery listed it."""

    key: str
    size: int = 0
    problem: str | None = None  # why discovery already knows it cannot be read


@dataclass(frozen=True)
class WorkUnit:
    """The source objects one task reads: files under ``root`` (an fsspec URL or a local
    folder, with its storage options), zip archives among them read member by member."""

    root: str
    objects: tuple[UnitObject, ...]
    storage_options: dict = field(default_factory=dict)
    keyed_by_sop: str | None = None  # a PACS study: its objects get key <study>/<sop uid>


class Unusable(Exception):
    """An object that cannot be read; the message is its quarantine reason."""


def special_kind(mode: int) -> str:
    if stat.S_ISFIFO(mode):
        return "FIFO"
    if stat.S_ISSOCK(mode):
        return "socket"
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        return "device"
    return "special file"


def unreadable(err: OSError) -> str:
    return ("unreadable (permission denied)" if isinstance(err, PermissionError)
            else f"unreadable ({type(err).__name__})")


def _open_local(root: str, key: str) -> BinaryIO:
    """A source file opened for reading if it is (or links, inside ``root``, to) a regular
    file; else Unusable saying why. Never opens anything else (a FIFO would block)."""
    path = os.path.join(root, key)
    real_root = os.path.realpath(root)
    real = os.path.realpath(path)
    if os.path.commonpath([real, real_root]) != real_root:
        raise Unusable("symlink leads outside the source folder")
    try:
        mode = os.stat(real).st_mode
        if not stat.S_ISREG(mode):
            raise Unusable(f"not a regular file ({special_kind(mode)})")
        fd = os.open(real, os.O_RDONLY | os.O_NONBLOCK | os.O_NOFOLLOW)
    except FileNotFoundError:
        raise Unusable("file vanished during ingest") from None
    except OSError as err:
        if err.errno == errno.ELOOP:
            raise Unusable("symlink loop") from None
        raise Unusable(unreadable(err)) from None
    if not stat.S_ISREG(os.fstat(fd).st_mode):  # swapped between the look and the open
        os.close(fd)
        raise Unusable("not a regular file")
    return os.fdopen(fd, "rb")


def open_source(fs, root: str, key: str) -> BinaryIO:
    """A source object opened for reading; Unusable saying why it cannot be."""
    if isinstance(fs, LocalFileSystem):
        return _open_local(root, key)
    try:
        return fs.open(f"{root}/{key}", "rb")
    except FileNotFoundError:
        raise Unusable("file vanished during ingest") from None
    except OSError as err:
        raise Unusable(unreadable(err)) from None
