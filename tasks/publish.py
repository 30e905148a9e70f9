"""Publish a batch into the release: files, catalog partitions, manifest, then COMPLETE.

Readers trust only batches whose COMPLETE marker exists, and the DuckDB views list only those
batches' files, so a crash part-way leaves nothing visible; the rerun finishes the batch.
Identical content is never rewritten, which keeps reruns idempotent to the byte.

A COMPLETE batch is never edited in place. Each version of a batch is one manifest,
``batches/<site>/<batch>/manifest-<sha>.parquet``, written before any of its files; the
COMPLETE marker names the current one, and rewriting the marker (one atomic write) switches
versions. A file whose bytes change in a republish goes to a new path (``<name>.v<sha>.<ext>``)
and catalog partition files are named by their content (``part-<sha>.parquet``), so the
switch never touches a file the current version holds. What superseded manifests hold and
the current one does not is removed after the switch (``drop_superseded``).
"""

from __future__ import annotations

import hashlib
import io
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

import duckdb
import fsspec
import pyarrow as pa
import pyarrow.parquet as pq
from fsspec.implementations.local import LocalFileSystem

from schemas.catalog import APPENDED_TABLES, MANIFEST, PARTITION_COLUMNS, TABLES, VIEWS
from tasks.catalog_dictionary import (
    catalog_info_statements,
    comment_statements,
    dictionary_markdown,
)
from tasks.duckdb_remote import enable_remote_reads
from tasks.kill_point import kill_point

COMPLETE = "COMPLETE"
CATALOG_DB = "catalog.duckdb"
CATALOG_README = "catalog/README.md"
KEY_CHECK = "KEY-CHECK"
LEGACY_MANIFEST = "manifest.parquet"  # the one manifest of a batch published before versions
MANIFEST_FILE = re.compile(r"^manifest(-[0-9a-f]{16})?\.parquet$")
TEMPORARY = ".tmp-"


@dataclass(frozen=True)
class BatchVersion:
    """What a COMPLETE marker says: the current manifest, its sha256, the key check value."""

    manifest: str
    manifest_sha256: str
    key_check: str | None

    def marker(self) -> bytes:
        return (f"manifest {self.manifest}\nmanifest sha256 {self.manifest_sha256}\n"
                f"key check {self.key_check or '-'}\n").encode()


def parse_marker(data: bytes) -> BatchVersion:
    """A COMPLETE marker's fields; a marker from before versions names ``manifest.parquet``."""
    fields = {}
    for line in data.decode("ascii", "replace").splitlines():
        for name in ("manifest sha256 ", "manifest ", "key check "):
            if line.startswith(name):
                fields[name.strip()] = line[len(name):].strip()
                break
    key = fields.get("key check")
    return BatchVersion(fields.get("manifest", LEGACY_MANIFEST),
                        fields.get("manifest sha256", ""), None if key in (None, "-") else key)


