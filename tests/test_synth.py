"""Tests for the synthetic identified-export generator (the synth package)."""

import csv
import hashlib
import io
import json
import re
import time
import zipfile
from collections import defaultdict
from datetime import datetime
from pathlib import Path

import pydicom
import pytest
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian

from schemas.config import parse_config
from synth import CR_WINDOW_START, CT_WINDOW_START, demo_config, synthesize

UID_RE = re.compile(r"^(0|[1-9][0-9]*)(\.(0|[1-9][0-9]*))+$")
ZIP_NAME_RE = re.compile(r"^(\d+)_(\d{8}-\d{6})_(A\d{3,})_([A-Z0-9-]+)\.zip$")
CLINICAL_HEADER = ["mrn", "covid_encounter_date", "test_method", "rtpcr_result", "sex",
                   "birth_date", "wcc", "crp", "po2", "labs_date", "notes"]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    out = tmp_path_factory.mktemp("synth") / "out"
    start = time.perf_counter()
    truth = synthesize(out)
    return out, truth, time.perf_counter() - start


@pytest.fixture(scope="module")
def out(run):
    return run[0]


@pytest.fixture(scope="module")
def truth(run):
    return run[1]


def tree_hashes(root: Path) -> dict[str, str]:
    return {p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def raw(out: Path, site: dict, key: str) -> bytes:
    root = out / site["source"]
    if "!" in key:
        archive, member = key.split("!")
        with zipfile.ZipFile(root / archive) as zf:
            return zf.read(member)
    return (root / key).read_bytes()


def read(out: Path, site: dict, key: str) -> pydicom.Dataset:
    return pydicom.dcmread(io.BytesIO(raw(out, site, key)))


def dicom_files(site: dict) -> list[dict]:
    return [f for f in site["files"] if f["defect"] in (None, "no_sop_uid")]


def by_key(site: dict) -> dict[str, dict]:
    return {f["key"]: f for f in site["files"]}


def zip_files(site: dict, zip_key: str) -> list[dict]:
    return [f for f in site["files"] if f["key"].split("!")[0] == zip_key]


def test_default_run_is_fast_and_ground_truth_is_written(run):
    out, truth, elapsed = run
    assert elapsed < 10
    assert json.loads((out / "ground_truth.json").read_text(encoding="utf-8")) == truth
    assert truth["seed"] == 0 and truth["generator_version"] == 1
    layouts = {sid: s["layout"] for sid, s in truth["sites"].items()}
    assert layouts == {"site-a": "zip_batches", "site-b": "tree", "site-c": "flat"}


def test_same_seed_is_byte_identical_and_overwrites(out, tmp_path):
    expected = tree_hashes(out)
    again = tmp_path / "again"
    synthesize(again, seed=1)
    assert tree_hashes(again) != expected
    synthesize(again, seed=0)  # into an existing tree from another seed
    assert tree_hashes(again) == expected


def test_extra_sites_and_sizes(tmp_path):
    truth = synthesize(tmp_path, sites=4, patients=1, seed=3, ct_slices=3, ct_size=32,
                       cr_size=40)
    assert list(truth["sites"]) == ["site-a", "site-b", "site-c", "site-d"]
    site = truth["sites"]["site-d"]
    assert site["layout"] == "zip_batches" and "ct_split" in site["quirks"]
    axial = [f for f in site["files"] if f["role"] == "ct_axial"]
    per_series = defaultdict(int)
    for f in axial:
        per_series[f["series_uid"]] += 1
    assert set(per_series.values()) == {3}
    for role, size in (("ct_axial", 32), ("cr_frontal", 40)):
        f = next(f for f in site["files"] if f["role"] == role)
        ds = read(tmp_path, site, f["key"])
        assert (ds.Rows, ds.Columns) == (size, size)
        assert ds.pixel_array.shape == (size, size)


def test_demo_config_runs_every_site_from_its_files(out, truth):
    # the fixtures' absolute config and the demo's relative YAML one come out the same
    absolute = parse_config(demo_config(out, truth, release=out.parent / "release",
                                        work=out.parent / "work"), Path("/elsewhere"))
    relative = parse_config(demo_config(Path(out.name), truth), out.parent)
    assert absolute == relative
    kinds = {"site-a": "zip_batches", "site-b": "folder", "site-c": "flat"}
    assert {s.site_id: s.source.kind for s in absolute.sites} == kinds
    assert absolute.release == str(out.parent / "release")
    for site in absolute.sites:
        written = truth["sites"][site.site_id]
        assert Path(site.source.path) == out / written["source"] and Path(site.source.path).is_dir()
        assert Path(site.clinical.path) == out / written["clinical"]
        assert site.clinical.measured_on in CLINICAL_HEADER
        assert Path(site.id_remap) == out / written["remap"]

def test_every_file_is_listed_and_exists(out, truth):
    for site in truth["sites"].values():
        root = out / site["source"]
        on_disk = set()
        for path in root.rglob("*"):
            if not path.is_file():
                continue
            rel = path.relative_to(root).as_posix()
            if path.suffix == ".zip":
                with zipfile.ZipFile(path) as zf:
                    on_disk |= {f"{rel}!{name}" for name in zf.namelist()}
            else:
                on_disk.add(rel)
        listed = [f["key"] for f in site["files"]]
        assert len(listed) == len(set(listed))
        assert on_disk == set(listed)
        assert (out / site["clinical"]).is_file() and (out / site["remap"]).is_file()


def test_listed_dicom_reads_back_with_listed_values(out, truth):
    for site in truth["sites"].values():
        implicit = site["layout"] == "flat"
        for f in dicom_files(site):
            ds = read(out, site, f["key"])
            assert ds.file_meta.TransferSyntaxUID == (
                ImplicitVRLittleEndian if implicit else ExplicitVRLittleEndian)
            assert ds.get("SOPInstanceUID") == f["sop_uid"]
            assert ds.StudyInstanceUID == f["study_uid"]
            assert ds.SeriesInstanceUID == f["series_uid"]
            assert ds.SOPClassUID == f["sop_class_uid"]
            assert ds.Modality == f["modality"]
            assert ds.PatientID == f["mrn"]
            assert ds.AccessionNumber == f["accession"]
            assert "\\".join(ds.ImageType) == f["image_type"]
            assert ds.get("ViewPosition") == f["view_position"]
            assert ds.StudyDate + ds.StudyTime == f["exam_time"]
            for uid in (f["study_uid"], f["series_uid"], f["sop_uid"] or "1.2"):
                assert UID_RE.match(uid) and len(uid) <= 64
            assert ds.file_meta.SourceApplicationEntityTitle
            assert ds.RequestAttributesSequence[0].AccessionNumber == f["accession"]
            assert ds.ReferencedPerformedProcedureStepSequence[0].ReferencedSOPInstanceUID
            assert f["mrn"] in ds.ImageComments


def test_non_dicom_files_have_null_dicom_fields(truth):
    for site in truth["sites"].values():
        for f in site["files"]:
            if f["defect"] in ("not_dicom", "truncated", "empty"):
                assert f["sop_uid"] is None and f["mrn"] is None and f["modality"] is None


def test_headers_are_realistically_identified(out, truth):
    for site in truth["sites"].values():
        files = dicom_files(site)
        roles = {f["role"] for f in files}
        assert {"ct_axial", "ct_scout", "ct_dose_sc", "cr_frontal", "screen_save",
                "recon_3d"} <= roles
        sample = next(f for f in files if f["role"] == "ct_axial")
        ds = read(out, site, sample["key"])
        for keyword in ("PatientName", "PatientBirthDate", "PatientAddress",
                        "PatientTelephoneNumbers", "OtherPatientIDs", "InstitutionName",
                        "InstitutionAddress", "ReferringPhysicianName", "OperatorsName",
                        "StationName", "DeviceSerialNumber", "FrameOfReferenceUID", "StudyID"):
            assert ds.get(keyword), keyword
        if site["layout"] != "flat":  # private tags keep their VR only in explicit VR
            block = ds.private_block(0x0029, "ACME PACS 1.0")
            assert block[0x10].value == sample["mrn"]
            assert str(ds.PatientName) in block[0x11].value
        scouts = {f["sop_uid"] for f in files if f["role"] == "ct_scout"}
        assert ds.ReferencedImageSequence[0].ReferencedSOPInstanceUID in scouts
        dose = read(out, site, next(f["key"] for f in files if f["role"] == "ct_dose_sc"))
        assert dose.SeriesDescription == "Dose Report" and dose.Modality == "CT"
        assert dose.SOPClassUID == "1.2.840.10008.5.1.4.1.1.7"
        names = {p["name"] for p in site["patients"]}
        assert any(len(name.split("^")) == 3 for name in names)
        accented = [p for p in site["patients"] if not p["name"].isascii() and p["has_images"]]
        f = next(f for f in files if f["mrn"] == accented[0]["mrn"])
        ds = read(out, site, f["key"])
        assert ds.SpecificCharacterSet == "ISO_IR 192"
        assert str(ds.PatientName) == accented[0]["name"]


def test_axial_slices_step_by_thickness(out, truth):
    site = truth["sites"]["site-b"]
    series = defaultdict(list)
    for f in dicom_files(site):
        if f["role"] == "ct_axial":
            ds = read(out, site, f["key"])
            series[f["series_uid"]].append((int(ds.InstanceNumber),
                                            float(ds.ImagePositionPatient[2])))
    for slices in series.values():
        slices.sort()
        steps = {round(b[1] - a[1], 3) for a, b in zip(slices, slices[1:], strict=False)}
        assert steps == {-2.5}


def test_distinct_images_have_distinct_pixels(out, truth):
    for site in truth["sites"].values():
        groups = defaultdict(list)
        for f in dicom_files(site):
            pixels = read(out, site, f["key"]).PixelData
            groups[hashlib.sha256(pixels).hexdigest()].append(f)
        for group in groups.values():
            if len(group) > 1:
                assert {f["quirk"] for f in group} <= {"resent", "pediatric_double",
                                                        "same_sop_twice"}
                assert sum(f["duplicate_of"] is None for f in group) == 1


def test_batches(out, truth):
    site = truth["sites"]["site-a"]
    assert site["batches"] == {
        "CXR-UPDATE-20200523": {"folder": "CXR-UPDATE-20200523-COMPLETE", "complete": True},
        "CT-UPDATE-20200519": {"folder": "CT-UPDATE-20200519-COMPLETE", "complete": True},
        "CXR-UPDATE-20200618": {"folder": "CXR-UPDATE-20200618-COMPLETE", "complete": True},
        "CT-UPDATE-20200602": {"folder": "CT-UPDATE-20200602-IN-PROGRESS", "complete": False},
    }
    open_zips = {f["key"].split("!")[0] for f in site["files"]
                 if f["batch"] == "CT-UPDATE-20200602"}
    assert open_zips == {site["quirks"]["in_progress"]["zip"]}
    for zip_path in (out / site["source"]).rglob("*.zip"):
        mrn, stamp, exam_id, _ = ZIP_NAME_RE.match(zip_path.name).groups()
        files = [f for f in dicom_files(site) if f["key"].startswith(
            zip_path.relative_to(out / site["source"]).as_posix() + "!")]
        assert files
        for f in files:
            assert f["mrn"] == mrn and f["exam_id"] == exam_id
            assert f["exam_time"] == stamp.replace("-", "")
            assert f["key"].split("!")[0].split("/")[0] == site["batches"][f["batch"]]["folder"]
    for sid in ("site-b", "site-c"):
        assert truth["sites"][sid]["batches"] == {}
        assert {f["batch"] for f in truth["sites"][sid]["files"]} == {None}


def test_resent_copy_is_byte_identical(out, truth):
    site = truth["sites"]["site-a"]
    q = site["quirks"]["resent"]
    assert q["original_zip"].startswith("CXR-UPDATE-20200523-COMPLETE/")
    assert q["copy_zip"].startswith("CXR-UPDATE-20200618-COMPLETE/")
    orig = ZIP_NAME_RE.match(q["original_zip"].split("/")[1]).groups()
    copy = ZIP_NAME_RE.match(q["copy_zip"].split("/")[1]).groups()
    assert orig[:2] == copy[:2] and orig[3] == copy[3] and orig[2] != copy[2]
    copies = zip_files(site, q["copy_zip"])
    originals = {f["key"].split("!")[1] for f in zip_files(site, q["original_zip"])}
    assert copies and {f["key"].split("!")[1] for f in copies} == originals
    for f in copies:
        assert f["quirk"] == "resent"
        assert f["duplicate_of"] == f"{q['original_zip']}!{f['key'].split('!')[1]}"
        assert raw(out, site, f["key"]) == raw(out, site, f["duplicate_of"])


def test_pediatric_double_same_pixels_new_uids(out, truth):
    site = truth["sites"]["site-a"]
    q = site["quirks"]["pediatric_double"]
    orig, copy = (ZIP_NAME_RE.match(q[k].split("/")[1]).groups()
                  for k in ("original_zip", "copy_zip"))
    assert orig[3] == copy[3] == "XR-P-PORT-CHEST-1V"
    assert orig[:2] == copy[:2] and orig[2] != copy[2]
    assert q["original_zip"].split("/")[0] == q["copy_zip"].split("/")[0]
    for f in zip_files(site, q["copy_zip"]):
        a, b = read(out, site, f["duplicate_of"]), read(out, site, f["key"])
        assert a.PixelData == b.PixelData
        assert a.StudyDate + a.StudyTime == b.StudyDate + b.StudyTime
        for keyword in ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID"):
            assert a.get(keyword) != b.get(keyword)


def test_ct_split_shares_exam_id_nine_minutes_apart(out, truth):
    site = truth["sites"]["site-a"]
    q = site["quirks"]["ct_split"]
    (m1, t1, id1, d1), (m2, t2, id2, d2) = (ZIP_NAME_RE.match(z.split("/")[1]).groups()
                                            for z in q["zips"])
    assert m1 == m2 and id1 == id2 == q["exam_id"] and d1 == d2 == "CT-CHEST-WO"
    gap = (datetime.strptime(t2, "%Y%m%d-%H%M%S") - datetime.strptime(t1, "%Y%m%d-%H%M%S"))
    assert gap.total_seconds() == 9 * 60
    first, second = (zip_files(site, z) for z in q["zips"])
    assert {f["role"] for f in first} == {"ct_scout", "ct_axial"}
    assert {f["role"] for f in second} == {"ct_axial", "ct_dose_sc"}
    assert {f["key"].split("!")[1].split("/")[0] for f in second} >= {"3_AXIAL_LUNG"}
    a, b = read(out, site, first[0]["key"]), read(out, site, second[0]["key"])
    assert a.AccessionNumber == b.AccessionNumber == q["accession"]
    assert a.StudyInstanceUID != b.StudyInstanceUID


def test_same_time_radiographs_are_not_duplicates(out, truth):
    site = truth["sites"]["site-a"]
    zips = site["quirks"]["same_time_not_duplicate"]["zips"]
    (m1, t1, id1, _), (m2, t2, id2, _) = (ZIP_NAME_RE.match(z.split("/")[1]).groups()
                                          for z in zips)
    assert (m1, t1) == (m2, t2) and id1 != id2
    first, second = (zip_files(site, z) for z in zips)
    assert [f["key"].split("!")[1] for f in first] == [f["key"].split("!")[1] for f in second]
    for f, g in zip(first, second, strict=True):
        assert f["duplicate_of"] is None and g["duplicate_of"] is None
        assert f["sop_uid"] != g["sop_uid"] and f["study_uid"] != g["study_uid"]
        assert read(out, site, f["key"]).PixelData != read(out, site, g["key"]).PixelData


def test_id_change_chain_resolves_to_clinical_mrn(out, truth):
    site = truth["sites"]["site-a"]
    q = site["quirks"]["id_change"]
    with open(out / site["remap"], encoding="utf-8") as fh:
        remap = {row["old_id"]: row["new_id"] for row in csv.DictReader(fh)}
    assert remap == {q["old"]: q["intermediate"], q["intermediate"]: q["current"]}
    mrn = q["old"]
    while mrn in remap:
        mrn = remap[mrn]
    with open(out / site["clinical"], encoding="utf-8") as fh:
        clinical = {row["mrn"] for row in csv.DictReader(fh)}
    assert mrn == q["current"] and mrn in clinical and q["old"] not in clinical
    image_mrns = {f["mrn"] for f in dicom_files(site)}
    assert q["old"] in image_mrns and q["current"] not in image_mrns
    for sid in ("site-b", "site-c"):
        assert (out / truth["sites"][sid]["remap"]).read_text() == "old_id,new_id\n"


def test_window_edges_are_planted(truth):
    site = truth["sites"]["site-a"]
    planted = site["quirks"]["outside_window"]
    assert sorted((e["modality"] == "CT", e["days_from_index"]) for e in planted) == [
        (False, -400), (False, -366), (False, -365), (True, -31), (True, -30)]
    for entry in planted:
        start = CT_WINDOW_START if entry["modality"] == "CT" else CR_WINDOW_START
        assert entry["in_window"] == (entry["days_from_index"] >= start)
        files = zip_files(site, entry["zip"])
        assert files and {f["days_from_index"] for f in files} == {entry["days_from_index"]}
        quirk = "window_edge" if entry["in_window"] else "outside_window"
        assert {f["quirk"] for f in files} == {quirk}
    flat = truth["sites"]["site-c"]["quirks"]["outside_window"]
    assert len(flat) == 1 and not flat[0]["in_window"]
    assert any(f["study_uid"] == flat[0]["study_uid"] and f["days_from_index"] < -365
               for f in truth["sites"]["site-c"]["files"])
    regular = [f for f in dicom_files(site) if f["quirk"] is None]
    assert all(-20 <= f["days_from_index"] <= 40 for f in regular)


def test_zip_readme_is_not_dicom(out, truth):
    site = truth["sites"]["site-a"]
    key = site["quirks"]["readme"]["key"]
    assert key.endswith("!README.txt") and by_key(site)[key]["defect"] == "not_dicom"
    assert b"DICM" not in raw(out, site, key)


def test_tree_layout_and_defects(out, truth):
    site = truth["sites"]["site-b"]
    files = by_key(site)
    for f in dicom_files(site):
        patient_dir, exam_dir, series_dir, name = f["key"].split("/")
        assert patient_dir.endswith("_" + f["mrn"]) and exam_dir.endswith("_" + f["accession"])
        assert re.fullmatch(r"\d+_[A-Z0-9_.]+", series_dir) and name.endswith(".dcm")
    q = site["quirks"]["same_sop_twice"]
    copy = files[q["copy"]]
    assert copy["duplicate_of"] == q["original"] and copy["quirk"] == "same_sop_twice"
    assert copy["sop_uid"] == files[q["original"]]["sop_uid"]
    assert q["copy"].rsplit("/", 1)[0] == q["original"].rsplit("/", 1)[0]
    assert raw(out, site, q["copy"]) == raw(out, site, q["original"])
    truncated = site["quirks"]["truncated"]["key"]
    assert files[truncated]["defect"] == "truncated"
    assert len(raw(out, site, truncated)) == 300


def test_flat_layout_and_defects(out, truth):
    site = truth["sites"]["site-c"]
    files = by_key(site)
    q = site["quirks"]
    for f in dicom_files(site):
        assert re.fullmatch(r"IM_\d{6}", f["key"])
    assert files[q["not_dicom"]["key"]]["defect"] == "not_dicom"
    assert files[q["empty"]["key"]]["defect"] == "empty"
    assert raw(out, site, q["empty"]["key"]) == b""
    entry = files[q["no_sop_uid"]["key"]]
    assert entry["defect"] == "no_sop_uid" and entry["sop_uid"] is None
    ds = read(out, site, entry["key"])
    assert "SOPInstanceUID" not in ds and "MediaStorageSOPInstanceUID" not in ds.file_meta
    assert ds.StudyInstanceUID == entry["study_uid"]


def test_clinical_export(out, truth):
    for site in truth["sites"].values():
        with open(out / site["clinical"], encoding="utf-8", newline="") as fh:
            reader = csv.reader(fh)
            assert next(reader) == CLINICAL_HEADER
            rows = [dict(zip(CLINICAL_HEADER, row, strict=True)) for row in reader]
        patients = {p["current_mrn"]: p for p in site["patients"]}
        assert sorted(r["mrn"] for r in rows) == sorted(patients)
        assert sum(not p["has_images"] for p in site["patients"]) == 1
        image_mrns = {f["mrn"] for f in dicom_files(site)}
        for p in site["patients"]:
            assert (p["mrn"] in image_mrns) == p["has_images"]
        for row in rows:
            p = patients[row["mrn"]]
            family, given = p["name"].split("^")[:2]
            assert family in row["notes"] and given in row["notes"]
            assert row["test_method"] in ("PCR", "serology", "clinical")
            assert (row["rtpcr_result"] in ("positive", "negative")) == (
                row["test_method"] == "PCR")
            assert row["birth_date"].replace("-", "") == p["birth_date"]
            assert row["covid_encounter_date"].replace("-", "") == p["index_date"]
            assert "2020-03-01" <= row["covid_encounter_date"] <= "2020-05-31"


def test_identifiers_cover_planted_phi(out, truth):
    for site in truth["sites"].values():
        ids = set(site["identifiers"])
        for p in site["patients"]:
            parts = p["name"].split("^")
            assert {p["name"], " ".join(parts), p["mrn"], p["current_mrn"],
                    p["birth_date"]} <= ids
            assert {part for part in parts if len(part) >= 3} <= ids
        for f in dicom_files(site):
            assert {f["accession"], f["study_uid"], f["series_uid"]} <= ids
        sample = read(out, site, dicom_files(site)[0]["key"])
        for keyword in ("InstitutionName", "InstitutionAddress", "StationName",
                        "DeviceSerialNumber", "PatientAddress", "PatientTelephoneNumbers",
                        "OtherPatientIDs", "StudyID"):
            assert str(sample.get(keyword)) in ids, keyword
        for keyword in ("ReferringPhysicianName", "OperatorsName", "PerformingPhysicianName"):
            assert str(sample.get(keyword)) in ids, keyword
    assert set(truth["sites"]["site-a"]["quirks"]["id_change"].values()) <= set(
        truth["sites"]["site-a"]["identifiers"])
