"""Publish a batch into the release: files, catalog partitions, manifest, then COMPLETE.

Readers trust only batches whose COMPLETE marker exists, and the DuckDB views list only those
batches' files, so a crash part-way leaves nothing visible; the rerun finishes the batch.
Identical content is never rewritten, which keeps reruns idempotent to the byte.
"""

from __future__ import annotations

import hashlib
import io
import os
import shutil
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import duckdb
import fsspec
import pyarrow as pa
import pyarrow.parquet as pq
from fsspec.implementations.local import LocalFileSystem

from schemas.catalog import APPENDED_TABLES, MANIFEST, PARTITION_COLUMNS, TABLES
from tasks.duckdb_remote import enable_remote_reads

COMPLETE = "COMPLETE"
CATALOG_DB = "catalog.duckdb"
LABEL_VIEWS = "label_views.sql"  # in schemas/: the label_votes and label_consensus views


@dataclass(frozen=True)
class PublishResult:
    files_written: int
    files_unchanged: int
    manifest_rows: int


class Release:
    """A release location (local folder or fsspec URL) and the layout inside it."""

    def __init__(self, url: str, storage_options: dict | None = None):
        self.url = url.rstrip("/")
        self.storage_options = dict(storage_options or {})
        self.fs, self.root = fsspec.core.url_to_fs(self.url, **self.storage_options)
        self.local = isinstance(self.fs, LocalFileSystem)

    def path(self, relative: str) -> str:
        return f"{self.root}/{relative}"

    def uri(self, relative: str) -> str:
        """An address DuckDB can read: a local path, or the URL with its protocol."""
        if self.local:
            return self.path(relative)
        return f"{self.fs.unstrip_protocol(self.path(relative))}"

    def batch_dir(self, site_id: str, batch_id: str) -> str:
        return f"batches/{site_id}/{batch_id}"

    def partition(self, table: str, site_id: str, batch_id: str) -> str:
        return f"catalog/{table}/site_id={site_id}/batch_id={batch_id}"

    def is_complete(self, site_id: str, batch_id: str) -> bool:
        return self.fs.exists(self.path(f"{self.batch_dir(site_id, batch_id)}/{COMPLETE}"))

    def complete_batches(self) -> list[tuple[str, str]]:
        """(site_id, batch_id) of every batch readers may trust, sorted."""
        found = self.fs.glob(self.path(f"batches/*/*/{COMPLETE}"))
        out = []
        for p in found:
            parts = p.split("/")
            out.append((parts[-3], parts[-2]))
        return sorted(out)

    def manifest(self, site_id: str, batch_id: str) -> pa.Table:
        """The published manifest of a batch (every file, size, sha256); empty if none."""
        data = self.read_bytes(f"{self.batch_dir(site_id, batch_id)}/manifest.parquet")
        return MANIFEST.empty_table() if data is None else pq.read_table(io.BytesIO(data))

    def catalog_files(self, table: str, site_id: str, batch_id: str) -> list[str]:
        """Relative paths of the Parquet files that hold a batch's rows of one catalog table.

        Readers (views, dedupe, frozen releases, exports) list a batch's catalog files here
        and nowhere else, so how a batch's current version is found lives in one place."""
        pattern = self.path(f"{self.partition(table, site_id, batch_id)}/*.parquet")
        return sorted(p[len(self.root) + 1:] for p in self.fs.glob(pattern))

    def read_bytes(self, relative: str) -> bytes | None:
        try:
            with self.fs.open(self.path(relative), "rb") as fh:
                return fh.read()
        except FileNotFoundError:
            return None

    def write_bytes(self, relative: str, data: bytes) -> bool:
        """Write unless the same bytes are already there; True when something was written."""
        if self.read_bytes(relative) == data:
            return False
        target = self.path(relative)
        self.fs.makedirs(target.rsplit("/", 1)[0], exist_ok=True)
        if self.local:
            tmp = f"{target}.tmp-{os.getpid()}"
            Path(tmp).write_bytes(data)
            os.replace(tmp, target)
        else:
            with self.fs.open(target, "wb") as fh:
                fh.write(data)
        return True

    def place_file(self, staged: str, relative: str, size: int, sha256: str,
                   previous: dict[str, tuple[int, str]]) -> bool:
        """Move a staged file into place unless the manifest says it is already there."""
        target = self.path(relative)
        if (previous.get(relative) == (size, sha256) and self.fs.exists(target)
                and self.fs.size(target) == size):
            return False
        self.fs.makedirs(target.rsplit("/", 1)[0], exist_ok=True)
        if self.local:
            try:
                os.replace(staged, target)
            except OSError:
                shutil.copyfile(staged, target)
        else:
            self.fs.put_file(staged, target)
        return True


def table_bytes(table: pa.Table) -> bytes:
    """Parquet bytes for a table; the same table always gives the same bytes."""
    sink = io.BytesIO()
    pq.write_table(table, sink, compression="zstd", write_statistics=True)
    return sink.getvalue()


def _previous_manifest(release: Release, site_id: str, batch_id: str) -> dict[str, tuple]:
    rows = release.manifest(site_id, batch_id).to_pylist()
    return {r["path"]: (r["size_bytes"], r["sha256"]) for r in rows}


