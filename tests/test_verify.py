"""The verification gate: it finds planted leaks, names where but never what, and stays quiet
on clean output."""

from __future__ import annotations

import shutil

import pyarrow as pa
import pyarrow.parquet as pq
import pydicom
import pytest
from typer.testing import CliRunner

from flows.cli import app
from schemas.config import parse_config
from tasks import verify
from tasks.deidentify.profile import load_profile
from tests.test_deidentify import OPTIONS, identified_ct, run_study

runner = CliRunner()


def test_matcher_respects_word_and_number_boundaries():
    m = verify.IdentifierMatcher(["MARY", "1234567", "1.2.840.99.1", "DOE^JANE", "LI", "4096"])
    assert not m.in_text("ORIGINAL\\PRIMARY\\AXIAL")
    assert m.in_text("pt mary smith")
    assert not m.in_text("2.25.9912345678901")
    assert m.in_text("MRN 1234567.")
    assert not m.in_text("1.2.840.99.1.5") and m.in_text("ref 1.2.840.99.1")
    assert m.in_text("DOE^JANE") and not m.in_text("CLINICAL") and not m.in_text("4096")
    assert m.in_bytes("Müller".encode()) is False
    assert verify.IdentifierMatcher(["Müller"]).in_bytes("x MÜLLER y".encode("latin-1"))


def test_structure_check_passes_clean_output_and_flags_tampering(tmp_path):
    src = tmp_path / "in.dcm"
    identified_ct(src)
    [row] = run_study(tmp_path, [src])
    profile = load_profile(OPTIONS)
    assert verify.check_structure(row["output_path"], "x.dcm", profile) == []
    ds = pydicom.dcmread(row["output_path"])
    ds.PatientBirthDate = "19600214"
    ds.OperatorsName = "SMITH^JO"  # emptied by the profile
    ds.PatientTelephoneNumbers = "555-0199"  # removed by the profile
    ds.private_block(0x0011, "SOME VENDOR", create=True).add_new(0x01, "LO", "x")
    ds.save_as(tmp_path / "bad.dcm")
    problems = {(f.element, f.what) for f in verify.check_structure(
        str(tmp_path / "bad.dcm"), "bad.dcm", profile)}
    assert ("PatientBirthDate", "has a value") in problems
    assert ("OperatorsName", "has a value although the profile empties it") in problems
    assert ("PatientTelephoneNumbers", "present although the profile removes it") in problems
    assert any(what == "private element present" for _, what in problems)


def test_scan_names_the_element_but_not_the_value(tmp_path):
    src = tmp_path / "in.dcm"
    identified_ct(src)
    [row] = run_study(tmp_path, [src])
    ds = pydicom.dcmread(row["output_path"])
    ds.ManufacturerModelName = "scanner of DOE^JANE"
    ds.save_as(row["output_path"])
    matcher = verify.IdentifierMatcher(["DOE^JANE", "MRN77123"])
    findings = verify.scan_dicom_file(row["output_path"], "dicom/x.dcm", matcher)
    assert [(f.where, f.element) for f in findings] == [("dicom/x.dcm", "ManufacturerModelName")]
    with pytest.raises(verify.LeakFound) as err:
        verify.raise_if_found(findings)
    assert "ManufacturerModelName" in str(err.value) and "DOE" not in str(err.value)


def cross_patient_site(root):
    """Two patients; one file carries the *other* patient's name in a field the profile keeps."""
    root.mkdir()
    identified_ct(root / "a.dcm", sop="1.2.8.1", study="1.2.8", name="ROE^RICHARD", mrn="M100001")
    identified_ct(root / "b.dcm", sop="1.2.9.1", study="1.2.9", name="DOE^JANE", mrn="M200002")
    ds = pydicom.dcmread(root / "b.dcm")
    ds.ManufacturerModelName = "ROE^RICHARD"
    ds.save_as(root / "b.dcm")


def test_gate_quarantines_the_leaking_file_and_publishes_the_rest(prefect_server, tmp_path):
    from flows.nightly import nightly

    cross_patient_site(tmp_path / "src")
    config = parse_config({"release": "release", "work_dir": "work", "sites": [
        {"site_id": "s1", "source": {"kind": "flat", "path": "src"}}]}, tmp_path)
    [summary] = nightly(config)
    assert summary["status"] == "published"
    assert (summary["files_in"], summary["published"], summary["quarantined"]) == (2, 1, 1)
    assert summary["quarantined_by_reason"] == {"gate: ManufacturerModelName": 1}
    [listing] = list((tmp_path / "work").rglob("quarantine.parquet"))
    assert pq.read_table(listing).column("reason").to_pylist() == [
        "gate: ManufacturerModelName"]
    [published] = list((tmp_path / "release").rglob("*.dcm"))
    for path in (tmp_path / "release").rglob("*"):
        if path.is_file():
            data = path.read_bytes()
            assert b"ROE" not in data and b"RICHARD" not in data, path


def test_verify_command_on_a_release(prefect_server, tmp_path):
    from flows.nightly import nightly

    (tmp_path / "src").mkdir()
    identified_ct(tmp_path / "src" / "a.dcm", sop="1.2.8.1", study="1.2.8")
    config = parse_config({"release": "release", "work_dir": "work", "sites": [
        {"site_id": "s1", "source": {"kind": "flat", "path": "src"}}]}, tmp_path)
    nightly(config)
    release, work = tmp_path / "release", tmp_path / "work"
    clean = runner.invoke(app, ["verify", str(release), "--work", str(work)])
    assert clean.exit_code == 0 and "1 DICOM files checked, 0 finding(s)" in clean.output

    broken = tmp_path / "broken[1]"  # a name that is no glob pattern: every file is read
    shutil.copytree(release, broken)
    [dcm] = list(broken.rglob("*.dcm"))
    ds = pydicom.dcmread(dcm)
    ds.StudyDescription = "CT for DOE JANE"
    ds.save_as(dcm)
    [studies] = list((broken / "catalog" / "studies").rglob("*.parquet"))
    table = pq.read_table(studies)
    column = table.schema.get_field_index("description")
    pq.write_table(table.set_column(column, "description", pa.array(
        ["CT for DOE JANE"] * table.num_rows, pa.string())), studies)
    result = runner.invoke(app, ["verify", str(broken), "--work", str(work)])
    assert result.exit_code == 1 and "StudyDescription: identifying value" in result.output
    assert f"catalog {studies.relative_to(broken)} row 0: description" in result.output
    assert "JANE" not in result.output


def test_run_command_reports_the_gate_quarantine_without_the_value(prefect_server, tmp_path):
    cross_patient_site(tmp_path / "src")
    result = runner.invoke(app, ["run", "--source", f"s1={tmp_path / 'src'}",
                                 "--release", str(tmp_path / "release"),
                                 "--work", str(tmp_path / "work")])
    assert result.exit_code == 0, result.output
    assert "quarantined: 1 gate: ManufacturerModelName" in result.output
    assert "ROE" not in result.output and "RICHARD" not in result.output
