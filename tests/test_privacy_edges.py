"""Privacy at the edges (issue #10): identifiers in odd encodings, odd places and odd names never
reach the output, the gate would have caught each raw file, and innocent files pass.

Every case is generated here with pydicom; each test checks the output (bytes and decoded
values) and that the gate finds the planted value in the raw file it came from.
"""

from __future__ import annotations

import re
import tempfile
import unicodedata
from datetime import date
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pydicom
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydicom.charset import encode_string
from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, ImplicitVRLittleEndian

from schemas.config import parse_config
from schemas.pipeline import OK, QUARANTINED
from tasks import verify
from tasks.deidentify.profile import load_profile
from tasks.deidentify.text import IdentifierMatcher, birth_date_forms, clean_free_text
from tests.test_deidentify import OPTIONS, one_pass, rows_of

PIXELS = bytes(range(32))


def base(name: str = "DOE^JANE", pid: str = "MRN77123", charset="ISO_IR 192",
         sop: str = "1.2.3.4.5.6.7") -> Dataset:
    """A small identified CT file's dataset (4x4 pixels)."""
    ds = Dataset()
    ds.SpecificCharacterSet = charset
    ds.SOPClassUID = CTImageStorage
    ds.SOPInstanceUID = sop
    ds.StudyInstanceUID = sop + ".1"
    ds.SeriesInstanceUID = sop + ".2"
    ds.PatientName = name
    ds.PatientID = pid
    ds.PatientBirthDate = "19571123"
    ds.StudyDate = "20200401"
    ds.Modality = "CT"
    ds.StudyDescription = "CT CHEST"
    ds.SeriesDescription = "AXIAL 2.5MM"
    ds.SliceThickness = "2.5"
    ds.Rows, ds.Columns = 4, 4
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.PixelData = PIXELS
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    return ds


def write(ds: Dataset, path: Path, implicit: bool = False) -> Path:
    if implicit:
        ds.file_meta.TransferSyntaxUID = ImplicitVRLittleEndian
    pydicom.dcmwrite(path, ds, enforce_file_format=True)
    return path


def deidentify(tmp_path: Path, paths: list[Path], options=OPTIONS):
    """Rows and identifiers of one study's files, through the one pass (its gate included)
    into tmp_path/out."""
    done = one_pass(tmp_path, paths, options=options)
    return rows_of(done), IdentifierMatcher(done.identifiers)


def decoded_values(path: str) -> list[str]:
    """Every value of a file as text, nested, private and file meta included (normalized)."""
    ds = pydicom.dcmread(path)
    out = []
    for elem in [*ds.file_meta, *ds.iterall()]:
        if elem.tag == 0x7FE00010 or elem.VR == "SQ":
            continue
        value = elem.value
        if isinstance(value, bytes):
            out.append(value.decode("latin-1"))
        elif isinstance(value, (list, pydicom.multival.MultiValue)):
            out += [str(v) for v in value]
        else:
            out.append(str(value))
    return [unicodedata.normalize("NFKC", v).casefold() for v in out]


def leaked(value: str, text: str) -> bool:
    """Whether ``value`` is in normalized ``text``: as a word when it is Latin, anywhere
    when it is of a script written without spaces."""
    value = unicodedata.normalize("NFKC", value).casefold()
    if value.isascii():
        return re.search(rf"(?<![^\W_]){re.escape(value)}(?![^\W_])", text) is not None
    return value in text


def assert_clean(row: dict, planted: list[str], raw: Path, matcher: IdentifierMatcher,
                 expect_in_raw: set[str]) -> None:
    """Nothing planted in the output (bytes, decoded values, the gate), and the gate names
    ``expect_in_raw`` among the elements of the raw file."""
    assert row["status"] == OK, row
    data = Path(row["output_path"]).read_bytes()
    values = " | ".join(decoded_values(row["output_path"]))
    for value in planted:
        assert not leaked(value, values), value
        if not value.isascii():
            assert value.encode() not in data, value
    assert verify.elements_holding(verify.header_bytes(row["output_path"]), matcher) == []
    found = set(verify.elements_holding(verify.header_bytes(raw), matcher))
    assert expect_in_raw <= found, found


# --- class 1: after the pixels, and the pixel tag's bytes inside a value -----------------

