"""The release catalog: one pyarrow schema per table, declared once for writers, views and tests.

Every table is stored as Parquet under ``catalog/<table>/site_id=<s>/batch_id=<b>/part-0.parquet``;
the partition columns live in the path, not in the files.
"""

from __future__ import annotations

import pyarrow as pa

PARTITION_COLUMNS: tuple[str, ...] = ("site_id", "batch_id")

PATIENTS = pa.schema(
    [
        ("patient_id", pa.string()),
        ("siteid", pa.string()),
        ("sex", pa.string()),
        ("age_at_index", pa.int32()),
        ("covid_status", pa.string()),
        ("test_method", pa.string()),
        ("index_date", pa.date32()),
        ("has_clinical", pa.bool_()),
    ]
)

STUDIES = pa.schema(
    [
        ("study_uid", pa.string()),
        ("patient_id", pa.string()),
        ("siteid", pa.string()),
        ("study_date", pa.date32()),
        ("study_time", pa.string()),
        ("days_from_index", pa.int32()),
        ("modalities", pa.string()),
        ("description", pa.string()),
        ("n_series", pa.int32()),
        ("n_instances", pa.int32()),
        ("status", pa.string()),
        ("reason", pa.string()),
    ]
)

SERIES = pa.schema(
    [
        ("series_uid", pa.string()),
        ("study_uid", pa.string()),
        ("modality", pa.string()),
        ("body_part", pa.string()),
        ("view_position", pa.string()),
        ("slice_thickness", pa.float64()),
        ("description", pa.string()),
        ("image_type", pa.string()),
        ("n_instances", pa.int32()),
        ("status", pa.string()),
        ("reason", pa.string()),
    ]
)

INSTANCES = pa.schema(
    [
        ("sop_uid", pa.string()),
        ("series_uid", pa.string()),
        ("study_uid", pa.string()),
        ("sop_class_uid", pa.string()),
        ("instance_number", pa.int32()),
        ("path", pa.string()),
        ("size_bytes", pa.int64()),
        ("sha256", pa.string()),
        ("pixel_sha256", pa.string()),
        ("rows", pa.int32()),
        ("columns", pa.int32()),
        ("transfer_syntax", pa.string()),
    ]
)

CLINICAL = pa.schema(
    [
        ("patient_id", pa.string()),
        ("name", pa.string()),
        ("value", pa.float64()),
        ("unit", pa.string()),
        ("day", pa.int32()),
    ]
)

QC = pa.schema(
    [
        ("level", pa.string()),
        ("uid", pa.string()),
        ("rule", pa.string()),
        ("outcome", pa.string()),
        ("detail", pa.string()),
    ]
)

DUPLICATES = pa.schema(
    [
        ("uid", pa.string()),
        ("level", pa.string()),
        ("kind", pa.string()),
        ("kept_uid", pa.string()),
        ("evidence", pa.string()),
    ]
)

RUNS = pa.schema(
    [
        ("run_id", pa.string()),
        ("flow", pa.string()),
        ("code_version", pa.string()),
        ("profile", pa.string()),
        ("started", pa.timestamp("ms", tz="UTC")),
        ("finished", pa.timestamp("ms", tz="UTC")),
        ("files_in", pa.int64()),
        ("published", pa.int64()),
        ("excluded", pa.int64()),
        ("quarantined", pa.int64()),
        ("counts", pa.string()),
    ]
)

MANIFEST = pa.schema(
    [
        ("path", pa.string()),
        ("size_bytes", pa.int64()),
        ("sha256", pa.string()),
    ]
)

TABLES: dict[str, pa.Schema] = {
    "patients": PATIENTS,
    "studies": STUDIES,
    "series": SERIES,
    "instances": INSTANCES,
    "clinical": CLINICAL,
    "qc": QC,
    "duplicates": DUPLICATES,
    "runs": RUNS,
}

# Tables appended to after publication (labels come back from readers): their files sit in the
# labelled study's partition beside, not inside, the batch's manifest.
LABELS = pa.schema(
    [
        ("study_uid", pa.string()),  # the published study the label is about
        ("patient_id", pa.string()),  # the study's published patient pseudonym
        ("item", pa.string()),  # the questionnaire item (link id), e.g. appearance
        ("answer", pa.string()),  # the answer code of a choice item, or the answer as text
        ("answer_kind", pa.string()),  # the item's type: choice, text, string, integer, ...
        ("reader_id", pa.string()),  # the reader, pseudonymized with the release's keyed hash
        ("role", pa.string()),  # the reader's role, e.g. reader or adjudicator
        ("adjudicates", pa.bool_()),  # true when the role's answer decides the consensus
        ("authored", pa.timestamp("ms", tz="UTC")),  # when the reader answered (if given)
        ("source", pa.string()),  # fhir or csv
        ("input_sha256", pa.string()),  # SHA-256 of the file the label was imported from
        ("questionnaire", pa.string()),  # canonical url|version of the form answered
    ]
)

SEGMENTATIONS = pa.schema(
    [
        ("sop_uid", pa.string()),  # the SEG object's SOP Instance UID
        ("series_uid", pa.string()),  # the SEG object's own series
        ("study_uid", pa.string()),  # the published study it belongs to
        ("patient_id", pa.string()),  # the study's published patient pseudonym
        ("referenced_series_uid", pa.string()),  # the published series it segments
        ("n_referenced_instances", pa.int32()),  # published images it references
        ("n_segments", pa.int32()),  # segments in the object
        ("segment_labels", pa.string()),  # the segments' labels, joined by "|"
        ("path", pa.string()),  # where the SEG file is published in the release
        ("size_bytes", pa.int64()),  # the published file's size
        ("sha256", pa.string()),  # the published file's SHA-256
    ]
)

APPENDED_TABLES: dict[str, pa.Schema] = {
    "labels": LABELS,
    "segmentations": SEGMENTATIONS,
}
