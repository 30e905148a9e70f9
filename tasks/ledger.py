"""The site's private records of what came in: the ledger of source objects taken into published
batches (so the next run skips them), discovered batches waiting for their run, each batch's
index, identifier list and quarantine listing, and its staging (where each lives:
``tasks.zones.WorkDir``).
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from schemas.pipeline import LEDGER, QUARANTINE
from tasks.zones import WorkDir

IDENTIFIERS = pa.schema([("value", pa.string())])


@dataclass(frozen=True)
class SourceObject:
    """One entry of a source as discovery saw it (``sha256`` only where discovery hashed it)."""

    key: str
    size: int
    mtime_ns: int
    sha256: str | None = None
    problem: str | None = None  # why the entry cannot be ingested (then it is quarantined)


@dataclass(frozen=True)
class BatchRef:
    """A batch found in a source: which objects belong to it and where they live."""

    site_id: str
    batch_id: str
    root: str
    objects: tuple[SourceObject, ...]
    already_ingested: int = 0
    pacs: bool = False  # objects are studies (key: Study Instance UID, size: instance count)


def read_ledger(work_dir: str, site_id: str) -> pa.Table:
    path = WorkDir(work_dir, site_id).ledger
    return pq.read_table(path, schema=LEDGER) if path.exists() else LEDGER.empty_table()


def record_ingested(batch: BatchRef, index: pa.Table, work_dir: str) -> None:
    """Remember a published batch's source objects so the next run skips them: files with
    the hash their bytes had, or for a PACS batch the objects received (from the index)."""
    ledger = read_ledger(work_dir, batch.site_id).to_pylist()
    if batch.pacs:  # every object of the studies received whole, whatever became of it
        studies_asked = {o.key for o in batch.objects}  # keys of the study-level records
        rows = [{"key": r["key"], "size": r["size"], "mtime_ns": 0, "sha256": r["sha256"],
                 "batch_id": batch.batch_id}
                for r in index.select(["key", "size", "sha256"]).to_pylist()
                if r["key"] not in studies_asked]
        studies = {r["key"].split("/", 1)[0] for r in rows}
        kept = [r for r in ledger if r["key"].split("/", 1)[0] not in studies]
    else:  # the bytes' hash as the one pass read them; a bad entry stays seen
        read = dict(zip(index.column("key").to_pylist(), index.column("sha256").to_pylist(),
                        strict=True))
        archives = {key.split("!", 1)[0] for key in read if "!" in key}  # zips: members read
        rows = [{"key": o.key, "size": o.size, "mtime_ns": o.mtime_ns,
                 "sha256": o.sha256 or read.get(o.key), "batch_id": batch.batch_id}
                for o in batch.objects if o.problem or o.key in read or o.key in archives]
        done = {r["key"] for r in rows}
        kept = [r for r in ledger if r["key"] not in done]
    if not rows:
        return
    _atomic_table(pa.Table.from_pylist(kept + rows, schema=LEDGER),
                  WorkDir(work_dir, batch.site_id).ledger)


def save_pending(batch: BatchRef, work_dir: str) -> None:
    """Keep a discovered batch in the private zone so the run that takes it need not rescan."""
    path = WorkDir(work_dir, batch.site_id).pending(batch.batch_id)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")  # a cut write leaves no half record
    tmp.write_text(json.dumps(asdict(batch)))
    os.replace(tmp, path)


def load_pending(work_dir: str, site_id: str, batch_id: str) -> BatchRef | None:
    path = WorkDir(work_dir, site_id).pending(batch_id)
    if not path.exists():
        return None
    raw = json.loads(path.read_text())
    return BatchRef(raw["site_id"], raw["batch_id"], raw["root"],
                    tuple(SourceObject(**o) for o in raw["objects"]), raw["already_ingested"],
                    raw.get("pacs", False))


def forget_pending(work_dir: str, site_id: str, batch_id: str) -> None:
    WorkDir(work_dir, site_id).pending(batch_id).unlink(missing_ok=True)


def clear_staging(batch: BatchRef, work_dir: str) -> None:
    """Drop a published batch's staged copies, PACS studies received for it included (the
    source and the release keep what matters)."""
    work = WorkDir(work_dir, batch.site_id)
    shutil.rmtree(work.staging(batch.batch_id), ignore_errors=True)
    if batch.pacs:
        for obj in batch.objects:
            shutil.rmtree(work.received_study(obj.key), ignore_errors=True)


def _atomic_table(table: pa.Table, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    pq.write_table(table, tmp)
    os.replace(tmp, path)


def write_batch_records(work_dir: str, site_id: str, batch_id: str, index: pa.Table,
                        quarantine: pa.Table, identifiers: list[str]) -> None:
    """Keep a batch's index, its quarantine listing and its identifier list (what the gate
    on any later batch of the site searches for) in the private zone."""
    work = WorkDir(work_dir, site_id)
    _atomic_table(index, work.index(batch_id))
    _atomic_table(pa.table({"value": identifiers}, schema=IDENTIFIERS),
                  work.identifiers(batch_id))
    listing = work.quarantine_list(batch_id)
    if quarantine.num_rows:
        _atomic_table(quarantine.cast(QUARANTINE), listing)
    else:
        listing.unlink(missing_ok=True)


def identifier_values(paths: Iterable[Path]) -> tuple[str, ...]:
    """The identifying values in the identifier lists at ``paths``, sorted, once each."""
    values: set[str] = set()
    for path in paths:
        values.update(v for v in pq.read_table(path).column("value").to_pylist() if v)
    return tuple(sorted(values))


def site_identifiers(work_dir: str, site_id: str) -> tuple[str, ...]:
    """The identifying values met at the site so far, in every batch's list: what the gate
    on any one batch searches for (names met in another batch included)."""
    return identifier_values(WorkDir(work_dir, site_id).identifier_files())
