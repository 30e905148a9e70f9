"""The labelling loop over a published release: the FHIR form, labels back in (FHIR and CSV),
consensus and Fleiss' kappa, refusals, and DICOM SEG objects."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import duckdb
import numpy as np
import pytest
from fhir.resources.R4B.questionnaire import Questionnaire
from fhir.resources.R4B.questionnaireresponse import QuestionnaireResponse
from typer.testing import CliRunner

from flows.cli import app
from schemas.config import load_config
from schemas.label_schema import load_label_schema
from tasks.deidentify.keys import PseudonymKeys
from tests.conftest import TEST_SECRET

runner = CliRunner()
SITE = "site-a"
READERS = ("dr-ada", "dr-bob", "dr-cy")


@pytest.fixture(scope="module")
def release(published_config, tmp_path_factory):
    """The published release, its config, and the pre-filled form written by the CLI."""
    base = tmp_path_factory.mktemp("labels")
    config_path = published_config
    cfg = load_config(config_path)
    form = base / "form"
    result = runner.invoke(app, ["labels", "form", cfg.release, "--out", str(form)])
    assert result.exit_code == 0, result.output
    return config_path, Path(cfg.release), form


def catalog(release_dir: Path) -> duckdb.DuckDBPyConnection:
    return duckdb.connect(str(release_dir / "catalog.duckdb"), read_only=True)


def studies_of(release_dir: Path, site: str) -> list[str]:
    with catalog(release_dir) as con:
        return [r[0] for r in con.execute(
            "SELECT study_uid FROM studies WHERE site_id = ? AND status = 'published' "
            "ORDER BY study_uid", [site]).fetchall()]


def completed(form: Path, study_uid: str, reader: str, answers: dict[str, str],
              role: str = "reader", authored: str = "2026-11-30T10:00:00+00:00") -> dict:
    """A reader's completed response, made from the form's pre-filled one."""
    response = json.loads((form / "responses" / f"{study_uid}.json").read_text())
    response["status"] = "completed"
    response["authored"] = authored
    response["item"].append({"linkId": "reader", "answer": [{"valueString": reader}]})
    response["item"].append({"linkId": "role", "answer": [{"valueCoding": {
        "system": "urn:radrepo:labels:ricord:role", "code": role}}]})
    for link, code in answers.items():
        value = ({"valueString": code} if link == "finding" else
                 {"valueCoding": {"system": "urn:radrepo:labels:ricord", "code": code}})
        response["item"].append({"linkId": link, "answer": [value]})
    return response


def test_the_form_is_valid_fhir_and_prefilled_from_the_catalog(release):
    _, release_dir, form = release
    questionnaire = Questionnaire.model_validate_json((form / "questionnaire.json").read_text())
    items = {i.linkId: i for i in questionnaire.item}
    assert [o.valueCoding.code for o in items["appearance"].answerOption] == [
        "typical", "indeterminate", "atypical", "negative"]
    assert [o.valueCoding.code for o in items["severity"].answerOption] == [
        "mild", "moderate", "severe"]
    assert items["finding"].type == "text" and items["reader"].required
    assert items["patient_id"].readOnly and items["clinical_crp"].type == "decimal"

    with catalog(release_dir) as con:
        want = dict(con.execute("SELECT study_uid, patient_id FROM studies "
                                "WHERE status = 'published'").fetchall())
        crp = dict(con.execute(
            "SELECT s.study_uid, c.value FROM studies s JOIN clinical c USING (site_id, "
            "patient_id) WHERE s.status = 'published' AND c.name = 'crp' "
            "QUALIFY row_number() OVER (PARTITION BY s.study_uid ORDER BY abs(c.day)) = 1"
        ).fetchall())
    files = sorted((form / "responses").glob("*.json"))
    assert len(files) == len(want) > 10
    with_crp = 0
    for path in files:
        response = QuestionnaireResponse.model_validate_json(path.read_text())
        uid = response.subject.identifier.value.removeprefix("urn:oid:")
        answers = {i.linkId: i.answer[0] for i in response.item if i.answer}
        assert answers["study_uid"].valueString == uid
        assert answers["patient_id"].valueString == want[uid]
        if uid in crp:
            with_crp += 1
            assert float(answers["clinical_crp"].valueDecimal) == pytest.approx(crp[uid])
        assert response.status == "in-progress"
    assert with_crp > 0


# appearance per study: three readers; S3 is a three-way split (adjudicated later),
# S5 has two readers who disagree (never adjudicated)
VOTES = {
    0: ("typical", "typical", "typical"),
    1: ("typical", "typical", "indeterminate"),
    2: ("indeterminate", "atypical", "negative"),
    3: ("negative", "negative", "atypical"),
    4: ("typical", "indeterminate"),
}


def fleiss_by_hand() -> float:
    """Fleiss' kappa of VOTES' four three-reader studies, worked out in full:
    rows (typical, indeterminate, atypical, negative) = [3,0,0,0] [2,1,0,0] [0,1,1,1] [0,0,1,2];
    P_i = (sum n_ij^2 - 3) / 6 = 1, 1/3, 0, 1/3, so P-bar = 5/12; column totals 5, 2, 2, 3 of
    12 give P_e = (25 + 4 + 4 + 9) / 144 = 7/24; kappa = (5/12 - 7/24) / (1 - 7/24) = 3/17."""
    return 3 / 17


def test_three_readers_give_majorities_ties_adjudication_and_kappa(release, tmp_path):
    config_path, release_dir, form = release
    studies = studies_of(release_dir, SITE)[:5]
    inputs = tmp_path / "readings"
    inputs.mkdir()
    bundle = {"resourceType": "Bundle", "type": "collection", "entry": []}
    csv_lines = ["study,reader,label,value,authored"]
    for index, votes in VOTES.items():
        for reader, vote in zip(READERS, votes, strict=False):
            answers = {"appearance": vote}
            if index == 0:
                answers["severity"] = {"dr-cy": "moderate"}.get(reader, "mild")
                answers["finding"] = "bilateral peripheral opacities"
            if reader == "dr-ada":  # one reader's forms as single files
                (inputs / f"ada-{index}.json").write_text(
                    json.dumps(completed(form, studies[index], reader, answers)))
            elif reader == "dr-bob":  # another's as one Bundle
                bundle["entry"].append({"resource": completed(form, studies[index], reader,
                                                              answers)})
            else:  # the third exports CSV
                for link, value in answers.items():
                    csv_lines.append(f"{studies[index]},{reader},{link},{value},"
                                     "2026-11-30T11:00:00Z")
    (inputs / "bob-bundle.json").write_text(json.dumps(bundle))
    (inputs / "cy.csv").write_text("\n".join(csv_lines) + "\n")

    result = runner.invoke(app, ["labels", "import", str(config_path), str(inputs)])
    assert result.exit_code == 0, result.output
    n_labels = sum(len(v) for v in VOTES.values()) + 3 * 2  # + severity and finding of S1
    assert f"{n_labels} labels imported, 0 already there" in result.output

    def consensus() -> dict[str, tuple]:
        with catalog(release_dir) as con:
            rows = con.execute("SELECT study_uid, n_readers, majority, consensus, status "
                               "FROM label_consensus WHERE item = 'appearance'").fetchall()
        return {r[0]: r[1:] for r in rows}

    got = consensus()
    assert got[studies[0]] == (3, "typical", "typical", "majority")
    assert got[studies[1]] == (3, "typical", "typical", "majority")
    assert got[studies[2]] == (3, None, None, "needs_adjudication")
    assert got[studies[3]] == (3, "negative", "negative", "majority")
    assert got[studies[4]] == (2, None, None, "needs_adjudication")

    adjudication = tmp_path / "adjudication.csv"
    adjudication.write_text("study,reader,role,label,value\n"
                            f"{studies[2]},dr-dee,adjudicator,appearance,atypical\n")
    result = runner.invoke(app, ["labels", "import", str(config_path), str(adjudication)])
    assert result.exit_code == 0, result.output
    got = consensus()
    assert got[studies[2]] == (3, None, "atypical", "adjudicated")
    assert got[studies[4]][-1] == "needs_adjudication"

    again = runner.invoke(app, ["labels", "import", str(config_path), str(inputs)])
    assert again.exit_code == 0
    assert f"0 labels imported, {n_labels} already there" in again.output

    keys = PseudonymKeys(TEST_SECRET.encode())
    with catalog(release_dir) as con:
        readers = {r[0] for r in con.execute("SELECT DISTINCT reader_id FROM labels "
                                             f"WHERE site_id = '{SITE}'").fetchall()}
        severity = con.execute("SELECT consensus, status FROM label_consensus WHERE "
                               "item = 'severity' AND study_uid = ?", [studies[0]]).fetchone()
    assert readers == {"R" + keys.opaque("reader", r).upper()
                       for r in (*READERS, "dr-dee")}
    assert severity == ("mild", "majority")
    for part in (release_dir / "catalog" / "labels").rglob("*.parquet"):
        assert not any(r.encode() in part.read_bytes() for r in READERS)

    result = runner.invoke(app, ["labels", "agreement", str(release_dir)])
    assert result.exit_code == 0, result.output
    from tasks.labels.agreement import agreement_table

    with catalog(release_dir) as con:
        table = {(r["site_id"], r["item"]): r for r in
                 agreement_table(con, load_label_schema()).to_pylist()}
    row = table[(SITE, "appearance")]
    assert (row["studies"], row["readers_per_study"], row["studies_left_out"]) == (4, 3, 1)
    assert row["kappa"] == pytest.approx(fleiss_by_hand())
    assert row["observed_agreement"] == pytest.approx(5 / 12)
    # severity: one study, [2, 1, 0]: P-bar 1/3, P_e 5/9, kappa (1/3 - 5/9) / (4/9) = -1/2
    assert table[(SITE, "severity")]["kappa"] == pytest.approx(-0.5)
    assert "0.1765" in result.output
    report = (release_dir / "reports" / "labels" / "agreement.csv").read_text()
    assert f"{SITE},appearance,4,3,1,0.4167,0.1765" in report


def test_bad_labels_are_refused_by_name_without_their_value(release, corpus, tmp_path):
    config_path, release_dir, form = release
    _, truth = corpus
    site = "site-b"
    good, other = studies_of(release_dir, site)[:2]
    mrn = truth["sites"][site]["patients"][0]["mrn"]
    original_uid = truth["sites"][site]["files"][0]["study_uid"]
    inputs = tmp_path / "bad"
    inputs.mkdir()

    def write(name: str, response: dict) -> None:
        (inputs / name).write_text(json.dumps(response))

    write("a-good.json", completed(form, good, "dr-eve", {"appearance": "typical"}))
    unknown = completed(form, good, "dr-eve", {"appearance": "typical"})
    unknown["subject"]["identifier"]["value"] = "urn:oid:2.25.12345678901234567890"
    unknown["item"] = [i for i in unknown["item"] if i["linkId"] != "study_uid"]
    write("b-unknown-study.json", unknown)
    write("c-wrong-code.json", completed(form, other, "dr-eve", {"appearance": "probable"}))
    by_mrn = copy.deepcopy(unknown)
    by_mrn["subject"]["identifier"]["value"] = mrn
    write("d-mrn.json", by_mrn)
    by_uid = copy.deepcopy(unknown)
    by_uid["subject"]["identifier"]["value"] = f"urn:oid:{original_uid}"
    write("e-original-uid.json", by_uid)
    (inputs / "g-not-filled.json").write_text((form / "responses" / f"{other}.json").read_text())
    (inputs / "f.csv").write_text("study,reader,label,value\n"
                                  f"{other},dr-eve,appearance,negative\n"
                                  f"{other},dr-eve,appearance,covid-ish\n"
                                  f"{mrn},dr-eve,appearance,typical\n"
                                  f"{other},dr-eve,colour,red\n")

    result = runner.invoke(app, ["labels", "import", str(config_path), str(inputs)])
    assert result.exit_code == 1
    out = result.output
    assert "2 labels imported" in out and "8 rejected" in out
    assert "g-not-filled.json resource 0: status is 'in-progress', not completed" in out
    assert "b-unknown-study.json resource 0: subject: unknown study" in out
    assert ("c-wrong-code.json resource 0: answer to 'appearance' is not one of typical, "
            "indeterminate, atypical, negative") in out
    assert "d-mrn.json resource 0: subject is an original identifier seen at a source" in out
    assert "e-original-uid.json resource 0: subject is an original identifier" in out
    assert "f.csv line 3: answer to 'appearance' is not one of" in out
    assert "f.csv line 4: subject is an original identifier seen at a source" in out
    assert "f.csv line 5: 'colour' is not an item of the questionnaire" in out
    assert mrn not in out and original_uid not in out and "covid-ish" not in out
    with catalog(release_dir) as con:
        got = sorted(con.execute("SELECT study_uid, answer FROM labels WHERE site_id = ?",
                                 [site]).fetchall())
    assert got == sorted([(good, "typical"), (other, "negative")])


def test_an_mrn_is_refused_even_without_the_work_folder(release, corpus):
    """Without the sources' identifier lists, the shape alone refuses a non-2.25 subject."""
    from tasks.labels.importer import LabelChecker, LabelRejected, published_studies

    config_path, release_dir, _ = release
    _, truth = corpus
    mrn = truth["sites"]["site-c"]["patients"][0]["mrn"]
    with catalog(release_dir) as con:
        checker = LabelChecker(load_label_schema(), published_studies(con),
                               PseudonymKeys(TEST_SECRET.encode()), identifiers=None)
    with pytest.raises(LabelRejected, match="not a published study UID") as err:
        checker.study(mrn)
    assert mrn not in str(err.value)


