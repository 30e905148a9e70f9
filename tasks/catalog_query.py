"""A release's catalog for SQL: the views over its COMPLETE batches, and connections that read
``catalog.duckdb`` and the Parquet its views name in place, on local disk or in S3."""

from __future__ import annotations

import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import duckdb
import pyarrow as pa

from schemas.catalog import APPENDED_TABLES, PARTITION_COLUMNS, TABLES, VIEWS
from tasks.catalog_dictionary import comment_statements
from tasks.duckdb_remote import enable_remote_reads
from tasks.zones import CATALOG_DB, Release

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


def memory_connection(release: Release) -> duckdb.DuckDBPyConnection:
    """An in-memory DuckDB in UTC that can read the release's Parquet, to build views in."""
    con = duckdb.connect(":memory:")
    con.execute("SET TimeZone = 'UTC'")
    if not release.local:
        enable_remote_reads(con, release.storage_options)
    return con


def _view_sql(table: str, files: list[str], schema: pa.Schema | None = None) -> str:
    # the typed empty row set comes first: every view has the schema's columns, in its order
    # and types, even over batches written before a column was added (those read as NULL)
    columns = ", ".join(
        [f"CAST(NULL AS VARCHAR) AS {c}" for c in PARTITION_COLUMNS]
        + [f'CAST(NULL AS {_duck_type(f.type)}) AS "{f.name}"'
           for f in (schema or TABLES[table])]
    )
    empty = f"SELECT {columns} WHERE false"
    if not files:
        return f"CREATE VIEW {table} AS {empty}"
    listing = ", ".join("'" + f.replace("'", "''") + "'" for f in files)
    return (
        f"CREATE VIEW {table} AS {empty} UNION ALL BY NAME "
        f"SELECT * FROM read_parquet([{listing}], hive_partitioning = true, "
        "union_by_name = true, hive_types = {'site_id': 'VARCHAR', 'batch_id': 'VARCHAR'})"
    )


def _duck_type(t: pa.DataType) -> str:
    if pa.types.is_string(t):
        return "VARCHAR"
    if pa.types.is_int32(t):
        return "INTEGER"
    if pa.types.is_int64(t):
        return "BIGINT"
    if pa.types.is_floating(t):
        return "DOUBLE"
    if pa.types.is_boolean(t):
        return "BOOLEAN"
    if pa.types.is_date(t):
        return "DATE"
    if pa.types.is_timestamp(t):
        return "TIMESTAMPTZ"
    if pa.types.is_time(t):
        return "TIME"
    raise TypeError(f"no DuckDB type for {t}")


def catalog_view_statements(release: Release) -> list[str]:
    """CREATE VIEW statements over the partitions of every complete batch.

    Views name the catalog files of every complete batch, so a batch becomes visible exactly
    when its COMPLETE marker does. Run records are a log that every run appends to: their view
    takes each complete batch's whole partition, so a rerun leaves the views unchanged.
    """
    batches = release.complete_batches()
    statements = []
    for table in TABLES:
        if table == "runs":
            patterns = [release.uri(f"{release.partition(table, site, batch)}/*.parquet")
                        for site, batch in batches]
        else:
            patterns = [release.uri(relative) for site, batch in batches
                        for relative in release.catalog_files(table, site, batch)]
        statements.append(_view_sql(table, patterns))
    for table, schema in APPENDED_TABLES.items():  # labels and segmentations
        patterns = [release.uri(relative) for site, batch in batches
                    for relative in release.catalog_files(table, site, batch)]
        statements.append(_view_sql(table, patterns, schema))
    rows = ", ".join(f"('{s}', '{b}')" for s, b in batches) or "(NULL, NULL)"
    statements.append(
        f"CREATE VIEW batches AS SELECT * FROM (VALUES {rows}) AS t(site_id, batch_id) "
        "WHERE site_id IS NOT NULL"
    )
    statements += [f"CREATE VIEW {name} AS {view.sql.strip()}" for name, view in VIEWS.items()]
    return statements + comment_statements()
