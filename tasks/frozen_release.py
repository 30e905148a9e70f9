"""Freeze the current COMPLETE batches, cut down to the studies a predicate chooses, into
``releases/<name>/``: the release's own copy of its DICOM files (hard links on a local disk,
server-side copies in S3), a manifest, a Parquet snapshot of every catalog table, a checksum
over them, and a ``catalog.duckdb`` of views. CHECKSUM is written last; nothing under a frozen
release is rewritten afterwards except that audit records are added.

The release owns its files: a later republication writes new files and removes the old ones,
which leaves the release's links or copies (and so its bytes) as they were frozen.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import duckdb
import pyarrow as pa

from schemas.catalog import MANIFEST, TABLES
from schemas.release import (
    AUDIT,
    CHECKSUM_FILE,
    CREATED,
    CURRENT,
    INFO_FILE,
    MANIFEST_FILE,
    RELEASES_DIR,
    SELECTION_FILE,
    SNAPSHOT_DIR,
    SUMS_FILE,
)
from tasks.audit import audit_path, audit_record
from tasks.catalog_query import catalog_view_statements, memory_connection
from tasks.cohort import filtered_tables, select_studies, selection_table
from tasks.duckdb_remote import enable_remote_reads
from tasks.frozen import (
    FrozenReleaseError,
    check_name,
    create_snapshot_views,
    is_frozen,
    read_manifest,
    release_dir,
    summed_problems,
    sums_text,
)
from tasks.zones import CATALOG_DB, Release, table_bytes

ALL_STUDIES = "true"
CREATION_RECORD = "0-release-created"


class ReleaseExists(FrozenReleaseError):
    """A frozen release of that name exists: releases are never rewritten."""


@dataclass(frozen=True)
class FrozenRelease:
    """What was frozen: the name, its checksum and counts."""

    name: str
    checksum: str
    patients: int
    studies: int
    files: int
    bytes: int


def list_releases(release: Release) -> list[dict]:
    """Every frozen release with its checksum and creation record, oldest first."""
    out = []
    for path in release.fs.glob(release.path(f"{RELEASES_DIR}/*/{CHECKSUM_FILE}")):
        name = path.split("/")[-2]
        info = json.loads(release.read_bytes(f"{release_dir(name)}/{INFO_FILE}") or b"{}")
        out.append({"name": name, **{k: info.get(k) for k in (
            "created", "checksum", "where", "description", "studies", "files")}})
    return sorted(out, key=lambda r: (r["created"] or "", r["name"]))


def _batch_files(release: Release, batches: set[tuple[str, str]]) -> dict[str, tuple[int, str]]:
    """path -> (size, sha256) from the manifests of the batches, the one list of their files."""
    out = {}
    for site_id, batch_id in sorted(batches):
        for row in release.manifest(site_id, batch_id).to_pylist():
            out[row["path"]] = (row["size_bytes"], row["sha256"])
    return out


def _sha256_file(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _freeze_file(release: Release, source: str, target: str, size: int, sha256: str) -> None:
    """Give the release its own copy of one file: a hard link, else a copy; S3: server-side."""
    try:
        _place_frozen(release, source, target, size, sha256)
    except FileNotFoundError:
        raise FrozenReleaseError(f"{source} was removed while it was being frozen (a "
                                 "republication?): run again") from None


def _place_frozen(release: Release, source: str, target: str, size: int, sha256: str) -> None:
    src, dst = release.path(source), release.path(target)
    if release.local:
        if not os.path.exists(dst):
            os.makedirs(os.path.dirname(dst), exist_ok=True)
            tmp = f"{dst}.tmp-{os.getpid()}"
            try:
                os.link(src, tmp)
            except OSError:
                shutil.copyfile(src, tmp)
            os.replace(tmp, dst)
        if _sha256_file(dst) != sha256:  # e.g. the source was republished meanwhile
            os.unlink(dst)
            raise FrozenReleaseError(f"{source} changed while it was being frozen: run again")
        return
    if not (release.fs.exists(dst) and release.fs.size(dst) == size):
        release.fs.copy(src, dst)


def _write_views(release: Release, name: str, info: dict) -> None:
    with tempfile.TemporaryDirectory(prefix="radrepo-frozen-") as folder:
        local = Path(folder) / CATALOG_DB
        with duckdb.connect(str(local)) as con:
            if not release.local:
                enable_remote_reads(con, release.storage_options)
            create_snapshot_views(con, release, name)
            con.execute("CREATE TABLE release_info AS SELECT ? AS name, ? AS checksum, "
                        "? AS where_sql, ? AS description",
                        [name, info["checksum"], info["where"], info["description"]])
        target = release.path(f"{release_dir(name)}/{CATALOG_DB}")
        if release.local:
            shutil.copyfile(local, target)
        else:
            release.fs.put_file(str(local), target)


def _write_pointer(release: Release, name: str) -> None:
    """releases/current names the newest release; replaced in one step (rename, or one PUT)."""
    release.write_bytes(f"{RELEASES_DIR}/{CURRENT}", f"{name}\n".encode())


def _repair_pointer(release: Release, name: str) -> None:
    """A run killed between CHECKSUM and the pointer left ``current`` on an older release:
    when ``name`` is the newest frozen release, point ``current`` at it (so a rerun mends)."""
    releases = list_releases(release)
    if releases and releases[-1]["name"] == name:
        _write_pointer(release, name)


def create_release(release: Release, name: str, where: str | None = None,
                   description: str | None = None, requester: str | None = None) -> FrozenRelease:
    """Freeze the studies of the COMPLETE batches that ``where`` keeps into releases/<name>/."""
    from tasks.audit import default_requester

    check_name(name)
    if is_frozen(release, name):
        _repair_pointer(release, name)
        raise ReleaseExists(f"a frozen release named {name!r} exists; releases are never "
                            "rewritten: choose another name")
    where_text = where if where is not None else ALL_STUDIES
    base = release_dir(name)
    if release.fs.exists(release.path(base)):  # a creation that never finished: never visible
        release.fs.rm(release.path(base), recursive=True)
    batches = release.complete_batches()
    if not batches:
        raise FrozenReleaseError("no COMPLETE batch to freeze")
    with memory_connection(release) as con:
        for statement in catalog_view_statements(release):
            con.execute(statement)
        study_uids = select_studies(selection_table(con), where_text)
        if not study_uids:
            raise FrozenReleaseError("the predicate keeps no study: nothing to freeze")
        tables = filtered_tables(con, study_uids)

    instances = tables["instances"].select(["site_id", "batch_id", "path"]).to_pylist()
    published = _batch_files(release, {(r["site_id"], r["batch_id"]) for r in instances})
    manifest = []
    for row in sorted(instances, key=lambda r: r["path"]):
        if row["path"] not in published:
            raise FrozenReleaseError(f"{row['path']} is in the catalog but not in the manifest "
                                     f"of batch {row['site_id']}/{row['batch_id']}")
        size, sha = published[row["path"]]
        _freeze_file(release, row["path"], f"{base}/{row['path']}", size, sha)
        manifest.append({"path": row["path"], "size_bytes": size, "sha256": sha})

    summed: dict[str, bytes] = {
        f"{SNAPSHOT_DIR}/{table}.parquet": table_bytes(tables[table]) for table in TABLES}
    summed[MANIFEST_FILE] = table_bytes(pa.Table.from_pylist(manifest, schema=MANIFEST))
    summed[SELECTION_FILE] = json.dumps(
        {"where": where_text, "batches": [list(b) for b in batches],
         "studies": len(study_uids)}, indent=1, sort_keys=True).encode() + b"\n"
    sums = sums_text(summed)
    checksum = hashlib.sha256(sums).hexdigest()
    for relative, data in sorted(summed.items()):
        release.write_bytes(f"{base}/{relative}", data)
    release.write_bytes(f"{base}/{SUMS_FILE}", sums)

    result = FrozenRelease(name=name, checksum=checksum,
                           patients=tables["patients"].num_rows, studies=len(study_uids),
                           files=len(manifest), bytes=sum(r["size_bytes"] for r in manifest))
    record = audit_record(
        action=CREATED, release=name, release_checksum=checksum,
        requester=requester or default_requester(), purpose=description, where_sql=where_text,
        patients=result.patients, studies=result.studies,
        series=tables["series"].num_rows, instances=tables["instances"].num_rows,
        files=result.files, bytes=result.bytes, checksum=checksum)
    # the creation record has a fixed name, so a rerun after a crash replaces it
    release.write_bytes(audit_path(name, record, fixed=CREATION_RECORD),
                        table_bytes(pa.Table.from_pylist([record], schema=AUDIT)))
    info = {"name": name, "description": description, "where": where_text,
            "checksum": checksum, "created": datetime.now(UTC).isoformat(timespec="seconds"),
            "studies": result.studies, "files": result.files}
    _write_views(release, name, info)
    release.write_bytes(f"{base}/{INFO_FILE}", json.dumps(info, indent=1).encode() + b"\n")
    release.write_bytes(f"{base}/{CHECKSUM_FILE}", f"sha256 {checksum}\n".encode())
    _write_pointer(release, name)
    return result


def verify_release(release: Release, name: str) -> list[str]:
    """Problems found re-reading a frozen release: the checksum over SHA256SUMS, each summed
    file, and every DICOM file against the manifest (files are read in full)."""
    base = release_dir(name)
    problems = summed_problems(release, name)
    for row in read_manifest(release, name).to_pylist():
        data = release.read_bytes(f"{base}/{row['path']}")
        if data is None or hashlib.sha256(data).hexdigest() != row["sha256"]:
            problems.append(f"{row['path']}: missing or changed")
    return problems
