"""Assemble a batch's catalog tables (the marts) from what the curation steps decided.

Every file gets exactly one disposition: quarantined (unusable), excluded (QC or duplicate,
with the reason), or published. The counts are checked to add up before anything is written.
"""

from __future__ import annotations

import json
from collections import Counter, defaultdict
from dataclasses import dataclass
from datetime import UTC, datetime
from importlib.metadata import version

import pyarrow as pa

from schemas import catalog as cat
from schemas.pipeline import DECISIONS, QUARANTINED
from tasks.dicom_time import parse_tm

PUBLISHED = "published"
EXCLUDED = "excluded"


class AccountingError(RuntimeError):
    """Files in != published + excluded + quarantined: the run must stop, loudly."""


@dataclass(frozen=True)
class CatalogBatch:
    """The tables of one batch, the files to publish (staged path, release path, size,
    sha256), and the batch's accounting."""

    tables: dict[str, pa.Table]
    files: list[tuple[str, str, int, str]]
    counts: dict


def dicom_path(site_id: str, row: dict) -> str:
    """Where a published file lives in the release (pseudonymous names only)."""
    return (f"dicom/{site_id}/{row['patient_id']}/{row['study_uid']}/"
            f"{row['series_uid']}/{row['sop_uid']}.dcm")


def run_row(run_id: str, profile: str, started: datetime, counts: dict) -> pa.Table:
    """The batch's row of the ``runs`` table."""
    return pa.Table.from_pylist([{
        "run_id": run_id, "flow": "site_batch", "code_version": version("radrepo"),
        "profile": profile, "started": started, "finished": datetime.now(UTC),
        "files_in": counts["files_in"], "published": counts["published"],
        "excluded": counts["excluded"], "quarantined": counts["quarantined"],
        "counts": json.dumps(counts, sort_keys=True),
    }], schema=cat.RUNS)


def decide(index: pa.Table, deidentified: pa.Table, qc_excluded: dict[int, str],
           window: dict[int, str], dup_excluded: dict[int, str]) -> pa.Table:
    """The batch's DECISIONS: one row per object that came in, saying at which stage it
    ended and why. The one place precedence is decided: refused at ingest, then at
    de-identification, then QC, the inclusion window, duplicates; else published."""
    status = {r["seq"]: (r["status"], r["reason"])
              for r in deidentified.select(["seq", "status", "reason"]).to_pylist()}
    rows = []
    for r in index.select(["seq", "object_id", "status", "reason"]).to_pylist():
        seq = r["seq"]
        if r["status"] == QUARANTINED:
            decision = ("ingest", QUARANTINED, r["reason"])
        elif status.get(seq, (QUARANTINED,))[0] == QUARANTINED:
            decision = ("deidentify", QUARANTINED, status.get(seq, (None, "not read"))[1])
        elif seq in qc_excluded:
            decision = ("qc", EXCLUDED, f"qc:{qc_excluded[seq]}")
        elif seq in window:
            decision = ("clinical_join", EXCLUDED, window[seq])
        elif seq in dup_excluded:
            decision = ("dedupe", EXCLUDED, f"duplicate:{dup_excluded[seq]}")
        else:
            decision = ("publish", PUBLISHED, None)
        rows.append(dict(zip(("seq", "object_id", "stage", "outcome", "reason"),
                             (seq, r["object_id"], *decision), strict=True)))
    return pa.Table.from_pylist(rows, schema=DECISIONS)


def with_study_uids(qc: pa.Table, rows: list[dict], duplicates: pa.Table) -> pa.Table:
    """The qc rows with the study each is about, as published: rows are the batch's
    de-identified files after split exams were merged, so a part merged away is named by the
    study it joined."""
    study_of = {"instance": {r["sop_uid"]: r["study_uid"] for r in rows},
                "series": {r["series_uid"]: r["study_uid"] for r in rows},
                "study": {d["uid"]: d["kept_uid"] for d in duplicates.to_pylist()
                          if d["level"] == "study"}}
    out = [{**q, "study_uid": study_of[q["level"]].get(q["uid"], q["study_uid"])}
           for q in qc.to_pylist()]
    return pa.Table.from_pylist(out, schema=cat.QC)


def _modalities(members: list[dict]) -> str:
    return ",".join(sorted({m["modality"] for m in members if m["modality"]}))


def _status(reasons: list[str | None]) -> tuple[str, str | None]:
    if any(r is None for r in reasons):
        return PUBLISHED, None
    return EXCLUDED, Counter(reasons).most_common(1)[0][0]


