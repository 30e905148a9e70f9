"""QC rules, clinical join and dedupe over hand-built de-identified tables."""

from __future__ import annotations

from datetime import date, datetime, timedelta

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from schemas.config import DEFAULT_WINDOWS, ClinicalConfig, Window
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
           "image_type": "ORIGINAL\\PRIMARY\\AXIAL", "sha256": f"h{seq}", "has_pixels": True,
           "slice_thickness": 2.5, "instance_number": seq + 1, "rows": 512, "columns": 512}
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
    assert evaluate_qc(t, {"allowed_modalities": ["CT", "MR"]}).excluded == {
        1: "modality_not_allowed", 2: "secondary_capture"}


def test_qc_ct_and_radiograph_rules():
    t = table(
        # series 11: a good axial series with instance 3 missing
        instance(0, slice_position=0.0), instance(1, slice_position=2.5),
        instance(2, instance_number=4, slice_position=7.5),
        # series 12: a scout, series 13: a 3D reconstruction, series 14: 1 mm slices
        instance(3, series_uid="2.25.12", image_type="ORIGINAL\\PRIMARY\\LOCALIZER"),
        instance(4, series_uid="2.25.13", image_type="DERIVED\\SECONDARY\\REFORMATTED\\3D"),
        instance(5, series_uid="2.25.14", slice_thickness=1.0),
        instance(6, series_uid="2.25.14", slice_thickness=1.0, instance_number=7),
        # radiographs: frontal kept, lateral flagged, burned-in text excluded
        instance(7, series_uid="2.25.21", modality="CR", view_position="PA"),
        instance(8, series_uid="2.25.22", modality="CR", view_position="LL"),
        instance(9, series_uid="2.25.23", modality="DX", view_position="AP", burned_in="YES"),
        instance(10, series_uid="2.25.24", modality="DX", view_position="AP", has_pixels=False),
    )
    result = evaluate_qc(t)
    assert result.excluded == {3: "ct_localizer", 4: "derived_reconstruction",
                               5: "ct_slice_thickness", 6: "ct_slice_thickness",
                               9: "burned_in_annotation", 10: "no_pixel_data"}
    flagged = {(r["uid"], r["rule"]): r["detail"] for r in result.outcomes.to_pylist()
               if r["outcome"] == "flagged"}
    assert flagged == {
        ("2.25.11", "ct_missing_instances"): "instance numbers 1-4: 1 missing",
        ("2.25.11", "ct_inconsistent_spacing"): "slice spacing varies from 2.5 to 5.0 mm",
        ("2.25.1008", "radiograph_not_frontal"): "view position LL is not frontal",
    }
    thickness = next(r for r in result.outcomes.to_pylist() if r["rule"] == "ct_slice_thickness")
    assert thickness == {"level": "series", "uid": "2.25.14", "study_uid": "2.25.1",
                         "rule": "ct_slice_thickness",
                         "outcome": "excluded",
                         "detail": "slice thickness 1.0 mm is outside 2.5-5.0 mm"}
    # a site may accept thin slices; a reviewer may clear a burned-in series
    relaxed = evaluate_qc(t, {"ct_slice_thickness_min": 0.5,
                              "reviewer_cleared_series": ["2.25.23"]})
    assert set(relaxed.excluded) == {3, 4, 10}


def test_slice_thickness_is_judged_on_ct_images_only():
    dose = {"series_uid": "2.25.15", "sop_class_uid": SC, "image_type": "DERIVED\\SECONDARY",
            "slice_thickness": None}
    t = table(instance(0), instance(1, **dose))
    result = evaluate_qc(t)
    assert result.excluded == {1: "secondary_capture"}
    assert "ct_slice_thickness" not in {r["rule"] for r in result.outcomes.to_pylist()}
    # a CT image series without a thickness says so, without a number it does not have
    missing = evaluate_qc(table(instance(0, slice_thickness=None)))
    [row] = [r for r in missing.outcomes.to_pylist() if r["rule"] == "ct_slice_thickness"]
    assert row["detail"] == "slice thickness missing"


def test_site_qc_overrides_merge_over_the_consortium(tmp_path):
    from schemas.config import parse_config

    cfg = parse_config({"release": "r", "work_dir": "w", "qc": {"frontal_views": ["PA"]},
                        "sites": [{"site_id": "a", "source": {"kind": "flat", "path": "x"},
                                   "qc": {"ct_slice_thickness_min": 1.0}},
                                  {"site_id": "b", "source": {"kind": "flat", "path": "y"}}]},
                       tmp_path)
    assert cfg.qc_params("a")["ct_slice_thickness_min"] == 1.0
    assert cfg.qc_params("a")["frontal_views"] == ("PA",)
    assert cfg.qc_params("b")["ct_slice_thickness_min"] == 2.5


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
    joined = join_clinical(images, result.patients, DEFAULT_WINDOWS)
    links = {r["study_uid"]: r for r in joined.links.to_pylist()}
    assert links["2.25.1"]["days_from_index"] == -3 and links["2.25.1"]["has_clinical"]
    assert links["2.25.2"]["days_from_index"] is None and not links["2.25.2"]["has_clinical"]