def publish_batch(
    release: Release,
    site_id: str,
    batch_id: str,
    tables: dict[str, pa.Table],
    files: list[tuple[str, str, int, str]],
    run_table: pa.Table,
    run_id: str,
    reports: dict[str, bytes] | None = None,
) -> PublishResult:
    """Write one batch: DICOM files, catalog partitions, reports, manifest, and COMPLETE last.

    ``files`` holds (staged path, release path, size, sha256) for each published file;
    ``reports`` maps release paths to the bytes of the batch's reports.
    """
    previous = _previous_manifest(release, site_id, batch_id)
    manifest: list[dict] = []
    written = unchanged = 0
    for staged, relative, size, sha in files:
        if release.place_file(staged, relative, size, sha, previous):
            written += 1
        else:
            unchanged += 1
        manifest.append({"path": relative, "size_bytes": size, "sha256": sha})

    for name in TABLES:
        if name == "runs":
            continue
        data = table_bytes(tables[name])
        relative = f"{release.partition(name, site_id, batch_id)}/part-0.parquet"
        written += release.write_bytes(relative, data)
        manifest.append({"path": relative, "size_bytes": len(data),
                         "sha256": hashlib.sha256(data).hexdigest()})
    for relative, data in sorted((reports or {}).items()):
        written += release.write_bytes(relative, data)
        manifest.append({"path": relative, "size_bytes": len(data),
                         "sha256": hashlib.sha256(data).hexdigest()})
    run_relative = f"{release.partition('runs', site_id, batch_id)}/run-{run_id}.parquet"
    release.write_bytes(run_relative, table_bytes(run_table))

    manifest_table = pa.Table.from_pylist(sorted(manifest, key=lambda r: r["path"]),
                                          schema=MANIFEST)
    manifest_bytes = table_bytes(manifest_table)
    batch_dir = release.batch_dir(site_id, batch_id)
    release.write_bytes(f"{batch_dir}/manifest.parquet", manifest_bytes)
    marker = f"manifest sha256 {hashlib.sha256(manifest_bytes).hexdigest()}\n".encode()
    release.write_bytes(f"{batch_dir}/{COMPLETE}", marker)
    return PublishResult(files_written=written, files_unchanged=unchanged,
                         manifest_rows=manifest_table.num_rows)


def read_published(release: Release, table: str, site_id: str, exclude_batch: str,
                   columns: list[str]) -> pa.Table:
    """Rows of a catalog table from the site's complete batches other than ``exclude_batch``."""
    parts = []
    for site, batch in release.complete_batches():
        if site != site_id or batch == exclude_batch:
            continue
        for relative in release.catalog_files(table, site, batch):
            with release.fs.open(release.path(relative), "rb") as fh:
                t = pq.read_table(fh, columns=columns)
            parts.append(t.append_column("batch_id", pa.array([batch] * t.num_rows, pa.string())))
    schema = pa.schema([TABLES[table].field(c) for c in columns] + [("batch_id", pa.string())])
    return pa.concat_tables(parts).cast(schema) if parts else schema.empty_table()


def _view_sql(table: str, files: list[str], schema: pa.Schema | None = None) -> str:
    if not files:
        columns = ", ".join(
            [f"CAST(NULL AS VARCHAR) AS {c}" for c in PARTITION_COLUMNS]
            + [f"CAST(NULL AS {_duck_type(f.type)}) AS {f.name}"
               for f in (schema or TABLES[table])]
        )
        return f"CREATE VIEW {table} AS SELECT {columns} WHERE false"
    listing = ", ".join("'" + f.replace("'", "''") + "'" for f in files)
    return (
        f"CREATE VIEW {table} AS SELECT site_id, batch_id, * EXCLUDE (site_id, batch_id) "
        f"FROM read_parquet([{listing}], hive_partitioning = true, union_by_name = true, "
        "hive_types = {'site_id': 'VARCHAR', 'batch_id': 'VARCHAR'})"
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
    views = resources.files("schemas").joinpath(LABEL_VIEWS).read_text()
    statements += [s.strip() for s in views.split(";") if s.strip()]
    rows = ", ".join(f"('{s}', '{b}')" for s, b in batches) or "(NULL, NULL)"
    statements.append(
        f"CREATE VIEW batches AS SELECT * FROM (VALUES {rows}) AS t(site_id, batch_id) "
        "WHERE site_id IS NOT NULL"
    )
    return statements


def refresh_catalog_db(release: Release, work_dir: str) -> bool:
    """Rewrite ``catalog.duckdb`` when its views changed; True when it was rewritten.

    The database records a fingerprint of its view statements in ``catalog_info`` so an
    unchanged catalog is recognised without comparing DuckDB's normalised SQL.
    """
    statements = catalog_view_statements(release)
    fingerprint = hashlib.sha256("\n".join(statements).encode()).hexdigest()
    local_db = Path(release.path(CATALOG_DB)) if release.local else Path(work_dir) / CATALOG_DB
    if local_db.exists():
        try:
            with duckdb.connect(str(local_db), read_only=True) as con:
                current = con.execute("SELECT views_sha256 FROM catalog_info").fetchone()
            if current == (fingerprint,):
                return False
        except duckdb.Error:
            pass
    local_db.parent.mkdir(parents=True, exist_ok=True)
    tmp = local_db.with_name(f".{CATALOG_DB}.tmp-{os.getpid()}")
    tmp.unlink(missing_ok=True)
    with duckdb.connect(str(tmp)) as con:
        if not release.local:  # creating a view reads the schema of the Parquet it names
            enable_remote_reads(con, release.storage_options)
        for statement in statements:
            con.execute(statement)
        con.execute("CREATE TABLE catalog_info AS SELECT ? AS views_sha256", [fingerprint])
    os.replace(tmp, local_db)
    if not release.local:
        release.fs.put_file(str(local_db), release.path(CATALOG_DB))
    return True