@pytest.mark.parametrize("implicit", [False, True])
def test_elements_after_the_pixels_and_fake_pixel_tags_are_walked(tmp_path, implicit):
    ds = base()
    block = ds.private_block(0x0009, "ACME BLOB", create=True)
    block.add_new(0x10, "OB", b"head\xe0\x7f\x10\x00OB\x00\x00\xff\xff\xff\xfftail")
    ds.ManufacturerModelName = "scanner of JANE DOE"  # after the fake tag's bytes
    ds.add_new(0x80000010, "LO", "DOE JANE after pixels")
    after = ds.private_block(0x8001, "ACME AFTER", create=True)
    after.add_new(0x01, "LO", "MRN77123")
    raw = write(ds, tmp_path / "in.dcm", implicit)
    [row], matcher = deidentify(tmp_path, [raw])
    out = pydicom.dcmread(row["output_path"])
    assert 0x80000010 not in out and not any(e.tag.is_private for e in out)
    assert out.ManufacturerModelName == "scanner of"
    assert out.PixelData == PIXELS
    assert_clean(row, ["DOE", "JANE", "MRN77123"], raw, matcher,
                 {"ManufacturerModelName", "PatientName", "PatientID", "(8000,0010)"})
    # without the identifier lists, radrepo verify still sees an element after the pixels
    profile = load_profile(OPTIONS)
    assert verify.check_structure(row["output_path"], "x.dcm", profile) == []
    out.add_new(0x80000010, "LO", "anything")
    out.save_as(tmp_path / "tampered.dcm")
    assert [(f.element, f.what) for f in verify.check_structure(
        tmp_path / "tampered.dcm", "x.dcm", profile)] == [
        ("(8000,0010)", "public element the dictionary does not know")]


def test_read_header_seeks_past_the_pixels(tmp_path):
    ds = base()
    ds.PixelData = b"\x01" * (1 << 20)
    ds.Rows = ds.Columns = 724  # 1 MiB of 16-bit pixels
    ds.add_new(0x80000010, "LO", "DOE after pixels")
    raw = write(ds, tmp_path / "big.dcm")

    class Counting:
        def __init__(self, fh):
            self.fh, self.read_bytes = fh, 0

        def read(self, n=-1):
            data = self.fh.read(n)
            self.read_bytes += len(data)
            return data

        def seek(self, *args):
            return self.fh.seek(*args)

    with open(raw, "rb") as fh:
        counting = Counting(fh)
        header = verify.header_bytes(counting)
    assert counting.read_bytes < 4096 and b"DOE after pixels" in header
    assert verify.elements_holding(header, IdentifierMatcher(["DOE"])) == [
        "(8000,0010)", "PatientName"]


# --- class 2: non-Latin and short names ------------------------------------------------

NON_LATIN = [
    ("ISO_IR 192", "山田^太郎", "CT 胸部 山田太郎", ["山田", "太郎"]),
    (["", "ISO 2022 IR 87"], "Yamada^Tarou=山田^太郎=やまだ^たろう", "CT 山田太郎 胸部",
     ["山田", "太郎", "yamada", "tarou"]),
    (["", "ISO 2022 IR 149"], "Hong^Gildong=洪^吉洞=홍^길동", "흉부 CT 홍길동",
     ["홍", "길동", "吉洞", "gildong"]),
    ("GB18030", "Wang^XiaoDong=王^小东", "胸部 CT 王小东", ["王", "小东", "xiaodong"]),
    ("ISO_IR 100", "WU^LI", "CT CHEST WU LI", ["wu", "li"]),
]


@pytest.mark.parametrize(("charset", "name", "text", "parts"), NON_LATIN)
def test_names_in_any_character_set_and_of_any_length_are_cleaned(tmp_path, charset, name,
                                                                  text, parts):
    ds = base(name=name, charset=charset)
    ds.StudyDescription = text
    ds.SeriesDescription = text
    ds.Manufacturer = text
    item = Dataset()
    item.TextValue = f"{text} reported"
    ds.ContentSequence = Sequence([item])
    raw = write(ds, tmp_path / "in.dcm")
    [row], matcher = deidentify(tmp_path, [raw])
    out = pydicom.dcmread(row["output_path"])
    assert "CT" in out.StudyDescription and "CT" in out.Manufacturer
    assert_clean(row, parts, raw, matcher,
                 {"StudyDescription", "SeriesDescription", "Manufacturer", "TextValue"})


def test_a_value_written_in_another_character_set_is_judged_as_written(tmp_path):
    ds = base(name="MÜLLER^JÖRG")  # the file says UTF-8 ...
    ds.add(DataElement(0x00180015, "CS", "CHEST"))
    raw = write(ds, tmp_path / "in.dcm")
    data = raw.read_bytes().replace(b"CS\x06\x00CHEST ", b"CS\x06\x00M\xdcLLER")
    raw.write_bytes(data)  # ... but Body Part Examined holds the name in Latin-1
    [row], matcher = deidentify(tmp_path, [raw])
    assert pydicom.dcmread(row["output_path"]).BodyPartExamined == ""
    assert b"M\xdcLLER" not in Path(row["output_path"]).read_bytes()
    assert_clean(row, ["MÜLLER"], raw, matcher, {"BodyPartExamined"})