def test_join_clinical_handles_no_clinical_rows():
    joined = join_clinical(table(instance(0)), DEIDENTIFIED_CLINICAL.empty_table(),
                           DEFAULT_WINDOWS)
    assert joined.links.column("has_clinical").to_pylist() == [False]
    assert joined.outside_window == {}
    assert joined.outcomes.to_pylist()[0]["rule"] == "no_clinical_record"
    assert joined.outcomes.to_pylist()[0]["outcome"] == "flagged"


def test_inclusion_window_edges():
    index = date(2015, 6, 1)
    patients = pa.Table.from_pylist([{"patient_id": "P1", "index_date": index}],
                                    schema=DEIDENTIFIED_CLINICAL)
    cases = {"cr365": ("CR", -365), "cr366": ("CR", -366), "dx400": ("DX", -400),
             "ct30": ("CT", -30), "ct31": ("CT", -31), "ctlate": ("CT", 200)}
    rows = [instance(i, study_uid=uid, series_uid=uid, modality=modality,
                     study_date=index + timedelta(days=days))
            for i, (uid, (modality, days)) in enumerate(cases.items())]
    # a CT study holding a screen save is judged by the CT window
    rows.append(instance(9, study_uid="ct31", series_uid="x", modality="OT",
                         study_date=index - timedelta(days=31)))
    joined = join_clinical(table(*rows), patients, DEFAULT_WINDOWS)
    assert joined.outside_window == {"cr366": "outside_window:CR", "dx400": "outside_window:DX",
                                     "ct31": "outside_window:CT"}
    details = {r["uid"]: r["detail"] for r in joined.outcomes.to_pylist()}
    assert details["ct31"] == ("CT study 31 days before the index date; the window starts "
                               "30 before")
    closed = join_clinical(table(*rows), patients, {**DEFAULT_WINDOWS,
                                                    "CT": Window(before=30, after=100)})
    assert "ctlate" in closed.outside_window


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


def test_double_store_is_excluded_and_same_time_different_images_stay():
    common = {"patient_id": "P1", "study_date": date(2015, 1, 1), "study_time": "101010"}
    t = table(
        instance(0, study_uid="2.25.A", sop_uid="2.25.a1", pixel_sha256="px1", **common),
        instance(1, study_uid="2.25.A", sop_uid="2.25.a2", pixel_sha256="px2", **common),
        # stored twice: new UIDs, the same pixels, the same time
        instance(2, study_uid="2.25.B", sop_uid="2.25.b1", pixel_sha256="px2", **common),
        instance(3, study_uid="2.25.B", sop_uid="2.25.b2", pixel_sha256="px1", **common),
        # the counter-case: another radiograph at the very same time
        instance(4, study_uid="2.25.C", sop_uid="2.25.c1", pixel_sha256="px9", **common),
    )
    empty = pa.Table.from_pylist([], schema=PUBLISHED_INSTANCES)
    result = find_duplicates(t, set(), empty, "B1")
    assert result.excluded == {2: "double_store", 3: "double_store"}
    kept = {r["uid"]: r["kept_uid"] for r in result.rows.to_pylist()}
    assert kept == {"2.25.b1": "2.25.a2", "2.25.b2": "2.25.a1"}


def test_split_exam_parts_merge_into_one_study():
    from tasks.dedupe import split_exam_targets

    def part(study: str, minutes: int, pixels: str) -> dict:
        when = datetime(2014, 3, 12, 11, 52) + timedelta(minutes=minutes)
        return {"study_uid": study, "patient": "P1", "exam_id": "E1",
                "exam_time": f"{when:%Y%m%d-%H%M%S}", "study_date": "20140312",
                "study_time": f"{when:%H%M%S}", "pixel_sha256": pixels}

    files = [part("1.2.50", 0, "a"), part("1.2.51", 9, "b"), part("1.2.51", 9, "c"),
             part("1.2.52", 120, "d"), {**part("1.2.53", 5, "e"), "exam_id": "E2"}]
    targets, merges = split_exam_targets(files, 30)
    assert targets == {"1.2.51": "1.2.50"}  # 2 hours later is another exam; E2 another id
    assert merges == [{"uid": "1.2.51", "kept_uid": "1.2.50", "gap_minutes": 9, "files": 2}]
    other_patient = [{**f, "patient": "P2"} if f["study_uid"] == "1.2.51" else f
                     for f in files]
    assert split_exam_targets(other_patient, 30) == ({}, [])
    result = find_duplicates(table(instance(0), instance(1, sop_uid="1.2.9.2")), set(),
                             pa.Table.from_pylist([], schema=PUBLISHED_INSTANCES), "B1",
                             merges=[{**merges[0], "uid": "2.25.51", "kept_uid": "2.25.50"}])
    [row] = result.rows.to_pylist()
    assert (row["kind"], row["level"], row["uid"], row["kept_uid"]) == (
        "split_merged", "study", "2.25.51", "2.25.50")
    assert "9 minutes apart; its 2 files merged into study 2.25.50" in row["evidence"]


