"""The ground truth of a synthetic site: what each written file is, and what the site holds."""

from __future__ import annotations

from typing import TYPE_CHECKING

from synth.model import BATCH_FOLDERS

if TYPE_CHECKING:
    from synth.model import Exam, Series
    from synth.site import Site

_DICOM_FIELDS = (
    "mrn", "accession", "study_uid", "series_uid", "sop_uid", "sop_class_uid", "modality", "role",
    "view_position", "image_type", "exam_id", "exam_time", "days_from_index",
)


def entry(key: str, exam: Exam, series: Series, i: int, *, quirk: str | None = None,
          duplicate_of: str | None = None, drop_sop: bool = False) -> dict:
    """Ground-truth record of one DICOM file."""
    return {
        "key": key, "batch": exam.batch, "defect": "no_sop_uid" if drop_sop else None,
        "mrn": exam.patient.mrn, "accession": exam.accession, "study_uid": exam.study_uid,
        "series_uid": series.uid, "sop_uid": None if drop_sop else series.sop_uids[i],
        "sop_class_uid": series.sop_class, "modality": series.modality, "role": series.role,
        "view_position": series.view, "image_type": series.image_type,
        "exam_id": exam.exam_id, "exam_time": f"{exam.when:%Y%m%d%H%M%S}",
        "days_from_index": exam.days, "quirk": quirk or exam.quirk,
        "duplicate_of": duplicate_of,
    }


def blank_entry(key: str, batch: str | None, defect: str) -> dict:
    """Ground-truth record of a file that is not readable DICOM: all DICOM fields are null."""
    return {"key": key, "batch": batch, "defect": defect, **dict.fromkeys(_DICOM_FIELDS),
            "quirk": None, "duplicate_of": None}


def site_truth(site: Site, files: list[dict]) -> dict:
    """The ground truth of a written site: its layout, paths, batches, patients, files, quirks
    and every identifier it planted."""
    used = {e.batch for e in site.exams}
    return {
        "layout": site.layout,
        "source": f"{site.sid}/images",
        "clinical": f"{site.sid}/clinical.csv",
        "remap": f"{site.sid}/id_remap.csv",
        "batches": {b: {"folder": folder, "complete": folder.endswith("-COMPLETE")}
                    for b, folder in BATCH_FOLDERS.items() if b in used},
        "patients": [
            {"mrn": p.mrn, "current_mrn": p.current_mrn, "name": p.pn,
             "birth_date": f"{p.birth_date:%Y%m%d}", "sex": p.sex,
             "index_date": f"{p.index_date:%Y%m%d}", "has_clinical": True,
             "has_images": p.has_images, "clinical": p.clinical}
            for p in site.patients
        ],
        "files": sorted(files, key=lambda f: f["key"]),
        "quirks": site.quirks,
        "identifiers": sorted(site.identifiers),
    }
