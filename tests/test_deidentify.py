"""De-identification unit tests: keys, remap, the profile table and the dataset engine."""

from __future__ import annotations

import hashlib
import re
from pathlib import Path

import pydicom
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, ImplicitVRLittleEndian

from flows.one_pass import BatchPass, PassContext, read_batch
from tasks import sources
from tasks.deidentify.keys import PseudonymKeys
from tasks.deidentify.profile import load_profile
from tasks.deidentify.remap import RemapError, load_remap
from tasks.deidentify.study import DeidContext

KEYS = PseudonymKeys(b"unit-test-secret-123456")
OPTIONS = ("retain_long_modif_dates", "retain_patient_chars", "clean_descriptors")
UID_RE = re.compile(r"^(0|[1-9][0-9]*)(\.(0|[1-9][0-9]*))*$")


def identified_ct(path: Path, *, sop: str = "1.2.3.4.5.6.7", study: str = "1.2.3.4.5",
                  name: str = "DOE^JANE^Q", mrn: str = "MRN77123",
                  transfer_syntax=ExplicitVRLittleEndian) -> bytes:
    """Write a CT file full of identifiers; return its pixel bytes."""
    ds = Dataset()
    ds.SpecificCharacterSet = "ISO_IR 192"
    ds.SOPClassUID = CTImageStorage
    ds.SOPInstanceUID = sop
    ds.StudyInstanceUID = study
    ds.SeriesInstanceUID = study + ".1"
    ds.FrameOfReferenceUID = study + ".9"
    ds.PatientName = name
    ds.PatientID = mrn
    ds.PatientBirthDate = "19600214"
    ds.PatientSex = "F"
    ds.PatientAddress = "12 Elm Street, Springfield"
    ds.OtherPatientIDs = "ALT-99881"
    ds.AccessionNumber = "ACC5550001"
    ds.StudyID = "ST123"
    ds.StudyDate = "20200401"
    ds.SeriesDate = "20200401"
    ds.AcquisitionDateTime = "20200401101500.000000"
    ds.StudyTime = "101500"
    ds.Modality = "CT"
    ds.InstitutionName = "Mercy General Hospital"
    ds.ReferringPhysicianName = "HOUSE^GREGORY"
    ds.StationName = "MERCYCT1"
    ds.DeviceSerialNumber = "SN-4471"
    ds.StudyDescription = "CT CHEST DOE MRN77123"
    ds.SeriesDescription = "AXIAL 2.5"
    ds.ImageComments = "patient Jane Doe, call 555-0101"
    ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
    ds.SliceThickness = "2.5"
    ds.InstanceNumber = "1"
    request = Dataset()
    request.AccessionNumber = "ACC5550001"
    request.RequestedProcedureID = "RP-1"
    ds.RequestAttributesSequence = Sequence([request])
    ref = Dataset()
    ref.ReferencedSOPClassUID = CTImageStorage
    ref.ReferencedSOPInstanceUID = "1.2.3.4.5.6.8"
    ds.ReferencedImageSequence = Sequence([ref])
    ds.private_block(0x0029, "ACME PACS 1.0", create=True).add_new(0x10, "LO", mrn)
    ds.Rows, ds.Columns = 4, 4
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    pixels = bytes(range(32))
    ds.PixelData = pixels
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = transfer_syntax
    ds.file_meta.SourceApplicationEntityTitle = "MERCY_CT1"
    pydicom.dcmwrite(path, ds, enforce_file_format=True)
    return pixels


def one_pass(tmp_path: Path, paths: list[Path], remap=None, options=OPTIONS) -> BatchPass:
    """``paths`` through the one pass as one work unit, into tmp_path/out."""
    ctx = PassContext(DeidContext(keys=KEYS, site_id="site-x", options=options,
                                  remap=remap or {}),
                      str(tmp_path / "out"), str(tmp_path / "quarantine"))
    unit = sources.WorkUnit("/", tuple(sources.UnitObject(str(p.resolve())[1:])
                                        for p in paths))
    return read_batch([unit], ctx)


def rows_of(done: BatchPass) -> list[dict]:
    """One row per object in order: its de-identified row, or its ingest refusal."""
    deidentified = {r["seq"]: r for r in done.deidentified.to_pylist()}
    return [deidentified.get(r["seq"], {k: r[k] for k in ("seq", "object_id", "status",
                                                         "reason")})
            for r in done.index.to_pylist()]


