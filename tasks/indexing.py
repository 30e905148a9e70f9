"""Indexing: open each source object once and hand its bytes, with what the index records about
it, to the one pass that does everything else with them.

A work unit is what one Dask task takes: a folder's files (a few dozen at most), the zip
archives of one exam, or one PACS study's received files. ``read_unit`` opens each object once;
zip members are streamed out of their archive once, never staged. An object that cannot be read
(no regular file, vanished, a zip bomb...) comes out with the reason and no bytes.
"""

from __future__ import annotations

import hashlib
import lzma
import os
import re
import zipfile
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from pathlib import PurePosixPath
from typing import BinaryIO

import fsspec
from fsspec.implementations.local import LocalFileSystem

from tasks.sources import UnitObject, Unusable, WorkUnit, open_source, unreadable

MAX_MEMBER_BYTES = 4 << 30
MAX_COMPRESSION_RATIO = 200
UNIT_FILES = 32  # files of a folder source one task takes at most
UNIT_BYTES = 32 << 20  # and bytes
ZIP_NAME = re.compile(
    r"^(?P<patient>[^_]+)_(?P<time>\d{8}-\d{6})_(?P<exam>[^_]+)_(?P<description>.+)\.zip$",
    re.IGNORECASE,
)


@dataclass(frozen=True)
class SourceRead:
    """One object's bytes (None when they cannot be read, then ``problem`` says why) and
    what the index records about where it came from."""

    key: str
    data: bytes | None
    size: int
    sha256: str | None
    problem: str | None = None
    local_path: str | None = None
    exam: dict = field(default_factory=dict)  # exam_id, exam_time, exam_description, member_path


def object_id(key: str) -> str:
    """The opaque id of a source object in the private zone (its outputs, its quarantine copy):
    fixed by its key, so every run names it alike, and never the key itself."""
    return "o" + hashlib.sha256(key.encode("utf-8", "backslashreplace")).hexdigest()[:20]


def exam_of(zip_key: str) -> dict:
    """The exam a tip-sheet zip name describes (``patient_time_exam_description.zip``)."""
    match = ZIP_NAME.match(zip_key.rsplit("/", 1)[-1])
    if not match:
        return {}
    return {"exam_id": match["exam"], "exam_time": match["time"],
            "exam_description": match["description"]}


def folder_units(root: str, objects: list[UnitObject], storage_options: dict,
                 max_files: int = UNIT_FILES, max_bytes: int = UNIT_BYTES) -> list[WorkUnit]:
    """Files of a folder source in units of at most ``max_files`` files and ``max_bytes``
    (one bigger file alone), one folder's files together (a study's files usually share one):
    small enough that the workers share a batch evenly and hold little at a time."""
    by_folder: dict[str, list[UnitObject]] = {}
    for obj in objects:
        by_folder.setdefault(str(PurePosixPath(obj.key).parent), []).append(obj)
    units = []
    for files in by_folder.values():
        unit: list[UnitObject] = []
        size = 0
        for obj in files:
            if unit and (len(unit) == max_files or size + obj.size > max_bytes):
                units.append(WorkUnit(root, tuple(unit), storage_options))
                unit, size = [], 0
            unit.append(obj)
            size += obj.size
        if unit:
            units.append(WorkUnit(root, tuple(unit), storage_options))
    return units


def zip_units(root: str, objects: list[UnitObject], storage_options: dict) -> list[WorkUnit]:
    """Zip archives by the exam their names give, so the parts of an exam split in two are
    read by one task (which merges them before anything is written); files loose beside the
    archives, one unit each."""
    by_exam: dict[str, list[UnitObject]] = {}
    for obj in objects:
        exam = exam_of(obj.key).get("exam_id")
        by_exam.setdefault(f"exam:{exam}" if exam else f"key:{obj.key}", []).append(obj)
    return [WorkUnit(root, tuple(files), storage_options) for files in by_exam.values()]


def read_unit(unit: WorkUnit) -> Iterator[SourceRead]:
    """Every object of ``unit`` read once, in order; a zip archive yields its members. A PACS
    study's files are keyed ``<study uid>/<file>``: file names repeat from study to study."""
    fs, root = fsspec.core.url_to_fs(unit.root, **unit.storage_options)
    root = root.rstrip("/") or "/"
    for obj in unit.objects:
        if obj.problem:
            reads = [SourceRead(obj.key, None, obj.size, None, obj.problem)]
        else:
            reads = _read_object(fs, root, obj)
        for read in reads:
            yield (replace(read, key=f"{unit.keyed_by_sop}/{read.key}") if unit.keyed_by_sop
                   else read)


def _read_object(fs, root: str, obj: UnitObject) -> Iterator[SourceRead]:
    local = isinstance(fs, LocalFileSystem)
    try:
        with open_source(fs, root, obj.key) as fh:
            if fh.read(4) == b"PK\x03\x04":
                fh.seek(0)
                yield from _zip_members(fh, obj.key)
                return
            fh.seek(0)
            data = fh.read()
            path = os.path.realpath(os.path.join(root, obj.key)) if local else None
    except Unusable as err:
        yield SourceRead(obj.key, None, obj.size, None, str(err))
        return
    except FileNotFoundError:
        yield SourceRead(obj.key, None, obj.size, None, "file vanished during ingest")
        return
    except OSError as err:
        yield SourceRead(obj.key, None, obj.size, None, unreadable(err))
        return
    yield SourceRead(obj.key, data, len(data), hashlib.sha256(data).hexdigest(),
                     local_path=path)


def _zip_members(raw: BinaryIO, key: str) -> Iterator[SourceRead]:
    exam = exam_of(key)
    try:
        with zipfile.ZipFile(raw) as archive:
            infos = sorted((i for i in archive.infolist() if not i.is_dir()),
                           key=lambda i: i.filename)
            for info in infos:
                yield _member(archive, info, key, {**exam, "member_path": info.filename})
    except (zipfile.BadZipFile, EOFError, OSError, ValueError) as err:  # bad UTF-8 name
        yield SourceRead(key, None, 0, None, f"corrupt zip archive ({type(err).__name__})")


def _member(archive: zipfile.ZipFile, info: zipfile.ZipInfo, zip_key: str,
            exam: dict) -> SourceRead:
    key = f"{zip_key}!{info.filename}"
    if info.flag_bits & 0x1:
        return SourceRead(key, None, info.file_size, None, "encrypted zip entry", exam=exam)
    if info.file_size > MAX_MEMBER_BYTES:
        return SourceRead(key, None, info.file_size, None,
                          "zip entry larger than the size limit", exam=exam)
    if info.compress_size and info.file_size / info.compress_size > MAX_COMPRESSION_RATIO:
        return SourceRead(key, None, info.file_size, None,
                          "zip entry compression ratio too high (zip bomb)", exam=exam)
    try:
        with archive.open(info) as member:
            data = member.read(MAX_MEMBER_BYTES + 1)
    except (zipfile.BadZipFile, EOFError, OSError, RuntimeError, zlib.error,
            lzma.LZMAError) as err:  # a corrupt compressed stream raises zlib/lzma errors
        return SourceRead(key, None, info.file_size, None,
                          f"corrupt zip entry ({type(err).__name__})", exam=exam)
    return SourceRead(key, data, len(data), hashlib.sha256(data).hexdigest(), exam=exam)
