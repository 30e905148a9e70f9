"""Dedupe: decide, on pseudonymized data only, which files are copies of others.

Nothing is dropped silently: every excluded file gets a ``duplicates`` row with its evidence.
"""

from __future__ import annotations

from dataclasses import dataclass

import pyarrow as pa
import pyarrow.compute as pc

from schemas.catalog import DUPLICATES
from schemas.pipeline import OK

PUBLISHED_INSTANCES = pa.schema(
    [("sop_uid", pa.string()), ("sha256", pa.string()), ("batch_id", pa.string())]
)


@dataclass(frozen=True)
class DedupeResult:
    """The ``duplicates`` table and, per excluded file (by seq), its duplicate kind."""

    rows: pa.Table
    excluded: dict[int, str]


def find_duplicates(
    deidentified: pa.Table, already_excluded: set[int], published: pa.Table, batch_id: str
) -> DedupeResult:
    """Files whose SOP Instance UID was seen before, in this batch or an earlier published one.

    The same UID with the same bytes is ``resent`` (the later copy goes); the same UID with
    different bytes is a ``uid_conflict`` (the later copy goes too, never overwriting the first).
    """
    first_seen = {
        row["sop_uid"]: (row["sha256"], f"batch {row['batch_id']}")
        for row in published.to_pylist()
    }
    rows: list[dict] = []
    excluded: dict[int, str] = {}
    candidates = deidentified.filter(pc.equal(deidentified["status"], OK))
    for row in candidates.select(["seq", "sop_uid", "sha256"]).to_pylist():
        if row["seq"] in already_excluded:
            continue
        seen = first_seen.get(row["sop_uid"])
        if seen is None:
            first_seen[row["sop_uid"]] = (row["sha256"], f"batch {batch_id}")
            continue
        sha, where = seen
        kind = "resent" if sha == row["sha256"] else "uid_conflict"
        excluded[row["seq"]] = kind
        evidence = (
            f"same SOP Instance UID as the copy kept in {where}; "
            + ("identical bytes" if kind == "resent" else "different bytes")
        )
        rows.append({"uid": row["sop_uid"], "level": "instance", "kind": kind,
                     "kept_uid": row["sop_uid"], "evidence": evidence})
    return DedupeResult(rows=pa.Table.from_pylist(rows, schema=DUPLICATES), excluded=excluded)