# --- class 3: a name only inside a sequence item ---------------------------------------

def test_identifiers_only_in_nested_items_are_collected(tmp_path):
    ds = base(name="")
    ds.OtherPatientNames = "NOWAK^ZOFIA"
    other = Dataset()
    other.PatientID = "ALT55512"
    ds.OtherPatientIDsSequence = Sequence([other])
    referenced = Dataset()
    referenced.PatientName = "KOWALSKI^JAN"
    ds.ReferencedPatientSequence = Sequence([referenced])
    ds.Manufacturer = "KOWALSKI imaging"
    ds.ManufacturerModelName = "ZOFIA 2"
    ds.SoftwareVersions = "ALT55512"
    raw = write(ds, tmp_path / "in.dcm")
    [row], matcher = deidentify(tmp_path, [raw])
    out = pydicom.dcmread(row["output_path"])
    assert out.Manufacturer == "imaging" and out.ManufacturerModelName == "2"
    assert_clean(row, ["KOWALSKI", "ZOFIA", "NOWAK", "ALT55512"], raw, matcher,
                 {"Manufacturer", "ManufacturerModelName", "SoftwareVersions", "PatientName",
                  "OtherPatientNames"})


# --- class 4: glued IDs and reformatted birth dates ------------------------------------

def test_glued_ids_and_birth_dates_in_any_format_are_cleaned(tmp_path):
    ds = base(pid="12345678")
    ds.StudyDescription = "CT CHEST PA12345678 DOB 23 NOV 1957"
    ds.SeriesDescription = "AXIAL 1957-11-23"
    ds.ProtocolName = "CHEST 23/11/1957"
    ds.ManufacturerModelName = "SCANNER 11/23/1957"
    ds.SoftwareVersions = "PA12345678"
    raw = write(ds, tmp_path / "in.dcm")
    [row], matcher = deidentify(tmp_path, [raw])
    out = pydicom.dcmread(row["output_path"])
    assert (out.StudyDescription, out.SeriesDescription, out.ProtocolName) == (
        "CT CHEST", "AXIAL", "CHEST")
    assert out.ManufacturerModelName == "SCANNER"
    assert row["text_tokens_removed"] >= 6
    assert_clean(row, ["12345678", "1957"], raw, matcher,
                 {"StudyDescription", "SeriesDescription", "ProtocolName",
                  "ManufacturerModelName", "SoftwareVersions"})
    for form in ("23 NOV 1957", "1957-11-23", "23/11/1957", "11/23/1957", "Nov 23, 1957"):
        assert matcher.in_text(f"seen {form} here"), form


# --- class 6: VR UN, and text in a safe-listed private element ------------------------

def test_un_study_description_is_cleaned_and_unknown_un_removed(tmp_path):
    ds = base()
    del ds.StudyDescription
    ds.add(DataElement(0x00081030, "UN", b"CT CHEST DOE JANE "))
    ds.add(DataElement(0x00091001, "UN", b"DOE"))  # private, unknown: removed with the block
    ds.add(DataElement(0x80020010, "UN", b"JANE DOE"))  # public, unknown: removed
    raw = write(ds, tmp_path / "in.dcm")
    [row], matcher = deidentify(tmp_path, [raw])
    out = pydicom.dcmread(row["output_path"])
    assert out["StudyDescription"].VR == "LO" and out.StudyDescription == "CT CHEST"
    assert 0x80020010 not in out
    assert_clean(row, ["DOE", "JANE"], raw, matcher, {"StudyDescription", "(8002,0010)"})


@pytest.mark.parametrize("vr", ["LO", "UN"])
def test_safe_private_text_is_cleaned(tmp_path, vr):
    ds = base()
    block = ds.private_block(0x0043, "GEMS_PARM_01", create=True)
    value = "1.375 DOE JANE"
    block.add_new(0x27, vr, value if vr == "LO" else value.encode())
    raw = write(ds, tmp_path / "in.dcm")
    [row], matcher = deidentify(tmp_path, [raw], (*OPTIONS, "retain_safe_private"))
    out = pydicom.dcmread(row["output_path"])
    kept = out[0x00431027].value
    assert (kept if isinstance(kept, str) else kept.decode().strip("\0 ")) == "1.375"
    assert_clean(row, ["DOE", "JANE"], raw, matcher, {"(0043,1027)"})