def run_study(tmp_path: Path, paths: list[Path], remap=None) -> list[dict]:
    return rows_of(one_pass(tmp_path, paths, remap))


def test_keys_are_deterministic_valid_and_keyed():
    uid = KEYS.uid("1.2.840.113619.2.55.3")
    assert uid == KEYS.uid("1.2.840.113619.2.55.3")
    assert UID_RE.match(uid) and len(uid) <= 64 and uid.startswith("2.25.")
    assert PseudonymKeys(b"another-secret-12345").uid("1.2.840.113619.2.55.3") != uid
    assert KEYS.patient_id("a", " mrn1 ") == KEYS.patient_id("a", "MRN1")
    assert KEYS.patient_id("a", "MRN1") != KEYS.patient_id("b", "MRN1")
    offset = KEYS.date_offset_days("a", "MRN1")
    assert -3650 <= offset <= -365
    assert re.fullmatch(r"\d{6}", KEYS.siteid("a"))
    assert "unit-test-secret" not in repr(KEYS)


def test_remap_resolves_chains_and_rejects_cycles(tmp_path):
    path = tmp_path / "remap.csv"
    path.write_text("old_id,new_id\nA1,B2\nB2,C3\n")
    assert load_remap(str(path)) == {"A1": "C3", "B2": "C3"}
    path.write_text("old_id,new_id\nA1,B2\nB2,A1\n")
    with pytest.raises(RemapError) as err:
        load_remap(str(path))
    assert "A1" not in str(err.value) and "cycle" in str(err.value)
    path.write_text("old,new\nA1,B2\n")
    with pytest.raises(RemapError, match="lacks column"):
        load_remap(str(path))


def test_profile_follows_the_annex_e_table():
    profile = load_profile(OPTIONS)
    assert profile.action(0x00100030) == "Z"  # Patient's Birth Date: Z in the Basic Profile
    assert profile.action(0x00080020) == "C"  # Study Date: cleaned (shifted) by the dates option
    assert profile.action(0x00101010) == "K"  # Patient's Age kept by patient characteristics
    assert profile.action(0x0008103E) == "C"  # Series Description: Clean Descriptors
    assert profile.action(0x00204000) == "X"  # Image Comments: removed despite Clean Descriptors
    assert profile.action(0x00080018) == "U"  # SOP Instance UID
    assert profile.action(0x00100010) == "computed"  # Patient's Name: the pseudonym
    assert profile.action(0x00291010) == "X"  # private
    assert profile.action(0x00080060) == "K"  # Modality: not in the table
    basic = load_profile(())
    assert basic.action(0x00080020) == "Z" and basic.action(0x00101010) == "X"


def test_dataset_is_deidentified_everywhere(tmp_path):
    src = tmp_path / "in.dcm"
    pixels = identified_ct(src)
    [row] = run_study(tmp_path, [src])
    assert row["status"] == "ok", row
    out = Path(row["output_path"])
    data = out.read_bytes()
    for planted in ("DOE", "JANE", "MRN77123", "19600214", "ACC5550001", "ALT-99881", "Elm",
                    "Mercy", "HOUSE", "MERCYCT1", "SN-4471", "555-0101", "ACME", "ST123",
                    "1.2.3.4.5.6.7", "1.2.3.4.5.6.8", "MERCY_CT1", "20200401"):
        assert planted.encode() not in data, planted
    ds = pydicom.dcmread(out)
    pseudonym = KEYS.patient_id("site-x", "MRN77123")
    assert ds.PatientID == pseudonym == row["patient_id"] and str(ds.PatientName) == pseudonym
    assert ds.PatientAge == "060Y" and ds.PatientSex == "F" and "PatientBirthDate" in ds
    assert ds.StudyDescription == "CT CHEST" and ds.SeriesDescription == "AXIAL 2.5"
    assert "ImageComments" not in ds and not any(e.tag.is_private for e in ds)
    assert ds.SOPInstanceUID == KEYS.uid("1.2.3.4.5.6.7") == ds.file_meta.MediaStorageSOPInstanceUID
    assert ds.ReferencedImageSequence[0].ReferencedSOPInstanceUID == KEYS.uid("1.2.3.4.5.6.8")
    assert ds.ReferencedImageSequence[0].ReferencedSOPClassUID == CTImageStorage
    assert not ds.RequestAttributesSequence[0].AccessionNumber
    assert ds.PatientIdentityRemoved == "YES"
    assert [c.CodeValue for c in ds.DeidentificationMethodCodeSequence] == [
        "113100", "113107", "113108", "113105"]
    assert ds.ClinicalTrialSiteID == KEYS.siteid("site-x")
    assert ds.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian
    assert ds.PixelData == pixels
    assert row["pixel_sha256"] == hashlib.sha256(pixels).hexdigest()
    assert row["sha256"] == hashlib.sha256(data).hexdigest() and row["size_bytes"] == len(data)