def assemble_catalog(
    *,
    site_id: str,
    siteid: str,
    deidentified: pa.Table,
    decisions: pa.Table,
    links: pa.Table,
    clinical_patients: pa.Table,
    measurements: pa.Table,
    qc_outcomes: pa.Table,
    duplicates: pa.Table,
    known_patients: set[str],
) -> CatalogBatch:
    """Build every catalog table of the batch from its ``decisions`` (see ``decide``) and
    check that the file counts add up."""
    decided = {r["seq"]: (r["outcome"], r["reason"]) for r in decisions.select(
        ["seq", "outcome", "reason"]).to_pylist()}
    files_in = decisions.num_rows
    rows = [r for r in deidentified.to_pylist() if decided[r["seq"]][0] != QUARANTINED]
    reason_of = {r["seq"]: decided[r["seq"]][1] for r in rows}
    published = [r for r in rows if decided[r["seq"]][0] == PUBLISHED]

    instances = [
        {**{k: r[k] for k in ("sop_uid", "series_uid", "study_uid", "sop_class_uid",
                              "instance_number", "size_bytes", "sha256", "pixel_sha256",
                              "rows", "columns", "transfer_syntax")},
         "path": dicom_path(site_id, r)}
        for r in published
    ]
    files = [(r["output_path"], dicom_path(site_id, r), r["size_bytes"], r["sha256"])
             for r in published]
    excluded_instances = [
        {**{k: r[k] for k in ("sop_uid", "series_uid", "study_uid", "sop_class_uid", "modality",
                              "instance_number", "size_bytes", "sha256", "pixel_sha256")},
         "reason": reason_of[r["seq"]]}
        for r in rows if reason_of[r["seq"]] is not None
    ]

    by_series: dict[str, list[dict]] = defaultdict(list)
    by_study: dict[str, list[dict]] = defaultdict(list)
    for r in rows:
        by_series[r["series_uid"]].append(r)
        by_study[r["study_uid"]].append(r)

    series = []
    for uid, members in sorted(by_series.items()):
        status, reason = _status([reason_of[m["seq"]] for m in members])
        first = members[0]
        thickness = [m["slice_thickness"] for m in members if m["slice_thickness"] is not None]
        series.append({
            "series_uid": uid, "study_uid": first["study_uid"], "modality": first["modality"],
            "body_part": first["body_part"], "view_position": first["view_position"],
            "slice_thickness": min(thickness) if thickness else None,
            "description": first["series_description"], "image_type": first["image_type"],
            "n_instances": sum(reason_of[m["seq"]] is None for m in members),
            "n_excluded": sum(reason_of[m["seq"]] is not None for m in members),
            "text_tokens_removed": sum(m.get("text_tokens_removed") or 0 for m in members),
            "status": status, "reason": reason,
        })

    link_of = {r["study_uid"]: r for r in links.to_pylist()}
    studies = []
    for uid, members in sorted(by_study.items()):
        status, reason = _status([reason_of[m["seq"]] for m in members])
        kept = [m for m in members if reason_of[m["seq"]] is None]
        times = sorted(t for t in (parse_tm(m["study_time"]) for m in members) if t)
        link = link_of.get(uid, {})
        studies.append({
            "study_uid": uid, "patient_id": members[0]["patient_id"], "siteid": siteid,
            "study_date": link.get("study_date"), "study_time": times[0] if times else None,
            "days_from_index": link.get("days_from_index"),
            "modalities": _modalities(kept), "all_modalities": _modalities(members),
            "description": next((m["study_description"] for m in members
                                 if m["study_description"]), None),
            "n_series": len({m["series_uid"] for m in kept}), "n_instances": len(kept),
            "n_excluded": len(members) - len(kept),
            "status": status, "reason": reason,
        })

    clinical_by_patient = {r["patient_id"]: r for r in clinical_patients.to_pylist()}
    new_patients = sorted({r["patient_id"] for r in published} - known_patients)
    patients = []
    for pid in new_patients:
        clin = clinical_by_patient.get(pid)
        patients.append({
            "patient_id": pid, "siteid": siteid,
            "sex": clin["sex"] if clin else None,
            "age_at_index": clin["age_at_index"] if clin else None,
            "covid_status": clin["covid_status"] if clin else "unknown",
            "covid_status_reason": (clin["covid_status_reason"] if clin
                                    else "no_clinical_record"),
            "test_method": clin["test_method"] if clin else None,
            "index_date": clin["index_date"] if clin else None,
            "has_clinical": clin is not None,
        })
    new_set = set(new_patients)
    clinical = [m for m in measurements.to_pylist() if m["patient_id"] in new_set]

    quarantined = Counter(r for d, r in decided.values() if d == QUARANTINED)
    n_quarantined = sum(quarantined.values())
    excluded_reasons = Counter(reason_of[r["seq"]] for r in rows if reason_of[r["seq"]])
    counts = {
        "files_in": files_in,
        "published": len(published),
        "excluded": sum(excluded_reasons.values()),
        "quarantined": n_quarantined,
        "excluded_by_reason": dict(sorted(excluded_reasons.items())),
        "quarantined_by_reason": dict(sorted(quarantined.items())),
        "patients_without_clinical": sum(1 for p in patients if not p["has_clinical"]),
        # clinical records whose patient has no image published yet (counted, not published)
        "clinical_rows_without_images": len(
            set(clinical_by_patient) - known_patients - {r["patient_id"] for r in published}),
    }
    if counts["files_in"] != counts["published"] + counts["excluded"] + counts["quarantined"]:
        raise AccountingError(
            f"files in ({counts['files_in']}) != published ({counts['published']}) + excluded "
            f"({counts['excluded']}) + quarantined ({counts['quarantined']})"
        )
    tables = {
        "patients": pa.Table.from_pylist(patients, schema=cat.PATIENTS),
        "studies": pa.Table.from_pylist(studies, schema=cat.STUDIES),
        "series": pa.Table.from_pylist(series, schema=cat.SERIES),
        "instances": pa.Table.from_pylist(instances, schema=cat.INSTANCES),
        "excluded_instances": pa.Table.from_pylist(excluded_instances,
                                                   schema=cat.EXCLUDED_INSTANCES),
        "clinical": pa.Table.from_pylist(clinical, schema=cat.CLINICAL),
        "qc": with_study_uids(qc_outcomes, rows, duplicates),
        "duplicates": duplicates,
    }
    return CatalogBatch(tables=tables, files=files, counts=counts)
