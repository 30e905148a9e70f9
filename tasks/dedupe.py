"""Dedupe: decide, on pseudonymized data only, which files are copies of others.

Nothing is dropped silently: every excluded file gets a ``duplicates`` row with its evidence.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

import pyarrow as pa
import pyarrow.compute as pc

from schemas.catalog import DUPLICATES
from schemas.pipeline import OK
from tasks.dicom_time import parse_tm

PUBLISHED_INSTANCES = pa.schema(
    [("sop_uid", pa.string()), ("sha256", pa.string()), ("batch_id", pa.string())]
)
# the site's published images with their study's patient, date and time: what a double store
# arriving in a later batch is compared with
PUBLISHED_IMAGES = pa.schema(
    [("study_uid", pa.string()), ("sop_uid", pa.string()), ("pixel_sha256", pa.string()),
     ("patient_id", pa.string()), ("study_date", pa.date32()), ("study_time", pa.time64("us")),
     ("batch_id", pa.string())]
)


@dataclass(frozen=True)
class DedupeResult:
    """The ``duplicates`` table and per excluded file (by seq) its duplicate kind."""

    rows: pa.Table
    excluded: dict[int, str]


def published_images(instances: pa.Table, studies: pa.Table) -> pa.Table:
    """PUBLISHED_IMAGES from published ``instances`` (study_uid, sop_uid, pixel_sha256,
    batch_id) and ``studies`` (study_uid, patient_id, study_date, study_time, batch_id)."""
    joined = instances.select(["study_uid", "sop_uid", "pixel_sha256", "batch_id"]).join(
        studies.select(["study_uid", "patient_id", "study_date", "study_time"]), "study_uid")
    return joined.select(PUBLISHED_IMAGES.names).cast(PUBLISHED_IMAGES)


def find_duplicates(
    deidentified: pa.Table, already_excluded: set[int], published: pa.Table, batch_id: str,
    published_studies: pa.Table | None = None, merges: list[dict] = (),
) -> DedupeResult:
    """Files that copy others, decided on pseudonymized data only.

    The same SOP Instance UID as a file of this batch or an earlier published one: with the
    same bytes it is ``resent`` (the later copy goes), with different bytes a ``uid_conflict``
    (the later copy goes too, never overwriting the first). A whole study stored twice under
    new UIDs is a ``double_store``, in this batch or against ``published_studies``
    (PUBLISHED_IMAGES of earlier batches). Two different images with the same time stay.
    ``merges`` are the split exams the one pass merged before writing (``split_exam_targets``,
    pseudonymized): each gets its study-level row.
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
    earlier = published_studies if published_studies is not None else (
        PUBLISHED_IMAGES.empty_table())
    double = _double_stores(candidates, already_excluded | set(excluded), earlier, batch_id)
    for seq, row in double.items():
        excluded[seq] = "double_store"
        rows.append(row)
    for merge in merges:
        rows.append({"uid": merge["uid"], "level": "study", "kind": "split_merged",
                     "kept_uid": merge["kept_uid"],
                     "evidence": f"exam split in two: same patient and exam id, parts "
                                 f"{merge['gap_minutes']:.0f} minutes apart; its "
                                 f"{merge['files']} files merged into study "
                                 f"{merge['kept_uid']}"})
    return DedupeResult(rows=pa.Table.from_pylist(rows, schema=DUPLICATES), excluded=excluded)