def make_seg(release_dir: Path, series_uid: str | None = None, conforming: bool = True):
    """A highdicom SEG over a published CT series' files (or, given ``series_uid``, over
    copies that claim another series). A conforming one is made as an annotation tool set up
    for the release makes it: 2.25 UIDs and no device serial number; otherwise it keeps
    highdicom's defaults."""
    import highdicom as hd
    import pydicom
    from pydicom.sr.codedict import codes
    from pydicom.uid import generate_uid

    with catalog(release_dir) as con:
        series = con.execute("SELECT series_uid FROM series WHERE modality = 'CT' AND "
                             "status = 'published' AND site_id = 'site-a' ORDER BY 1 "
                             "LIMIT 1").fetchone()[0]
        paths = [r[0] for r in con.execute("SELECT path FROM instances WHERE series_uid = ? "
                                           "ORDER BY instance_number", [series]).fetchall()]
    images = [pydicom.dcmread(release_dir / p) for p in paths]
    if series_uid:
        for ds in images:
            ds.SeriesInstanceUID = series_uid
    mask = np.zeros((len(images), images[0].Rows, images[0].Columns), dtype=bool)
    mask[:, 20:40, 20:40] = True
    description = hd.seg.SegmentDescription(
        segment_number=1, segment_label="ground glass opacity",
        segmented_property_category=codes.SCT.MorphologicallyAbnormalStructure,
        segmented_property_type=codes.SCT.Lesion,
        algorithm_type=hd.seg.SegmentAlgorithmTypeValues.MANUAL)
    seg = hd.seg.Segmentation(
        source_images=images, pixel_array=mask,
        segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=[description], series_instance_uid=generate_uid(None),
        series_number=900, sop_instance_uid=generate_uid(None), instance_number=1,
        manufacturer="radrepo-test", manufacturer_model_name="annotator",
        software_versions="1", device_serial_number="1")
    if conforming:
        seg.DeviceSerialNumber = ""
        organization = generate_uid(None)
        for elem in seg.iterall():
            if elem.keyword == "DimensionOrganizationUID":
                elem.value = organization
    else:
        seg.SOPInstanceUID = seg.file_meta.MediaStorageSOPInstanceUID = hd.UID()
    return seg, series


