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
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import duckdb
import pyarrow as pa
import pyarrow.parquet as pq

from schemas.catalog import MANIFEST, TABLES
from tasks.catalog_dictionary import catalog_info_statements, dictionary_markdown
from tasks.catalog_query import catalog_view_statements
from tasks.duckdb_remote import enable_remote_reads
from tasks.kill_point import kill_point
from tasks.zones import (
    CATALOG_DB,
    COMPLETE,
    TEMPORARY,
    BatchVersion,
    Release,
    table_bytes,
)

CATALOG_README = "catalog/README.md"


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
