"""A frozen release as its readers find it under ``releases/<name>/``: the name and the
``current`` pointer, the checksum over SHA256SUMS, the manifest, and the views over the
snapshot. Making one is ``tasks/frozen_release.py``; exporting from one, ``tasks/export.py``.
"""

from __future__ import annotations

import hashlib
import io
import re
from collections.abc import Iterator
from contextlib import contextmanager

import duckdb
import pyarrow as pa
import pyarrow.parquet as pq

from schemas.catalog import TABLES
from schemas.release import (
    CHECKSUM_FILE,
    CURRENT,
    MANIFEST_FILE,
    NAME_PATTERN,
    RELEASES_DIR,
    SNAPSHOT_DIR,
    SUMS_FILE,
)
from tasks.audit import audit_view_sql
from tasks.catalog_query import memory_connection, open_catalog
from tasks.cohort import selection_sql
from tasks.zones import CATALOG_DB, Release


class FrozenReleaseError(RuntimeError):
    """A frozen release cannot be made or read as asked."""


class ReleaseNotFound(FrozenReleaseError, LookupError):
    """No frozen release of that name (or no ``current`` pointer) in the release."""


def release_dir(name: str) -> str:
    return f"{RELEASES_DIR}/{name}"


def check_name(name: str) -> str:
    """A release name is a path segment of letters, digits, '.', '_', '-'; never 'current'."""
    if not re.fullmatch(NAME_PATTERN, name) or name == CURRENT:
        raise FrozenReleaseError(f"release name {name!r} must match {NAME_PATTERN} and not be "
                                 f"{CURRENT!r}")
    return name


def is_frozen(release: Release, name: str) -> bool:
    return release.fs.exists(release.path(f"{release_dir(name)}/{CHECKSUM_FILE}"))


def resolve(release: Release, name: str) -> str:
    """The name of a frozen release: ``current`` follows the pointer; a release that is not
    frozen (absent, or its creation never finished) is ReleaseNotFound."""
    if name == CURRENT:
        pointer = release.read_bytes(f"{RELEASES_DIR}/{CURRENT}")
        if pointer is None:
            raise ReleaseNotFound("no frozen release yet: releases/current does not exist")
        name = pointer.decode().strip()
    check_name(name)
    if not is_frozen(release, name):
        raise ReleaseNotFound(f"no frozen release named {name!r}")
    return name


def sums_text(files: dict[str, bytes]) -> bytes:
    """``sha256sum`` lines over the files (relative path -> bytes), sorted by path."""
    return "".join(f"{hashlib.sha256(data).hexdigest()}  {path}\n"
                   for path, data in sorted(files.items())).encode()


def create_snapshot_views(con: duckdb.DuckDBPyConnection, release: Release, name: str) -> None:
    """Views of a frozen release: each table over its snapshot, ``selection``, ``audit``."""
    for table in TABLES:
        uri = release.uri(f"{release_dir(name)}/{SNAPSHOT_DIR}/{table}.parquet")
        con.execute(f"CREATE VIEW {table} AS SELECT * FROM read_parquet("
                    f"'{uri.replace(chr(39), chr(39) * 2)}')")
    con.execute(f"CREATE VIEW selection AS {selection_sql(con)}")
    con.execute(audit_view_sql(release, name))


def read_checksum(release: Release, name: str) -> str:
    data = release.read_bytes(f"{release_dir(name)}/{CHECKSUM_FILE}")
    if data is None:
        raise ReleaseNotFound(f"no frozen release named {name!r}")
    return data.decode().split()[1]


def read_manifest(release: Release, name: str) -> pa.Table:
    """Every DICOM file of the frozen release: path (inside the release), size, sha256."""
    data = release.read_bytes(f"{release_dir(name)}/{MANIFEST_FILE}")
    return pq.read_table(io.BytesIO(data))


def summed_problems(release: Release, name: str) -> list[str]:
    """Problems of a frozen release's checksum, SHA256SUMS, manifest, selection and snapshot
    (small files: cheap enough to check before every export)."""
    base = release_dir(name)
    problems = []
    sums = release.read_bytes(f"{base}/{SUMS_FILE}") or b""
    if hashlib.sha256(sums).hexdigest() != read_checksum(release, name):
        problems.append(f"{SUMS_FILE} does not match {CHECKSUM_FILE}")
    for line in sums.decode().splitlines():
        digest, relative = line.split("  ", 1)
        data = release.read_bytes(f"{base}/{relative}")
        if data is None or hashlib.sha256(data).hexdigest() != digest:
            problems.append(f"{relative}: missing or changed")
    return problems


@contextmanager
def open_frozen(release: Release, name: str) -> Iterator[duckdb.DuckDBPyConnection]:
    """A read-only connection to a frozen release's views (``current`` follows the pointer)."""
    name = resolve(release, name)
    with open_catalog(release, f"{release_dir(name)}/{CATALOG_DB}") as con:
        yield con


def frozen_connection(release: Release, name: str) -> duckdb.DuckDBPyConnection:
    """An in-memory connection with a frozen release's views, for reading and filtering."""
    con = memory_connection(release)
    create_snapshot_views(con, release, name)
    return con
