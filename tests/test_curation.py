"""QC rules, clinical join and dedupe over hand-built de-identified tables."""

from __future__ import annotations

from datetime import date

import pyarrow as pa

from schemas.config import ClinicalConfig
from schemas.pipeline import DEIDENTIFIED, DEIDENTIFIED_CLINICAL
from tasks.clinical import join_clinical
from tasks.dedupe import PUBLISHED_INSTANCES, find_duplicates
from tasks.deidentify.clinical import deidentify_clinical
from tasks.deidentify.keys import PseudonymKeys
from tasks.qc import evaluate_qc

CT = "1.2.840.10008.5.1.4.1.1.2"
SC = "1.2.840.10008.5.1.4.1.1.7"


def instance(seq: int, **fields) -> dict:
    row = {"seq": seq, "object_id": f"o{seq}", "status": "ok", "patient_id": "P1",
           "study_uid": "2.25.1", "series_uid": "2.25.11", "sop_uid": f"2.25.100{seq}",
           "sop_class_uid": CT, "modality": "CT", "study_date": date(2015, 1, 10),
           "image_type": "ORIGINAL\\PRIMARY\\AXIAL", "sha256": f"h{seq}", "has_pixels": True}
    row.update(fields)
    return row


def table(*rows: dict) -> pa.Table:
    return pa.Table.from_pylist(list(rows), schema=DEIDENTIFIED)


def test_qc_rules_exclude_with_reasons_and_honour_overrides():
    t = table(
        instance(0),
        instance(1, modality="OT", sop_class_uid=SC, image_type="DERIVED\\SECONDARY\\SCREEN SAVE"),
        instance(2, sop_class_uid=SC, image_type="DERIVED\\SECONDARY\\OTHER"),
        instance(3, modality="MR"),
        instance(4, status="quarantined"),
    )
    result = evaluate_qc(t)
    assert result.excluded == {1: "modality_not_allowed", 2: "secondary_capture",
                               3: "modality_not_allowed"}
    outcomes = {(r["uid"], r["rule"]): r for r in result.outcomes.to_pylist()}
    assert outcomes[("2.25.1001", "screen_save")]["outcome"] == "excluded"
    assert outcomes[("2.25.1003", "modality_not_allowed")]["detail"] == (
        "modality MR is not in the allow-list")
    assert all(r["level"] == "instance" for r in outcomes.values())
    assert evaluate_qc(t, {"allowed_modalities": ["CT", "MR"]}).excluded == {
        1: "modality_not_allowed", 2: "secondary_capture"}


def test_clinical_deidentification_and_join(tmp_path):
    keys = PseudonymKeys(b"curation-secret-0001")
    csv = tmp_path / "emr.csv"
    csv.write_text(
        "mrn,covid_encounter_date,test_method,rtpcr_result,sex,birth_date,wcc,crp,po2,notes\n"
        "M1,2020-04-01,PCR,positive,F,1960-05-02,11.2,48,9.1,Jane Doe coughing\n"
        "M2,2020-04-03,serology,,m,1925-01-01,,,,\n"
        ",2020-04-03,PCR,negative,F,1950-01-01,,,,\n"
        "OLD9,2020-04-05,PCR,negative,F,1950-01-01,,,,\n"
    )
    result = deidentify_clinical(str(csv), ClinicalConfig(path=str(csv)), keys, "s1",
                                 {"OLD9": "NEW9"})
    patients = {r["patient_id"]: r for r in result.patients.to_pylist()}
    p1, p2 = keys.patient_id("s1", "M1"), keys.patient_id("s1", "M2")
    assert set(patients) == {p1, p2, keys.patient_id("s1", "NEW9")}
    assert patients[p1]["age_at_index"] == 59 and patients[p1]["covid_status"] == "positive"
    assert patients[p2]["age_at_index"] == 90 and patients[p2]["sex"] == "M"  # >89 -> 90
    offset = keys.date_offset_days("s1", "M1")
    assert (patients[p1]["index_date"] - date(2020, 4, 1)).days == offset
    assert result.rows_skipped == {"no patient id": 1}
    measured = {(r["name"], r["value"]) for r in result.measurements.to_pylist()}
    assert measured == {("wcc", 11.2), ("crp", 48.0), ("po2", 9.1)}
    text = repr(result.patients.to_pylist()) + repr(result.measurements.to_pylist())
    assert "Jane" not in text and "M1" not in text

    study_day = patients[p1]["index_date"].toordinal() - 3
    images = table(
        instance(0, patient_id=p1, study_date=date.fromordinal(study_day)),
        instance(1, patient_id="PNOCLIN", study_uid="2.25.2", study_date=date(2015, 1, 1)),
    )
    links = {r["study_uid"]: r for r in join_clinical(images, result.patients).to_pylist()}
    assert links["2.25.1"]["days_from_index"] == -3 and links["2.25.1"]["has_clinical"]
    assert links["2.25.2"]["days_from_index"] is None and not links["2.25.2"]["has_clinical"]


def test_join_clinical_handles_no_clinical_rows():
    links = join_clinical(table(instance(0)), DEIDENTIFIED_CLINICAL.empty_table())
    assert links.num_rows == 1 and links.column("has_clinical").to_pylist() == [False]


def test_dedupe_same_sop_uid_within_and_across_batches():
    t = table(
        instance(0, sop_uid="2.25.7", sha256="same"),
        instance(1, sop_uid="2.25.7", sha256="same"),       # resent inside the batch
        instance(2, sop_uid="2.25.8", sha256="new-bytes"),  # conflicts with an earlier batch
        instance(3, sop_uid="2.25.9", sha256="x"),          # already excluded by QC: ignored
        instance(4, sop_uid="2.25.9", sha256="x"),
    )
    published = pa.Table.from_pylist(
        [{"sop_uid": "2.25.8", "sha256": "old-bytes", "batch_id": "B0"}],
        schema=PUBLISHED_INSTANCES)
    result = find_duplicates(t, {3}, published, "B1")
    assert result.excluded == {1: "resent", 2: "uid_conflict"}
    rows = {r["kind"]: r for r in result.rows.to_pylist()}
    assert rows["uid_conflict"]["evidence"].startswith("same SOP Instance UID as the copy kept "
                                                       "in batch B0")
    assert rows["resent"]["kept_uid"] == "2.25.7"
