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
    """Files that copy others, decided on pseudonymized data only.

    The same SOP Instance UID as a file of this batch or an earlier published one: with the
    same bytes it is ``resent`` (the later copy goes), with different bytes a ``uid_conflict``
    (the later copy goes too, never overwriting the first). A whole study stored twice under
    new UIDs is a ``double_store``. Two different images with the same time stay.
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
    double = _double_stores(candidates, already_excluded | set(excluded))
    for seq, row in double.items():
        excluded[seq] = "double_store"
        rows.append(row)
    return DedupeResult(rows=pa.Table.from_pylist(rows, schema=DUPLICATES), excluded=excluded)


def _double_stores(candidates: pa.Table, excluded: set[int]) -> dict[int, dict]:
    """Studies stored twice (the tip sheet's pediatric radiographs): same patient, same study
    date and time, a different study, and pixel data identical image for image. The study
    seen first is kept; each file of the other gets a row naming its twin."""
    studies: dict[str, list[dict]] = {}
    for row in candidates.select(["seq", "study_uid", "sop_uid", "patient_id", "study_date",
                                  "study_time", "pixel_sha256"]).to_pylist():
        if row["seq"] not in excluded and row["pixel_sha256"]:
            studies.setdefault(row["study_uid"], []).append(row)
    first_at: dict[tuple, str] = {}
    out: dict[int, dict] = {}
    for study_uid, files in sorted(studies.items(), key=lambda kv: min(f["seq"] for f in kv[1])):
        head = files[0]
        pixels = tuple(sorted(f["pixel_sha256"] for f in files))
        key = (head["patient_id"], head["study_date"], head["study_time"], pixels)
        if key not in first_at:
            first_at[key] = study_uid
            continue
        twins = {f["pixel_sha256"]: f["sop_uid"] for f in studies[first_at[key]]}
        for f in files:
            out[f["seq"]] = {
                "uid": f["sop_uid"], "level": "instance", "kind": "double_store",
                "kept_uid": twins[f["pixel_sha256"]],
                "evidence": f"study stored twice: same patient, date and time as study "
                            f"{first_at[key]}; identical pixel data in all {len(files)} images",
            }
    return out
