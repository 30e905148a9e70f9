"""Dedupe: decide, on pseudonymized data only, which files are copies of others.

Nothing is dropped silently: every excluded file gets a ``duplicates`` row with its evidence.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from io import BytesIO

import pyarrow as pa
import pyarrow.compute as pc
from pydicom import dcmread
from pydicom.filewriter import dcmwrite

from schemas.catalog import DUPLICATES
from schemas.pipeline import OK

PUBLISHED_INSTANCES = pa.schema(
    [("sop_uid", pa.string()), ("sha256", pa.string()), ("batch_id", pa.string())]
)


@dataclass(frozen=True)
class DedupeResult:
    """The ``duplicates`` table, per excluded file (by seq) its duplicate kind, and per file
    moved into another study (by seq) its new study UID, size and sha256."""

    rows: pa.Table
    excluded: dict[int, str]
    merged: dict[int, tuple[str, int, str]] = field(default_factory=dict)


def find_duplicates(
    deidentified: pa.Table, already_excluded: set[int], published: pa.Table, batch_id: str,
    split_minutes: int = 30,
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
    merged = {}
    for seq, (row, target) in _split_exams(candidates, already_excluded | set(excluded),
                                           split_minutes).items():
        merged[seq] = target
        rows.append(row)
    return DedupeResult(rows=pa.Table.from_pylist(rows, schema=DUPLICATES), excluded=excluded,
                        merged=merged)


def _split_exams(candidates: pa.Table, excluded: set[int],
                 minutes: int) -> dict[int, tuple[dict, tuple[str, int, str]]]:
    """Exams split in two (the tip sheet's CT quirk): same patient and exam id, parts that
    start within ``minutes``. Files of the later parts move into the first part's study: the
    ones to be published get that Study Instance UID in their staged DICOM, the excluded ones
    in the catalog only."""
    parts: dict[tuple, dict[str, list[dict]]] = {}
    for row in candidates.select(["seq", "study_uid", "sop_uid", "patient_id", "exam_key",
                                  "exam_time", "output_path", "size_bytes",
                                  "sha256"]).to_pylist():
        if row["exam_key"] and row["exam_time"]:
            key = (row["patient_id"], row["exam_key"])
            parts.setdefault(key, {}).setdefault(row["study_uid"], []).append(row)
    out = {}
    for studies in parts.values():
        if len(studies) < 2:
            continue
        ordered = sorted(studies.items(),
                         key=lambda kv: (min(f["exam_time"] for f in kv[1]), kv[0]))
        target, first = ordered[0][0], min(f["exam_time"] for f in ordered[0][1])
        for study_uid, files in ordered[1:]:
            gap = (min(f["exam_time"] for f in files) - first).total_seconds() / 60
            if gap > minutes:
                continue
            for f in files:
                if f["seq"] in excluded:  # not published: only its catalog rows move
                    size, sha = f["size_bytes"], f["sha256"]
                else:
                    size, sha = _set_study_uid(f["output_path"], target)
                out[f["seq"]] = (
                    {"uid": f["sop_uid"], "level": "instance", "kind": "split_merged",
                     "kept_uid": target,
                     "evidence": f"exam split in two: same patient and exam id, parts "
                                 f"{gap:.0f} minutes apart; study {study_uid} merged into "
                                 f"study {target}"},
                    (target, size, sha),
                )
    return out


def _set_study_uid(path: str, study_uid: str) -> tuple[int, str]:
    """Give a staged, de-identified file another Study Instance UID; its new size and sha256."""
    ds = dcmread(path)
    ds.StudyInstanceUID = study_uid
    buffer = BytesIO()
    dcmwrite(buffer, ds, enforce_file_format=True)
    data = buffer.getvalue()
    with open(path, "wb") as out:
        out.write(data)
    return len(data), hashlib.sha256(data).hexdigest()


def apply_merges(deidentified: pa.Table, merged: dict[int, tuple[str, int, str]]) -> pa.Table:
    """The de-identified table with merged files' new study UID, size and hash."""
    if not merged:
        return deidentified
    rows = deidentified.to_pylist()
    for row in rows:
        if row["seq"] in merged:
            row["study_uid"], row["size_bytes"], row["sha256"] = merged[row["seq"]]
    return pa.Table.from_pylist(rows, schema=deidentified.schema)


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
