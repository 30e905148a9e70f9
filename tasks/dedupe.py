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
    """The ``duplicates`` table, per excluded file (by seq) its duplicate kind, and per file
    moved into another study (by seq) its new study UID, size and sha256."""

    rows: pa.Table
    excluded: dict[int, str]
    merged: dict[int, tuple[str, int, str]] = field(default_factory=dict)


def published_images(instances: pa.Table, studies: pa.Table) -> pa.Table:
    """PUBLISHED_IMAGES from published ``instances`` (study_uid, sop_uid, pixel_sha256,
    batch_id) and ``studies`` (study_uid, patient_id, study_date, study_time, batch_id)."""
    joined = instances.select(["study_uid", "sop_uid", "pixel_sha256", "batch_id"]).join(
        studies.select(["study_uid", "patient_id", "study_date", "study_time"]), "study_uid")
    return joined.select(PUBLISHED_IMAGES.names).cast(PUBLISHED_IMAGES)


def find_duplicates(
    deidentified: pa.Table, already_excluded: set[int], published: pa.Table, batch_id: str,
    split_minutes: int = 30, published_studies: pa.Table | None = None,
) -> DedupeResult:
    """Files that copy others, decided on pseudonymized data only.

    The same SOP Instance UID as a file of this batch or an earlier published one: with the
    same bytes it is ``resent`` (the later copy goes), with different bytes a ``uid_conflict``
    (the later copy goes too, never overwriting the first). A whole study stored twice under
    new UIDs is a ``double_store``, in this batch or against ``published_studies``
    (PUBLISHED_IMAGES of earlier batches). Two different images with the same time stay, and
    the copies of a double store are never taken for the parts of a split exam.
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
    copies = set(excluded)  # copies are no part of any exam: they leave before parts are found
    merged, merge_rows = _split_exams(candidates.filter(pa.array(
        [seq not in copies for seq in candidates.column("seq").to_pylist()], pa.bool_())),
        already_excluded, split_minutes)
    rows.extend(merge_rows)
    return DedupeResult(rows=pa.Table.from_pylist(rows, schema=DUPLICATES), excluded=excluded,
                        merged=merged)


def _split_exams(candidates: pa.Table, excluded: set[int],
                 minutes: int) -> tuple[dict[int, tuple[str, int, str]], list[dict]]:
    """Exams split in two (the tip sheet's CT quirk): same patient and exam id, parts that
    start within ``minutes``. Files of the later parts move into the first part's study: the
    ones to be published get that Study Instance UID in their staged DICOM, the excluded ones
    in the catalog only. Returns the moved files (by seq) and one study-level row per part
    merged away."""
    parts: dict[tuple, dict[str, list[dict]]] = {}
    for row in candidates.select(["seq", "study_uid", "sop_uid", "patient_id", "exam_key",
                                  "exam_time", "output_path", "size_bytes",
                                  "sha256"]).to_pylist():
        if row["exam_key"] and row["exam_time"]:
            key = (row["patient_id"], row["exam_key"])
            parts.setdefault(key, {}).setdefault(row["study_uid"], []).append(row)
    moved: dict[int, tuple[str, int, str]] = {}
    rows: list[dict] = []
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
                moved[f["seq"]] = (target, size, sha)
            rows.append({"uid": study_uid, "level": "study", "kind": "split_merged",
                         "kept_uid": target,
                         "evidence": f"exam split in two: same patient and exam id, parts "
                                     f"{gap:.0f} minutes apart; its {len(files)} files "
                                     f"merged into study {target}"})
    return moved, rows


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
