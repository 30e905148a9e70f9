"""Export a cohort from a frozen release, and record it in the release's audit trail.

Only frozen releases are exported from: they never change, so the audit record (release,
predicate, checksum) says exactly what left. A local release's files are copied into the export
folder and checked against the release manifest as they are copied; for a release in S3 the
export lists the objects' URLs (with size and sha256) for the recipient to fetch.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa

from schemas.catalog import MANIFEST, TABLES
from schemas.release import EXPORTED, MANIFEST_FILE, SNAPSHOT_DIR, SUMS_FILE
from tasks.audit import append_audit, audit_record, default_requester
from tasks.cohort import filtered_tables, select_studies, selection_table
from tasks.frozen import (
    FrozenReleaseError,
    frozen_connection,
    read_checksum,
    read_manifest,
    release_dir,
    resolve,
    summed_problems,
    sums_text,
)
from tasks.zones import Release, table_bytes

OBJECTS_FILE = "objects.parquet"  # for an S3 release: url, path, size, sha256 of each object
RECORD_FILE = "EXPORT.json"
OBJECTS = pa.schema([("url", pa.string()), *MANIFEST])


class ExportError(FrozenReleaseError):
    """The export cannot be made as asked (nothing selected, folder in use, file changed)."""


@dataclass(frozen=True)
class ExportResult:
    release: str
    record_id: str
    checksum: str
    studies: int
    files: int
    bytes: int
    audit_path: str


def _empty_folder(out: Path) -> None:
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ExportError(f"{out} exists and is not an empty folder: exports never overwrite")
    out.mkdir(parents=True, exist_ok=True)


def _copy_checked(release: Release, source: str, target: Path, sha256: str) -> None:
    """Copy one file of the release, refusing it unless its bytes match the manifest."""
    target.parent.mkdir(parents=True, exist_ok=True)
    digest = hashlib.sha256()
    tmp = target.with_name(f".{target.name}.tmp-{os.getpid()}")
    with release.fs.open(release.path(source), "rb") as src, open(tmp, "wb") as dst:
        for block in iter(lambda: src.read(1 << 20), b""):
            digest.update(block)
            dst.write(block)
    if digest.hexdigest() != sha256:
        tmp.unlink()
        raise ExportError(f"{source} does not match the release manifest: not exported")
    os.replace(tmp, target)


def export_cohort(release: Release, name: str, where: str, purpose: str, out: Path,
                  requester: str | None = None) -> ExportResult:
    """Write the studies ``where`` keeps from frozen release ``name`` into ``out`` (DICOM or
    object URLs, catalog rows, manifest, checksums) and append the audit record."""
    if not purpose.strip():
        raise ExportError("an export needs a purpose or approval id")
    name = resolve(release, name)
    problems = summed_problems(release, name)
    if problems:
        raise ExportError(f"frozen release {name} does not match its checksum ({problems[0]}): "
                          "nothing exported")
    with frozen_connection(release, name) as con:
        study_uids = select_studies(selection_table(con), where)
        if not study_uids:
            raise ExportError("the predicate keeps no study: nothing exported")
        tables = filtered_tables(con, study_uids)
    base = release_dir(name)
    frozen = {r["path"]: r for r in read_manifest(release, name).to_pylist()}
    chosen = [frozen[p] for p in sorted(tables["instances"].column("path").to_pylist())]
    _empty_folder(out)

    summed = {f"{SNAPSHOT_DIR}/{t}.parquet": table_bytes(tables[t]) for t in TABLES}
    if release.local:
        for row in chosen:
            _copy_checked(release, f"{base}/{row['path']}", out / row["path"], row["sha256"])
        summed[MANIFEST_FILE] = table_bytes(pa.Table.from_pylist(chosen, schema=MANIFEST))
    else:
        objects = [{"url": release.fs.unstrip_protocol(release.path(f"{base}/{r['path']}")),
                    **r} for r in chosen]
        summed[OBJECTS_FILE] = table_bytes(pa.Table.from_pylist(objects, schema=OBJECTS))
    sums = sums_text(summed)
    checksum = hashlib.sha256(sums).hexdigest()
    for relative, data in summed.items():
        (out / relative).parent.mkdir(parents=True, exist_ok=True)
        (out / relative).write_bytes(data)
    (out / SUMS_FILE).write_bytes(sums)

    record = audit_record(
        action=EXPORTED, release=name, release_checksum=read_checksum(release, name),
        requester=requester or default_requester(), purpose=purpose, where_sql=where,
        patients=tables["patients"].num_rows, studies=len(study_uids),
        series=tables["series"].num_rows, instances=tables["instances"].num_rows,
        files=len(chosen), bytes=sum(r["size_bytes"] for r in chosen), checksum=checksum,
        destination=str(out))
    relative = append_audit(release, name, record)
    (out / RECORD_FILE).write_text(json.dumps(record, default=str, indent=1) + "\n")
    return ExportResult(release=name, record_id=record["record_id"], checksum=checksum,
                        studies=len(study_uids), files=len(chosen), bytes=record["bytes"],
                        audit_path=relative)