def test_exports_in_excel_and_parquet(tmp_path):
    from openpyxl import Workbook

    from tasks.deidentify.remap import RemapError, load_remap

    book = Workbook()
    book.active.append(["old_id", "new_id"])
    book.active.append([1234567, 7654321])  # Excel keeps IDs as numbers
    book.active.append([7654321, "C-9"])
    book.save(tmp_path / "C19_HIRO_LDS_REMAP_PUB-LIST.xlsx")
    assert load_remap(str(tmp_path / "C19_HIRO_LDS_REMAP_PUB-LIST.xlsx")) == {
        "1234567": "C-9", "7654321": "C-9"}
    book.active.append(["C-9", 1234567])
    book.save(tmp_path / "cycle.xlsx")
    with pytest.raises(RemapError, match="cycle"):
        load_remap(str(tmp_path / "cycle.xlsx"))

    keys = PseudonymKeys(b"curation-secret-0001")
    book = Workbook()
    book.active.append(["mrn", "covid_encounter_date", "test_method", "rtpcr_result", "sex",
                        "birth_date", "wcc", "crp", "po2", "notes"])
    book.active.append([7654321, datetime(2020, 4, 1), "PCR", "positive", "F",
                        datetime(1960, 5, 2), 11.2, None, 9.1, "free text"])
    book.save(tmp_path / "emr.xlsx")
    result = deidentify_clinical(str(tmp_path / "emr.xlsx"),
                                 ClinicalConfig(path="emr.xlsx"), keys, "s1", {})
    [patient] = result.patients.to_pylist()
    assert patient["patient_id"] == keys.patient_id("s1", "7654321")
    assert patient["age_at_index"] == 59
    assert {r["name"] for r in result.measurements.to_pylist()} == {"wcc", "po2"}

    pq.write_table(pa.table({"mrn": ["M1"], "covid_encounter_date": ["2020-04-01"],
                             "test_method": ["serology"], "rtpcr_result": [None],
                             "sex": ["m"], "birth_date": ["1950-01-01"], "wcc": [5.5],
                             "crp": [None], "po2": [None]}), tmp_path / "emr.parquet")
    result = deidentify_clinical(str(tmp_path / "emr.parquet"),
                                 ClinicalConfig(path="emr.parquet"), keys, "s1", {})
    assert result.patients.to_pylist()[0]["test_method"] == "serology"


def test_qc_flags_repeated_instances_and_mixed_sizes():
    t = table(
        instance(0, slice_position=0.0), instance(1, instance_number=1, slice_position=2.5),
        instance(2, series_uid="2.25.15", rows=512, columns=512, slice_position=0.0),
        instance(3, series_uid="2.25.15", rows=256, columns=256, slice_position=2.5),
    )
    result = evaluate_qc(t)
    assert result.excluded == {}
    flagged = {(r["uid"], r["rule"]): r["detail"] for r in result.outcomes.to_pylist()}
    assert flagged[("2.25.11", "ct_duplicate_instances")] == "1 repeated instance numbers"
    assert flagged[("2.25.15", "mixed_image_sizes")] == "2 different image sizes"


def test_clinical_export_with_ages_instead_of_birth_dates(tmp_path):
    keys = PseudonymKeys(b"curation-secret-0001")
    csv = tmp_path / "emr.csv"
    csv.write_text("id,encounter,method,result,gender,age_years\n"
                   "X1,2020-04-01,PCR,positive,F,67\nX2,2020-04-02,PCR,negative,M,93\n")
    cfg = ClinicalConfig(path=str(csv), patient_id="id", index_date="encounter",
                         test_method="method", result="result", sex="gender",
                         birth_date=None, age="age_years", measurements={})
    ages = {r["patient_id"]: r["age_at_index"]
            for r in deidentify_clinical(str(csv), cfg, keys, "s1", {}).patients.to_pylist()}
    assert ages == {keys.patient_id("s1", "X1"): 67, keys.patient_id("s1", "X2"): 90}
