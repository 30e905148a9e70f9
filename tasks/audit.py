"""The audit trail of a frozen release: one Parquet file per record under
``releases/<name>/audit/``, written once and never rewritten, read through an ``audit`` view."""

from __future__ import annotations

import getpass
import hashlib
import json
from datetime import UTC, datetime

import pyarrow as pa

from schemas.release import AUDIT, AUDIT_DIR, RELEASES_DIR
from tasks.zones import Release, table_bytes


class AuditWriteError(RuntimeError):
    """An audit record could not be added without overwriting another."""


def default_requester() -> str:
    """Who asks, when --requester is not given: the operating-system user."""
    return getpass.getuser()


def audit_record(**fields) -> dict:
    """A complete audit row: the fields given, the time now (UTC) and a record id over both."""
    row = {name: None for name in AUDIT.names}
    row.update(fields)
    row["time"] = row["time"] or datetime.now(UTC)
    identity = json.dumps({k: str(v) for k, v in row.items() if k != "record_id"},
                          sort_keys=True)
    row["record_id"] = hashlib.sha256(identity.encode()).hexdigest()[:16]
    return row


def audit_path(name: str, row: dict, fixed: str | None = None) -> str:
    """Where a record lives: named by its time so the listing is chronological."""
    stem = fixed or f"{row['time'].strftime('%Y%m%dT%H%M%S%fZ')}-{row['record_id']}"
    return f"{RELEASES_DIR}/{name}/{AUDIT_DIR}/{stem}.parquet"


def append_audit(release: Release, name: str, row: dict) -> str:
    """Add one record to the release's audit trail; refuses to replace an existing file."""
    relative = audit_path(name, row)
    target = release.path(relative)
    if release.fs.exists(target):
        raise AuditWriteError(f"audit record {relative} exists already")
    release.fs.makedirs(target.rsplit("/", 1)[0], exist_ok=True)
    data = table_bytes(pa.Table.from_pylist([row], schema=AUDIT))
    with release.fs.open(target, "xb" if release.local else "wb") as fh:
        fh.write(data)
    return relative


def audit_view_sql(release: Release, name: str) -> str:
    """The ``audit`` view: every record file of the release, read at query time."""
    pattern = release.uri(f"{RELEASES_DIR}/{name}/{AUDIT_DIR}/*.parquet").replace("'", "''")
    return (f"CREATE VIEW audit AS SELECT * FROM read_parquet('{pattern}', union_by_name = true) "
            "ORDER BY time, record_id")