def split_exam_targets(files: list[dict], minutes: int) -> tuple[dict[str, str], list[dict]]:
    """Exams split in two (the tip sheet's CT quirk), decided from the headers before any
    file is written: same patient and exam id, parts that start within ``minutes`` (by the
    exam time the zip name gives). A study that copies an earlier one of the exam (same date,
    time and pixel data: a double store) is no part. ``files`` are dicts with study_uid,
    patient, exam_id, exam_time, study_date, study_time and pixel_sha256. Returns each part
    merged away -> the study it joins, and one record per merge (``uid``, ``kept_uid``,
    ``gap_minutes``, ``files``), by the original UIDs."""
    parts: dict[tuple, dict[str, list[dict]]] = {}
    for f in files:
        when = _exam_time(f["exam_time"])
        if f["exam_id"] and when:
            key = (f["patient"], f["exam_id"])
            parts.setdefault(key, {}).setdefault(f["study_uid"], []).append({**f, "at": when})
    targets: dict[str, str] = {}
    merges: list[dict] = []
    for studies in parts.values():
        seen: set[tuple] = set()
        distinct = {}
        for study_uid, members in studies.items():
            head = members[0]
            fingerprint = (head["study_date"], parse_tm(head["study_time"]),
                           tuple(sorted(m["pixel_sha256"] or "" for m in members)))
            if fingerprint not in seen:
                seen.add(fingerprint)
                distinct[study_uid] = members
        if len(distinct) < 2:
            continue
        ordered = sorted(distinct.items(), key=lambda kv: (min(m["at"] for m in kv[1]), kv[0]))
        target, first = ordered[0][0], min(m["at"] for m in ordered[0][1])
        for study_uid, members in ordered[1:]:
            gap = (min(m["at"] for m in members) - first).total_seconds() / 60
            if gap <= minutes:
                targets[study_uid] = target
                merges.append({"uid": study_uid, "kept_uid": target, "gap_minutes": gap,
                               "files": len(members)})
    return targets, merges


def _exam_time(text: str | None) -> datetime | None:
    try:
        return datetime.strptime(text, "%Y%m%d-%H%M%S") if text else None
    except ValueError:
        return None


def _double_stores(candidates: pa.Table, excluded: set[int], earlier: pa.Table,
                   batch_id: str) -> dict[int, dict]:
    """Studies stored twice (the tip sheet's pediatric radiographs): same patient, same study
    date and time, a different study, and pixel data identical image for image. A study
    published in an earlier batch is kept, else the study seen first in this batch; each file
    of the other gets a row naming its twin."""
    studies: dict[str, list[dict]] = {}
    for row in candidates.select(["seq", "study_uid", "sop_uid", "patient_id", "study_date",
                                  "study_time", "pixel_sha256"]).to_pylist():
        if row["seq"] not in excluded and row["pixel_sha256"]:
            studies.setdefault(row["study_uid"], []).append(row)
    first_at: dict[tuple, tuple[str, str, dict[str, str]]] = {}
    published: dict[str, dict[str, dict]] = {}
    for row in earlier.to_pylist():
        if row["pixel_sha256"]:
            published.setdefault(row["study_uid"], {})[row["sop_uid"]] = row
    for study_uid, by_sop in sorted(published.items()):
        files = list(by_sop.values())
        head = files[0]
        key = (head["patient_id"], head["study_date"], head["study_time"],
               tuple(sorted(f["pixel_sha256"] for f in files)))
        first_at.setdefault(key, (study_uid, f"batch {head['batch_id']}",
                                  {f["pixel_sha256"]: f["sop_uid"] for f in files}))
    out: dict[int, dict] = {}
    for study_uid, files in sorted(studies.items(), key=lambda kv: min(f["seq"] for f in kv[1])):
        head = files[0]
        pixels = tuple(sorted(f["pixel_sha256"] for f in files))
        key = (head["patient_id"], head["study_date"], parse_tm(head["study_time"]), pixels)
        if key not in first_at:
            first_at[key] = (study_uid, f"batch {batch_id}",
                             {f["pixel_sha256"]: f["sop_uid"] for f in files})
            continue
        kept_study, where, twins = first_at[key]
        if kept_study == study_uid:  # the same study published before: resent, not a copy
            continue
        for f in files:
            out[f["seq"]] = {
                "uid": f["sop_uid"], "level": "instance", "kind": "double_store",
                "kept_uid": twins[f["pixel_sha256"]],
                "evidence": f"study stored twice: same patient, date and time as study "
                            f"{kept_study} (kept in {where}); identical pixel data in all "
                            f"{len(files)} images",
            }
    return out