# highdicom warns that a published pseudonym is a one-component person name: it is meant to be
@pytest.mark.filterwarnings("ignore:The string .* is unlikely to represent:UserWarning")
def test_a_seg_over_a_published_series_is_published_and_one_over_another_refused(
        release, tmp_path):
    import highdicom as hd
    import pydicom

    config_path, release_dir, _ = release
    seg, series = make_seg(release_dir)
    seg.save_as(tmp_path / "lesion.dcm")
    stray, _ = make_seg(release_dir, series_uid=pydicom.uid.generate_uid(None))
    stray.save_as(tmp_path / "stray.dcm")
    raw, _ = make_seg(release_dir, conforming=False)
    raw.save_as(tmp_path / "raw.dcm")

    result = runner.invoke(app, ["labels", "import", str(config_path), str(tmp_path / "lesion.dcm"),
                                 str(tmp_path / "stray.dcm"), str(tmp_path / "raw.dcm")])
    assert result.exit_code == 1
    assert "1 segmentations published" in result.output
    assert "stray.dcm: it references a series that is not published (unknown series)" \
        in result.output
    assert ("raw.dcm: it fails the release's de-identification check (SOPInstanceUID: UID not "
            "remapped; DeviceSerialNumber: has a value although the profile empties it; "
            "DimensionOrganizationUID: UID not remapped") in result.output
    with catalog(release_dir) as con:
        rows = con.execute("SELECT sop_uid, referenced_series_uid, n_segments, segment_labels, "
                           "path, sha256, n_referenced_instances FROM segmentations").fetchall()
        n_images = con.execute("SELECT count(*) FROM instances WHERE series_uid = ?",
                               [series]).fetchone()[0]
    assert len(rows) == 1
    sop, referenced, n_segments, labels, path, sha, n_refs = rows[0]
    assert (sop, referenced, n_segments, labels, n_refs) == (
        str(seg.SOPInstanceUID), series, 1, "ground glass opacity", n_images)
    published = release_dir / path
    assert path.startswith(f"dicom/site-a/{seg.PatientID}/{seg.StudyInstanceUID}/")
    assert published.read_bytes() == (tmp_path / "lesion.dcm").read_bytes()
    assert hd.seg.segread(published).get_source_image_uids()

    again = runner.invoke(app, ["labels", "import", str(config_path),
                                str(tmp_path / "lesion.dcm")])
    assert again.exit_code == 0 and "0 segmentations published" in again.output
    # the labelled release still passes the release gate, SEG, labels and reports included
    work = load_config(config_path).work_dir
    checked = runner.invoke(app, ["verify", str(release_dir), "--work", work])
    assert checked.exit_code == 0, checked.output


def test_a_label_schema_problem_is_one_line_naming_the_key(tmp_path):
    from schemas.config import ConfigError
    from schemas.label_schema import DEFAULT_LABEL_SCHEMA

    text = DEFAULT_LABEL_SCHEMA.read_text()
    broken = tmp_path / "schema.yaml"
    broken.write_text(text.replace("    type: text\n", "    type: choice\n"))
    with pytest.raises(ConfigError, match=r"label schema: items\.2: Value error, a choice item "
                                          "lists its answers"):
        load_label_schema(broken)
    swapped = tmp_path / "other.yaml"
    swapped.write_text(text.replace("negative, display: Negative for pneumonia",
                                    "normal, display: Normal"))
    from tasks.labels.form import questionnaire

    items = {i.linkId: i for i in questionnaire(load_label_schema(swapped)).item}
    assert [o.valueCoding.code for o in items["appearance"].answerOption] == [
        "typical", "indeterminate", "atypical", "normal"]