# --- class 7: names that are also words, and radrepo's own text ------------------------

@pytest.mark.parametrize("name", ["UNKNOWN^PATIENT", "CLEAN^MARGARET", "ANONYMIZED",
                                  "SCREEN^SAVE"])
def test_innocent_names_are_not_blocked_by_radrepos_own_text(tmp_path, name):
    ds = base(name=name)
    ds.SeriesDescription = "SCREEN SAVE"  # the whole name of one patient: removed for them
    raw = write(ds, tmp_path / "in.dcm")
    rows, matcher = deidentify(tmp_path, [raw])
    assert [r["status"] for r in rows] == [OK]  # the one pass's gate let it through
    out = pydicom.dcmread(rows[0]["output_path"])
    assert "Clean Descriptors Option" in [c.CodeMeaning for c in
                                          out.DeidentificationMethodCodeSequence]
    assert out.SeriesDescription == ("" if name == "SCREEN^SAVE" else "SCREEN SAVE")
    qc = pa.table({"detail": ["secondary capture (screen save, dose report or scanned "
                              "document)", "modality OT is not in the allow-list"]})
    assert verify.scan_table("qc", qc, matcher) == []
    # the raw file is still caught: its Patient's Name is the whole name (except a name that
    # is radrepo's own dummy value, which cannot be told apart from it and names no one)
    caught = "PatientName" in verify.elements_holding(verify.header_bytes(raw), matcher)
    assert caught == (name != "ANONYMIZED")


def test_reports_fixed_text_is_not_searched_but_what_fills_it_is():
    from schemas.catalog import QC, SERIES
    from tasks.contact_sheet import contact_sheet

    matcher = IdentifierMatcher(["CONTACT^SHEET", "CONTACT", "SHEET", "LOCALIZER^WRONG",
                                 "LOCALIZER", "WRONG"])
    series = pa.Table.from_pylist([
        {"series_uid": "2.25.1", "study_uid": "2.25.2", "modality": "CT",
         "description": "AXIAL", "n_instances": 1, "status": "published"}], schema=SERIES)
    qc = pa.Table.from_pylist([{"level": "series", "uid": "2.25.1", "rule": "ct_localizer",
                                "outcome": "flagged", "detail": "CT localizer (scout)"}],
                              schema=QC)
    [page] = [v for k, v in contact_sheet("s1", "b1", series, qc, {}).items()
              if k.endswith(".html")]
    assert verify.scan_report("contact-sheet.html", page, matcher) == []
    leaked = page.replace(b"<td>AXIAL</td>", b"<td>AXIAL for Sheet</td>")
    [finding] = verify.scan_report("contact-sheet.html", leaked, matcher)
    assert finding.where == "contact-sheet.html" and "Sheet" not in str(finding)


def test_innocent_batch_publishes_and_a_leaking_catalog_fails_naming_the_place(
        prefect_server, tmp_path):
    from flows.nightly import nightly

    src = tmp_path / "src"
    src.mkdir()
    for i, name in enumerate(["UNKNOWN^PATIENT", "CLEAN^MARGARET"]):
        ds = base(name=name, pid=f"MRN{i}4411", sop=f"1.2.99.{i}")
        ds.Manufacturer = "CLEAN ROOM SYSTEMS"
        write(ds, src / f"{i}.dcm")
    config = parse_config({"release": "release", "work_dir": "work", "sites": [
        {"site_id": "s1", "source": {"kind": "flat", "path": "src"}}]}, tmp_path)
    [summary] = nightly(config)
    assert (summary["status"], summary["published"], summary["quarantined"]) == (
        "published", 2, 0), summary
    [series] = list((tmp_path / "release" / "catalog" / "series").rglob("*.parquet"))
    table = pq.read_table(series)
    assert table.column("text_tokens_removed").to_pylist() == [0, 0]
    lists = sorted((tmp_path / "work").glob("*/index/*.identifiers.parquet"))
    matcher = verify.read_identifiers(lists)
    leaked = table.set_column(table.schema.get_field_index("description"), "description",
                              pa.array(["CT for MARGARET"] * table.num_rows))
    findings = verify.scan_table("series", leaked, matcher)
    assert [str(f) for f in findings][0] == "catalog series row 0: description: identifying value"
    with pytest.raises(verify.LeakFound) as err:
        verify.raise_if_found(findings)
    assert "MARGARET" not in str(err.value)


# --- the vocabulary keeps innocent descriptions ----------------------------------------