def test_dates_shift_by_one_offset_per_patient(tmp_path):
    a, b = tmp_path / "a.dcm", tmp_path / "b.dcm"
    identified_ct(a, sop="1.2.3.1", study="1.2.3")
    identified_ct(b, sop="1.2.4.1", study="1.2.4")
    ds_b = pydicom.dcmread(b)
    ds_b.StudyDate = "20200415"
    ds_b.save_as(b)
    rows = run_study(tmp_path, [a, b])
    da, db = (r["study_date"] for r in rows)
    assert (db - da).days == 14  # the interval between the patient's studies is kept exactly
    shifted = pydicom.dcmread(rows[0]["output_path"])
    assert shifted.AcquisitionDateTime.endswith("101500.000000")
    assert shifted.AcquisitionDateTime[:8] == shifted.StudyDate


def test_remap_gives_old_and_new_ids_one_pseudonym(tmp_path):
    a, b = tmp_path / "a.dcm", tmp_path / "b.dcm"
    identified_ct(a, sop="1.2.3.1", mrn="OLD-1")
    identified_ct(b, sop="1.2.3.2", mrn="NEW-1")
    rows = run_study(tmp_path, [a, b], remap={"OLD-1": "NEW-1"})
    assert rows[0]["patient_id"] == rows[1]["patient_id"] == KEYS.patient_id("site-x", "NEW-1")


def test_implicit_vr_input_is_written_explicit(tmp_path):
    src = tmp_path / "implicit.dcm"
    pixels = identified_ct(src, transfer_syntax=ImplicitVRLittleEndian)
    [row] = run_study(tmp_path, [src])
    ds = pydicom.dcmread(row["output_path"])
    assert ds.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian and ds.PixelData == pixels


def test_bad_files_are_quarantined_without_quoting_values(tmp_path):
    good, bad, no_pid = tmp_path / "good.dcm", tmp_path / "bad.dcm", tmp_path / "nopid.dcm"
    identified_ct(good)
    bad.write_bytes(b"DOE^JANE MRN77123 is not a DICOM file")
    identified_ct(no_pid, sop="1.2.3.9")
    ds = pydicom.dcmread(no_pid)
    del ds.PatientID
    ds.save_as(no_pid)
    rows = run_study(tmp_path, [good, bad, no_pid])
    assert [r["status"] for r in rows] == ["ok", "quarantined", "quarantined"]
    assert rows[1]["reason"] == "not DICOM"
    assert rows[2]["reason"] == "no Patient ID"
    assert all("DOE" not in (r["reason"] or "") for r in rows)


def test_deidentification_is_byte_identical_across_runs(tmp_path):
    src = tmp_path / "in.dcm"
    identified_ct(src)
    (tmp_path / "one").mkdir()
    (tmp_path / "two").mkdir()
    first = run_study(tmp_path / "one", [src])
    second = run_study(tmp_path / "two", [src])
    assert first[0]["sha256"] == second[0]["sha256"]
    assert Path(first[0]["output_path"]).read_bytes() == Path(second[0]["output_path"]).read_bytes()


def _rewrite(path: Path, transfer_syntax, pixel_data: bytes | None = None) -> None:
    ds = pydicom.dcmread(path)
    if pixel_data is not None:
        ds.PixelData = pixel_data
    ds.file_meta.TransferSyntaxUID = transfer_syntax
    pydicom.dcmwrite(path, ds, enforce_file_format=True)