def versioned_path(relative: str, sha256: str) -> str:
    """Where a file goes when the current version holds its usual path with other bytes."""
    folder, _, name = relative.rpartition("/")
    stem, dot, ext = name.rpartition(".")
    stem, ext = (stem, f".{ext}") if dot else (name, "")
    return f"{folder}/{stem}.v{sha256[:12]}{ext}" if folder else f"{stem}.v{sha256[:12]}{ext}"


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

    def current_version(self, site_id: str, batch_id: str) -> BatchVersion | None:
        """The version the batch's COMPLETE marker names; None for a batch not complete."""
        data = self.read_bytes(f"{self.batch_dir(site_id, batch_id)}/{COMPLETE}")
        return None if data is None else parse_marker(data)

    def manifest(self, site_id: str, batch_id: str) -> pa.Table:
        """The current manifest of a complete batch (every file, size, sha256); empty if none."""
        version = self.current_version(site_id, batch_id)
        if version is None:
            return MANIFEST.empty_table()
        return self.read_manifest(site_id, batch_id, version.manifest)

    def read_manifest(self, site_id: str, batch_id: str, name: str) -> pa.Table:
        data = self.read_bytes(f"{self.batch_dir(site_id, batch_id)}/{name}")
        return MANIFEST.empty_table() if data is None else pq.read_table(io.BytesIO(data))

    def manifest_names(self, site_id: str, batch_id: str) -> list[str]:
        """Every manifest in a batch's folder: the current one and any not yet dropped."""
        folder = self.path(self.batch_dir(site_id, batch_id))
        if not self.fs.isdir(folder):
            return []
        names = [p.rstrip("/").rsplit("/", 1)[-1] for p in self.fs.ls(folder, detail=False)]
        return sorted(n for n in names if MANIFEST_FILE.match(n))

    def catalog_files(self, table: str, site_id: str, batch_id: str) -> list[str]:
        """Relative paths of the Parquet files that hold a batch's rows of one catalog table.

        Readers (views, dedupe, frozen releases, exports) list a batch's catalog files here
        and nowhere else: the files the batch's current manifest names. Run records, and the
        labels and segmentations that come back after publication, are appended outside the
        manifest: for those, the whole partition."""
        partition = self.partition(table, site_id, batch_id)
        if table == "runs" or table in APPENDED_TABLES:
            pattern = self.path(f"{partition}/*.parquet")
            return sorted(p[len(self.root) + 1:] for p in self.fs.glob(pattern))
        return sorted(p for p in self.manifest(site_id, batch_id).column("path").to_pylist()
                      if p.startswith(f"{partition}/") and p.endswith(".parquet"))

    def read_bytes(self, relative: str) -> bytes | None:
        try:
            with self.fs.open(self.path(relative), "rb") as fh:
                return fh.read()
        except FileNotFoundError:
            return None

    def write_bytes(self, relative: str, data: bytes, atomic: bool = False) -> bool:
        """Write unless the same bytes are already there; True when something was written.

        Files no current version names may be written in place on an object store (a crash
        leaves a file only a manifest that is not current lists). A local file is always
        written beside and renamed over, never truncated: the path may be a hard link a frozen
        release holds, whose bytes must not change. ``atomic`` marks the files readers trust at
        once (COMPLETE, KEY-CHECK); a PUT to an object store replaces the object whole."""
        if self.read_bytes(relative) == data:
            return False
        target = self.path(relative)
        self.fs.makedirs(target.rsplit("/", 1)[0], exist_ok=True)
        if self.local:  # a rename, never an in-place truncate (see above)
            tmp = f"{target}{TEMPORARY}{os.getpid()}"
            Path(tmp).write_bytes(data)
            os.replace(tmp, target)
        else:
            self.fs.pipe_file(target, data)
        return True

    def remove(self, relative: str) -> None:
        """Remove a file if it is there; a local folder left empty goes too."""
        target = self.path(relative)
        try:
            self.fs.rm_file(target)
        except FileNotFoundError:
            return
        if self.local:
            folder = Path(target).parent
            while folder != Path(self.root) and folder.is_dir() and not any(folder.iterdir()):
                folder.rmdir()
                folder = folder.parent

    def remove_temporary(self, pattern: str) -> list[str]:
        """Remove leftovers of atomic writes a killed run never renamed (``pattern`` is a
        glob relative to the release); returns what was removed."""
        found = [p for p in self.fs.glob(self.path(pattern)) if TEMPORARY in p]
        for p in found:
            self.fs.rm_file(p)
        return [p[len(self.root) + 1:] for p in found]

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


def _place(relative: str, sha256: str, current: dict[str, tuple]) -> str:
    """Where a file of a new version goes: its usual path unless the current version holds
    that path with other bytes (then a path named by its sha256); identical bytes stay."""
    if current.get(relative, (None, None))[1] == sha256:
        return relative
    moved = versioned_path(relative, sha256)
    if moved in current or relative in current:
        return moved
    return relative


def publish_batch(
    release: Release,
    site_id: str,
    batch_id: str,
    tables: dict[str, pa.Table],
    files: list[tuple[str, str, int, str]],
    run_table: pa.Table,
    run_id: str,
    reports: dict[str, bytes] | None = None,
    key_check: str | None = None,
) -> PublishResult:
    """Write one version of a batch: its manifest, DICOM files, catalog partitions and
    reports, then switch COMPLETE to it. The previous version stays whole until
    ``drop_superseded`` removes what only it holds.

    ``files`` holds (staged path, release path, size, sha256) for each published file;
    ``reports`` maps release paths to the bytes of the batch's reports; ``key_check`` is the
    release key's check value, recorded in the marker.
    """
    current = _previous_manifest(release, site_id, batch_id)
    placed = {rel: _place(rel, sha, current) for _, rel, _, sha in files}
    planned: list[tuple[str, str | bytes, int, str]] = [
        (staged, placed[rel], size, sha) for staged, rel, size, sha in files]
    for name in TABLES:
        if name == "runs":
            continue
        table = tables[name]
        if name == "instances" and any(placed[p] != p for p in placed):
            paths = [placed.get(p, p) for p in table.column("path").to_pylist()]
            table = table.set_column(table.schema.get_field_index("path"), "path",
                                     pa.array(paths, pa.string()))
        data = table_bytes(table)
        sha = hashlib.sha256(data).hexdigest()
        planned.append((data, f"{release.partition(name, site_id, batch_id)}/part-{sha[:16]}"
                        ".parquet", len(data), sha))
    for relative, data in sorted((reports or {}).items()):
        sha = hashlib.sha256(data).hexdigest()
        planned.append((data, _place(relative, sha, current), len(data), sha))

    manifest_table = pa.Table.from_pylist(
        sorted(({"path": rel, "size_bytes": size, "sha256": sha}
                for _, rel, size, sha in planned), key=lambda r: r["path"]), schema=MANIFEST)
    manifest_bytes = table_bytes(manifest_table)
    manifest_sha = hashlib.sha256(manifest_bytes).hexdigest()
    batch_dir = release.batch_dir(site_id, batch_id)
    version = BatchVersion(f"manifest-{manifest_sha[:16]}.parquet", manifest_sha, key_check)
    release.write_bytes(f"{batch_dir}/{version.manifest}", manifest_bytes)
    kill_point("publish:manifest")

    written = unchanged = 0
    for n, (content, relative, size, sha) in enumerate(planned):
        if n == len(planned) // 2:
            kill_point("publish:files")
        if isinstance(content, bytes):
            written += release.write_bytes(relative, content)
        elif release.place_file(content, relative, size, sha, current):
            written += 1
        else:
            unchanged += 1
    run_relative = f"{release.partition('runs', site_id, batch_id)}/run-{run_id}.parquet"
    release.write_bytes(run_relative, table_bytes(run_table))
    kill_point("publish:placed")
    release.write_bytes(f"{batch_dir}/{COMPLETE}", version.marker(), atomic=True)
    kill_point("publish:complete")
    return PublishResult(files_written=written, files_unchanged=unchanged,
                         manifest_rows=manifest_table.num_rows)


