"""Double stores that the first dedupe missed: copies in different batches, and copies that share
an exam id (a double store, never a split exam to merge)."""

from __future__ import annotations

from datetime import date, datetime, time

import pyarrow as pa

from tasks.dedupe import (
    PUBLISHED_IMAGES,
    PUBLISHED_INSTANCES,
    find_duplicates,
    published_images,
    split_exam_targets,
)
from tests.test_curation import instance, table

NO_SOPS = pa.Table.from_pylist([], schema=PUBLISHED_INSTANCES)
COMMON = {"patient_id": "P1", "study_date": date(2015, 1, 1), "study_time": "101010",
          "modality": "DX", "sop_class_uid": "1.2.840.10008.5.1.4.1.1.1.1"}


def earlier_batch(**changes) -> pa.Table:
    row = {"study_uid": "2.25.A", "sop_uid": "2.25.a1", "pixel_sha256": "px1",
           "patient_id": "P1", "study_date": date(2015, 1, 1), "study_time": time(10, 10, 10),
           "batch_id": "B0"}
    return pa.Table.from_pylist([{**row, **changes}], schema=PUBLISHED_IMAGES)


def test_a_double_store_whose_copy_arrives_a_batch_later_is_excluded():
    later = table(instance(0, study_uid="2.25.B", sop_uid="2.25.b1", pixel_sha256="px1",
                           **COMMON))
    result = find_duplicates(later, set(), NO_SOPS, "B1", published_studies=earlier_batch())
    assert result.excluded == {0: "double_store"}
    [row] = result.rows.to_pylist()
    assert row["level"] == "instance" and row["uid"] == "2.25.b1"
    assert row["kept_uid"] == "2.25.a1"
    assert "study 2.25.A (kept in batch B0)" in row["evidence"]


def test_a_later_image_at_the_same_time_that_differs_stays():
    for changes in ({"pixel_sha256": "px2"}, {"study_time": time(10, 10, 11)},
                    {"patient_id": "P2"}):
        later = table(instance(0, study_uid="2.25.B", sop_uid="2.25.b1", pixel_sha256="px1",
                               **COMMON))
        result = find_duplicates(later, set(), NO_SOPS, "B1",
                                 published_studies=earlier_batch(**changes))
        assert result.excluded == {} and result.rows.num_rows == 0, changes


def test_published_images_joins_instances_to_their_study():
    instances = pa.table({"sop_uid": ["2.25.a1"], "sha256": ["s"], "study_uid": ["2.25.A"],
                          "pixel_sha256": ["px1"], "batch_id": ["B0"]})
    studies = pa.table({"study_uid": ["2.25.A"], "patient_id": ["P1"],
                        "study_date": pa.array([date(2015, 1, 1)], pa.date32()),
                        "study_time": pa.array([time(10, 10, 10)], pa.time64("us")),
                        "batch_id": ["B0"]})
    assert published_images(instances, studies).to_pylist() == earlier_batch().to_pylist()


def test_copies_sharing_an_exam_id_are_a_double_store_not_a_split_exam(tmp_path):
    staged = []
    for name in ("kept", "copy"):
        path = tmp_path / f"{name}.dcm"
        path.write_bytes(b"staged " + name.encode())
        staged.append(path)
    when = datetime(2015, 1, 1, 10, 10, 10)
    exam = {"exam_key": "e1", "exam_time": when, **COMMON}
    # the copy's study UID sorts first: taken for split parts, it would become the target
    t = table(instance(0, study_uid="2.25.9", sop_uid="2.25.91", pixel_sha256="px1",
                       output_path=str(staged[0]), **exam),
              instance(1, study_uid="2.25.1", sop_uid="2.25.11", pixel_sha256="px1",
                       output_path=str(staged[1]), **exam))
    result = find_duplicates(t, set(), NO_SOPS, "B1")
    assert result.excluded == {1: "double_store"}
    # and the one pass, deciding split exams before writing, takes the copy for no part
    part = {"patient": "P1", "exam_id": "E1", "exam_time": "20150101-101010",
            "study_date": "20150101", "study_time": "101010", "pixel_sha256": "px1"}
    assert split_exam_targets([{**part, "study_uid": "1.2.9"},
                               {**part, "study_uid": "1.2.1"}], 30) == ({}, [])
    [row] = result.rows.to_pylist()
    assert (row["kind"], row["uid"], row["kept_uid"]) == ("double_store", "2.25.11", "2.25.91")
    assert "study 2.25.9 " in row["evidence"]  # the kept study, still in the catalog
    assert [p.read_bytes() for p in staged] == [b"staged kept", b"staged copy"]