def test_big_endian_input_becomes_little_endian_with_the_same_pixel_values(tmp_path):
    import numpy as np
    from pydicom.uid import ExplicitVRBigEndian

    src = tmp_path / "be.dcm"
    identified_ct(src)
    values = np.arange(16, dtype=np.uint16) * 257
    _rewrite(src, ExplicitVRBigEndian, values.astype(">u2").tobytes())
    [row] = run_study(tmp_path, [src])
    out = pydicom.dcmread(row["output_path"])
    assert out.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian
    assert out.PixelData == values.astype("<u2").tobytes()
    assert out.Rows == 4 and out.PatientID == KEYS.patient_id("site-x", "MRN77123")


def test_deflated_input_is_read_and_written_explicit(tmp_path):
    from pydicom.uid import DeflatedExplicitVRLittleEndian

    src = tmp_path / "deflated.dcm"
    pixels = identified_ct(src)
    _rewrite(src, DeflatedExplicitVRLittleEndian)
    [row] = run_study(tmp_path, [src])
    out = pydicom.dcmread(row["output_path"])
    assert out.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian and out.PixelData == pixels


def test_compressed_pixel_data_passes_through_untouched(tmp_path):
    from pydicom.encaps import encapsulate
    from pydicom.uid import JPEGBaseline8Bit

    src = tmp_path / "jpeg.dcm"
    identified_ct(src)
    encapsulated = encapsulate([b"\xff\xd8 not really a jpeg frame \xff\xd9"])
    _rewrite(src, JPEGBaseline8Bit, encapsulated)
    [row] = run_study(tmp_path, [src])
    out = pydicom.dcmread(row["output_path"])
    assert out.file_meta.TransferSyntaxUID == JPEGBaseline8Bit
    assert out.PixelData == encapsulated
    assert row["pixel_sha256"] == hashlib.sha256(encapsulated).hexdigest()


def test_uid_references_across_files_and_multivalued_names(tmp_path):
    scout, axial = tmp_path / "scout.dcm", tmp_path / "axial.dcm"
    identified_ct(scout, sop="1.2.3.100")
    identified_ct(axial, sop="1.2.3.101")
    ds = pydicom.dcmread(axial)
    ds.ReferencedImageSequence[0].ReferencedSOPInstanceUID = "1.2.3.100"
    ds.PerformingPhysicianName = ["ROE^RICHARD", "MÜLLER^ANNA"]
    ds.save_as(axial)
    rows = run_study(tmp_path, [scout, axial])
    out_scout, out_axial = (pydicom.dcmread(r["output_path"]) for r in rows)
    assert (out_axial.ReferencedImageSequence[0].ReferencedSOPInstanceUID
            == out_scout.SOPInstanceUID)
    assert "PerformingPhysicianName" not in out_axial or not out_axial.PerformingPhysicianName
    data = Path(rows[1]["output_path"]).read_bytes()
    assert b"ROE" not in data and "MÜLLER".encode() not in data


def test_bad_files_in_a_study_are_quarantined_and_the_rest_published(tmp_path):
    good, short, blob, garbage = (tmp_path / n for n in ("good", "short", "blob", "garbage"))
    identified_ct(good, sop="1.2.3.1")
    identified_ct(short, sop="1.2.3.2")
    data = short.read_bytes()
    short.write_bytes(data[:-10])  # pixel data cut short
    identified_ct(blob, sop="1.2.3.3")
    ds = pydicom.dcmread(blob)
    ds.private_block(0x0033, "BIG VENDOR BLOB", create=True).add_new(0x01, "OB",
                                                                      b"\x01" * (4 << 20))
    ds.StudyDate = "2020-13-45"  # not a DA value
    ds.save_as(blob)
    identified_ct(garbage, sop="1.2.3.4")
    raw = bytearray(garbage.read_bytes())
    at = raw.index(b"\x10\x00\x10\x00PN")  # Patient's Name: break its VR and length
    raw[at + 4:at + 8] = b"\x01\x02\xff\xff"
    garbage.write_bytes(bytes(raw))
    rows = run_study(tmp_path, [good, short, blob, garbage])
    status = [(r["status"], r["reason"]) for r in rows]
    assert status[0] == ("ok", None) and status[2] == ("ok", None)
    assert status[1] == ("quarantined", "truncated file (data ends before the header says)")
    assert status[3][0] == "quarantined" and status[3][1].startswith("unreadable DICOM")
    out = pydicom.dcmread(rows[2]["output_path"])
    assert not any(e.tag.is_private for e in out) and out.StudyDate == ""
    assert rows[2]["size_bytes"] < 1 << 20