def drop_superseded(release: Release, site_id: str, batch_id: str) -> int:
    """Remove the files only superseded versions of a complete batch hold, then their
    manifests; idempotent, so a rerun finishes what a killed one began. Returns files removed.

    Call it after ``catalog.duckdb`` names the current version, so no view points at a
    removed file."""
    version = release.current_version(site_id, batch_id)
    if version is None:
        return 0
    keep = set(release.manifest(site_id, batch_id).column("path").to_pylist())
    removed = 0
    for name in release.manifest_names(site_id, batch_id):
        if name == version.manifest:
            continue
        for relative in release.read_manifest(site_id, batch_id, name).column("path").to_pylist():
            if relative not in keep and release.fs.exists(release.path(relative)):
                release.remove(relative)
                removed += 1
        kill_point("cleanup:manifest")
        release.remove(f"{release.batch_dir(site_id, batch_id)}/{name}")
    return removed


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


def refresh_catalog_db(release: Release, work_dir: str) -> bool:
    """Rewrite ``catalog.duckdb`` when its views changed; True when it was rewritten.

    The database records a fingerprint of its view statements in ``catalog_info`` so an
    unchanged catalog is recognised without comparing DuckDB's normalised SQL. It is built in
    the work folder and renamed into the release, so the release never holds a half-built
    database; callers hold the release's catalog lock (one refresh at a time)."""
    statements = catalog_view_statements(release)
    fingerprint = hashlib.sha256("\n".join(statements).encode()).hexdigest()
    work = Path(work_dir)
    local_db = Path(release.path(CATALOG_DB)) if release.local else work / CATALOG_DB
    if catalog_fingerprint(local_db) == fingerprint:
        _write_dictionary(release, local_db)
        return False
    work.mkdir(parents=True, exist_ok=True)
    for stale in work.glob(f".{CATALOG_DB}{TEMPORARY}*"):
        stale.unlink(missing_ok=True)
    tmp = work / f".{CATALOG_DB}{TEMPORARY}{os.getpid()}"
    with duckdb.connect(str(tmp)) as con:
        if not release.local:  # creating a view reads the schema of the Parquet it names
            enable_remote_reads(con, release.storage_options)
        con.execute("BEGIN")  # one commit, not one per statement
        for statement in statements + catalog_info_statements(fingerprint):
            con.execute(statement)
        con.execute("COMMIT")
    if release.local:
        local_db.parent.mkdir(parents=True, exist_ok=True)
        beside = local_db.with_name(f".{CATALOG_DB}{TEMPORARY}{os.getpid()}")
        shutil.copyfile(tmp, beside)
        os.replace(beside, local_db)
        tmp.unlink()
    else:  # uploaded before the work copy is replaced: a kill between leaves a stale copy
        release.fs.put_file(str(tmp), release.path(CATALOG_DB))
        os.replace(tmp, local_db)
    _write_dictionary(release, local_db)
    return True


def catalog_fingerprint(db: Path) -> str | None:
    """The view fingerprint a ``catalog.duckdb`` records; None if absent or unreadable."""
    if not db.exists():
        return None
    try:
        with duckdb.connect(str(db), read_only=True) as con:
            row = con.execute("SELECT views_sha256 FROM catalog_info").fetchone()
    except duckdb.Error:
        return None
    return row[0] if row else None


def _write_dictionary(release: Release, local_db: Path) -> None:
    """catalog/README.md from the database's own comments (unchanged bytes are not rewritten)."""
    with duckdb.connect(str(local_db), read_only=True) as con:
        release.write_bytes(CATALOG_README, dictionary_markdown(con).encode())
