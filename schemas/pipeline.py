"""Tables passed between pipeline steps (never published as they are).

``SOURCE_INDEX`` lives in the private zone and may hold PHI (source paths, original header
values). ``DEIDENTIFIED`` is what the de-identification step hands downstream: it holds no
original identifier, which is what lets every later step run on pseudonymized data only.
"""

from __future__ import annotations

import pyarrow as pa

OK = "ok"
QUARANTINED = "quarantined"

SOURCE_INDEX = pa.schema(
    [
        ("seq", pa.int32()),
        ("object_id", pa.string()),
        ("key", pa.string()),
        ("staged_path", pa.string()),
        ("size", pa.int64()),
        ("sha256", pa.string()),
        ("status", pa.string()),
        ("reason", pa.string()),
        ("patient_id", pa.string()),
        ("study_uid", pa.string()),
        ("series_uid", pa.string()),
        ("sop_uid", pa.string()),
        ("sop_class_uid", pa.string()),
        ("modality", pa.string()),
        ("study_date", pa.string()),
        ("exam_id", pa.string()),
        ("exam_time", pa.string()),
        ("exam_description", pa.string()),
        ("member_path", pa.string()),
    ]
)

DEIDENTIFIED = pa.schema(
    [
        ("seq", pa.int32()),
        ("object_id", pa.string()),
        ("status", pa.string()),
        ("reason", pa.string()),
        ("patient_id", pa.string()),
        ("study_uid", pa.string()),
        ("series_uid", pa.string()),
        ("sop_uid", pa.string()),
        ("sop_class_uid", pa.string()),
        ("modality", pa.string()),
        ("study_date", pa.date32()),
        ("study_time", pa.string()),
        ("study_description", pa.string()),
        ("series_description", pa.string()),
        ("body_part", pa.string()),
        ("view_position", pa.string()),
        ("image_type", pa.string()),
        ("slice_thickness", pa.float64()),
        ("slice_position", pa.float64()),
        ("instance_number", pa.int32()),
        ("rows", pa.int32()),
        ("columns", pa.int32()),
        ("transfer_syntax", pa.string()),
        ("burned_in", pa.string()),
        ("has_pixels", pa.bool_()),
        ("size_bytes", pa.int64()),
        ("sha256", pa.string()),
        ("pixel_sha256", pa.string()),
        ("output_path", pa.string()),
        ("exam_key", pa.string()),
        ("exam_time", pa.timestamp("s")),
        ("member_key", pa.string()),
        ("text_tokens_removed", pa.int32()),  # words the text cleaning removed (never which)
    ]
)

DEIDENTIFIED_CLINICAL = pa.schema(
    [
        ("patient_id", pa.string()),
        ("index_date", pa.date32()),
        ("sex", pa.string()),
        ("age_at_index", pa.int32()),
        ("covid_status", pa.string()),
        ("covid_status_reason", pa.string()),
        ("test_method", pa.string()),
    ]
)

# what became of each object of a batch: the stage it ended at, published, excluded or
# quarantined, and why (``tasks/catalog.py`` decide); the catalog tables derive from it
DECISIONS = pa.schema(
    [
        ("seq", pa.int32()),
        ("object_id", pa.string()),
        ("stage", pa.string()),
        ("outcome", pa.string()),
        ("reason", pa.string()),
    ]
)

QUARANTINE = pa.schema(
    [
        ("object_id", pa.string()),
        ("key", pa.string()),
        ("stage", pa.string()),
        ("reason", pa.string()),
    ]
)

LEDGER = pa.schema(
    [
        ("key", pa.string()),
        ("size", pa.int64()),
        ("mtime_ns", pa.int64()),
        ("sha256", pa.string()),
        ("batch_id", pa.string()),
    ]
)

STUDY_LINKS = pa.schema(
    [
        ("study_uid", pa.string()),
        ("patient_id", pa.string()),
        ("study_date", pa.date32()),
        ("days_from_index", pa.int32()),
        ("has_clinical", pa.bool_()),
    ]
)