@pytest.mark.parametrize("text", ["CT CHEST WO CONTRAST", "CTA CHEST PE PROTOCOL",
                                  "XR CHEST PA AND LATERAL", "AXIAL LUNG 2.5MM", "Dose Report",
                                  "CT ABD/PELVIS W/O", "MR BRAIN T1 AX POST GAD", "3D VR",
                                  "XR PORTABLE CHEST 1 VIEW", "CHEST ROUTINE", "B30f"])
def test_innocent_descriptions_survive(text):
    assert clean_free_text(text, None) == (text, 0)


# --- property: random identifiers in random places -------------------------------------

LATIN = "ÀÁÂÄÇÈÉÊËÍÎÏÑÒÓÔÖÙÚÛÜÝŁŚŻ"
CYRILLIC = "БГДЖЗИЙЛПФЦЧШЩЫЭЮЯ"
GREEK = "ΓΔΘΛΞΠΣΦΨΩ"
CJK = "王李张刘陈杨黄赵吴周徐孙马朱胡"
part = st.sampled_from([LATIN, CYRILLIC, GREEK, CJK]).flatmap(
    lambda alphabet: st.text(alphabet=alphabet, min_size=1, max_size=3))
PLACES = ["top", "nested", "private", "un", "after_pixels", "meta"]
FIELDS = ["StudyDescription", "SeriesDescription", "ProtocolName", "Manufacturer",
          "ManufacturerModelName", "SoftwareVersions"]


@settings(max_examples=50, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(family=part, given_name=part, pid=st.integers(10**5, 10**9 - 1),
       birth=st.dates(date(1920, 1, 1), date(2010, 12, 31)),
       plants=st.lists(st.tuples(st.sampled_from(PLACES), st.sampled_from(FIELDS),
                                 st.sampled_from(["family", "given", "full", "id", "glued",
                                                  "date"])), min_size=1, max_size=6),
       form=st.integers(0, 20), nested_name=st.booleans())
def test_planted_identifiers_never_reach_the_output(tmp_path, family, given_name, pid, birth,
                                                    plants, form, nested_name):
    dob = f"{birth:%Y%m%d}"
    forms = birth_date_forms(dob)
    values = {"family": family, "given": given_name, "full": f"{given_name} {family}",
              "id": str(pid), "glued": f"PA{pid}", "date": forms[form % len(forms)]}
    case = Path(tempfile.mkdtemp(dir=tmp_path))
    ds = base(name="" if nested_name else f"{family}^{given_name}", pid=str(pid))
    ds.PatientBirthDate = dob
    if nested_name:
        ref = Dataset()
        ref.PatientName = f"{family}^{given_name}"
        ds.ReferencedPatientSequence = Sequence([ref])
    item = Dataset()
    ds.RequestAttributesSequence = Sequence([item])
    block = ds.private_block(0x0029, "ACME PACS 1.0", create=True)
    after = ds.private_block(0x8001, "ACME AFTER", create=True)
    for i, (place, keyword, what) in enumerate(plants):
        text = f"CT {values[what]} CHEST"
        if place == "top":
            setattr(ds, keyword, text)
        elif place == "nested":
            setattr(item, keyword, text)
        elif place == "private":
            block.add_new(0x10 + i, "LO", text)
        elif place == "un":
            ds.add(DataElement(0x00081030, "UN", encode_string(text, ["utf_8"])))
        elif place == "after_pixels":
            after.add_new(0x10 + i, "LO", text)
            ds.add_new(0x80000010 + 2 * i, "LO", text)
        else:
            meta = values[what] if values[what].isascii() else values["glued"]  # AE: ASCII
            ds.file_meta.SourceApplicationEntityTitle = meta[:16]
    dirty = write(ds, case / "dirty.dcm")
    innocent = base(name="SMITH^JOHN", pid="M000111", sop="1.2.4.4.4")
    write(innocent, case / "innocent.dcm")
    done = one_pass(case, [dirty, case / "innocent.dcm"])
    statuses = done.deidentified.column("status").to_pylist()
    assert len(statuses) == done.index.num_rows and set(statuses) <= {OK, QUARANTINED}
    assert statuses == [OK, OK], done.deidentified.column("reason").to_pylist()
    planted = [family, given_name, values["date"]]
    for row in done.deidentified.to_pylist():
        text = " | ".join(decoded_values(row["output_path"]))
        data = Path(row["output_path"]).read_bytes()
        for value in planted:
            assert not leaked(value, text), value
            if not value.isascii():
                assert value.encode() not in data
        assert not re.search(rf"(?<!\d){pid}(?!\d)", text)
        assert dob not in text
