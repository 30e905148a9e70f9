"""Open a release's catalog for SQL: ``catalog.duckdb`` and the Parquet its views name, read in
place, on local disk or in S3."""

from __future__ import annotations

import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import duckdb

from tasks.duckdb_remote import enable_remote_reads
from tasks.publish import CATALOG_DB, Release

# the views read one small Parquet file per batch and table: keep their footers between queries
CACHE_PARQUET_FOOTERS = "SET parquet_metadata_cache = true"


class NoCatalog(LookupError):
    """The release has no catalog.duckdb (no batch published there yet)."""


@contextmanager
def open_catalog(release: Release,
                 database: str = CATALOG_DB) -> Iterator[duckdb.DuckDBPyConnection]:
    """A read-only connection to the release's catalog views (or to the views file at
    ``database``, relative to the release, e.g. a frozen release's)."""
    if not release.fs.exists(release.path(database)):
        raise NoCatalog(f"no catalog at {release.url}/{database}: has a batch been "
                        "published there?")
    if release.local:
        with duckdb.connect(release.path(database), read_only=True) as con:
            con.execute(CACHE_PARQUET_FOOTERS)
            yield con
        return
    with tempfile.TemporaryDirectory(prefix="radrepo-catalog-") as folder:
        copy = Path(folder) / CATALOG_DB
        release.fs.get_file(release.path(database), str(copy))
        with duckdb.connect(str(copy), read_only=True) as con:
            con.execute(CACHE_PARQUET_FOOTERS)
            enable_remote_reads(con, release.storage_options)
            yield con
