"""End to end: the nightly flow over three synthetic sites, on Prefect's test server and a real
Dask cluster, checked against the generator's ground truth."""

from __future__ import annotations

import hashlib
import json
import re
from collections import Counter
from pathlib import Path

import duckdb
import pyarrow.parquet as pq
import pydicom
import pytest

from tasks.deidentify.keys import PseudonymKeys
from tasks.zones import Release
from tests.conftest import TEST_SECRET

SC_PREFIX = "1.2.840.10008.5.1.4.1.1.7"
ALLOWED = {"CT", "CR", "DX"}
WINDOW_BEFORE = {"CT": 30, "CR": 365, "DX": 365}
DERIVED = {"DERIVED", "SECONDARY", "REFORMATTED", "3D", "MPR", "MIP", "VOLUME"}


def qc_excluded(f: dict) -> bool:
    """The default QC rules (schemas/qc_rules.yaml) applied to one planted file."""
    image_type = set((f["image_type"] or "").split("\\"))
    return (f["modality"] not in ALLOWED or f["sop_class_uid"].startswith(SC_PREFIX)
            or "SCREEN SAVE" in image_type
            or (f["modality"] == "CT" and (image_type & DERIVED or "LOCALIZER" in image_type)))


def outside_window(f: dict, site: dict) -> bool:
    """Whether the file's study lies outside the window of its strictest modality."""
    linked = {p["mrn"] for p in site["patients"] if p["has_clinical"]}
    if f["mrn"] not in linked or f["days_from_index"] is None:
        return False
    modalities = {g["modality"] for g in site["files"] if g["study_uid"] == f["study_uid"]}
    before = min((WINDOW_BEFORE[m] for m in modalities if m in WINDOW_BEFORE), default=None)
    return before is not None and f["days_from_index"] < -before


def expected_disposition(f: dict, site: dict, by_key: dict) -> str:
    """What the pipeline's default rules do with one planted file."""
    if f["defect"]:
        return "quarantined"
    if qc_excluded(f) or outside_window(f, site):
        return "excluded"
    if f["duplicate_of"] in by_key:  # a re-sent copy, a file stored twice, a double store
        return "excluded"
    return "published"


def expected_counts(truth: dict) -> dict[str, Counter]:
    out = {}
    for site_id, site in truth["sites"].items():
        waiting = {b for b, info in site["batches"].items() if not info["complete"]}
        files = [f for f in site["files"] if f["batch"] not in waiting]
        by_key = {f["key"]: f for f in files}
        counts = Counter(expected_disposition(f, site, by_key) for f in files)
        counts["files_in"] = len(files)
        out[site_id] = counts
    return out


def summed(summaries: list[dict]) -> dict[str, Counter]:
    out: dict[str, Counter] = {}
    for s in summaries:
        c = out.setdefault(s["site_id"], Counter())
        for key in ("files_in", "published", "excluded", "quarantined"):
            c[key] += s[key]
    return out


def file_state(root: Path) -> dict[str, tuple[int, str]]:
    return {str(p.relative_to(root)): (p.stat().st_mtime_ns, hashlib.sha256(p.read_bytes())
                                       .hexdigest()) for p in sorted(root.rglob("*"))
            if p.is_file()}


@pytest.fixture(scope="module")
def published(prefect_server, make_config, tmp_path_factory):
    from flows.nightly import nightly

    base = tmp_path_factory.mktemp("e2e")
    config = make_config(base / "release", base / "work")
    summaries = nightly(config)
    return config, base, summaries


def test_counts_match_the_ground_truth(published, corpus):
    _, truth = corpus
    config, base, summaries = published
    assert {s["status"] for s in summaries} == {"published"}
    got = summed(summaries)
    for site_id, want in expected_counts(truth).items():
        assert got[site_id]["files_in"] == want["files_in"], site_id
        for key in ("published", "excluded", "quarantined"):
            assert got[site_id][key] == want[key], (site_id, key)
        assert want["files_in"] == want["published"] + want["excluded"] + want["quarantined"]
    # the zip site's IN-PROGRESS batch waits; every other batch is published
    batches = {(s["site_id"], s["batch_id"]) for s in summaries}
    zip_site = next(k for k, v in truth["sites"].items() if v["layout"] == "zip_batches")
    for batch, info in truth["sites"][zip_site]["batches"].items():
        assert ((zip_site, batch) in batches) == info["complete"]


def test_catalog_is_queryable_and_consistent(published, corpus):
    _, truth = corpus
    config, base, summaries = published
    release = base / "release"
    con = duckdb.connect(str(release / "catalog.duckdb"), read_only=True)
    per_site = dict(con.sql("select site_id, count(*) from instances group by 1").fetchall())
    assert per_site == {k: v["published"] for k, v in expected_counts(truth).items()}
    # every published file exists with the size and hash the catalog claims
    for path, size, sha in con.sql("select path, size_bytes, sha256 from instances").fetchall():
        data = (release / path).read_bytes()
        assert len(data) == size and hashlib.sha256(data).hexdigest() == sha
    dicom_files = list((release / "dicom").rglob("*.dcm"))
    assert len(dicom_files) == sum(per_site.values())
    # studies link to clinical data: the synthetic exams lie between -400 and +40 days
    days = [d for (d,) in con.sql("select days_from_index from studies").fetchall()]
    assert days and all(d is not None and -400 <= d <= 40 for d in days)
    # the remapped patient's images join the clinical record of the current ID
    assert con.sql("select count(*) from patients where not has_clinical").fetchone() == (0,)
    runs = con.sql("select site_id, files_in, published + excluded + quarantined from runs")
    assert all(a == b for _, a, b in runs.fetchall())
    duplicates = dict(con.sql("select kind, count(*) from duplicates group by 1").fetchall())
    planted = Counter()
    for site in truth["sites"].values():
        by_key = {f["key"]: f for f in site["files"]}
        for f in site["files"]:
            original = by_key.get(f["duplicate_of"] or "")
            if original and not qc_excluded(f) and not outside_window(f, site):
                planted["resent" if original["sop_uid"] == f["sop_uid"] else "double_store"] += 1
    split = duplicates.pop("split_merged")
    assert split > 0 and duplicates == dict(planted)
    assert set(planted) == {"resent", "double_store"}
    # clinical records without images are counted in the run record, never published
    for site_id, site in truth["sites"].items():
        lonely = [p["mrn"] for p in site["patients"] if p["has_clinical"] and not p["has_images"]]
        counts = [json.loads(c) for (c,) in con.sql(
            "select counts from runs where site_id = ?", params=[site_id]).fetchall()]
        assert min(c["clinical_rows_without_images"] for c in counts) >= len(lonely) > 0
        assert all(c["clinical_rows_read"] == sum(p["has_clinical"] for p in site["patients"])
                   and c["clinical_rows_skipped"] == {} for c in counts)
        for mrn in lonely:
            pseudonym = PseudonymKeys(TEST_SECRET.encode()).patient_id(site_id, mrn)
            assert con.sql("select count(*) from patients where patient_id = ?",
                           params=[pseudonym]).fetchone() == (0,)
    # the CT exam split into two zips is one study in the catalog and the published DICOM
    keys = PseudonymKeys(TEST_SECRET.encode())
    site = next(v for v in truth["sites"].values() if v["layout"] == "zip_batches")
    parts = [f for f in site["files"] if f["quirk"] == "ct_split"]
    first, second = sorted({(f["exam_time"], f["study_uid"]) for f in parts})
    by_key = {f["key"]: f for f in site["files"]}
    kept = sum(expected_disposition(f, site, by_key) == "published" for f in parts)
    target, merged_away = keys.uid(first[1]), keys.uid(second[1])
    assert con.sql("select count(*) from instances where study_uid = ?",
                   params=[target]).fetchone() == (kept,)
    assert con.sql("select count(*) from studies where study_uid = ?",
                   params=[merged_away]).fetchone() == (0,)
    assert con.sql("select count(*) from duplicates where kind = 'split_merged' and kept_uid = ?",
                   params=[target]).fetchone()[0] > 0
    # each batch has a contact sheet: one thumbnail per published series, in the manifest
    for site_id, batch_id, n in con.sql("select site_id, batch_id, count(*) from series "
                                        "where status = 'published' group by all").fetchall():
        sheet = release / "reports" / site_id / batch_id
        assert (sheet / "contact-sheet.html").exists()
        assert len(list((sheet / "thumbs").glob("*.png"))) == n
        manifest = Release(str(release)).manifest(site_id, batch_id)
        assert f"reports/{site_id}/{batch_id}/contact-sheet.html" in manifest.column(
            "path").to_pylist()
    # every study outside its inclusion window says so, with the distance in the qc table
    window = con.sql("select count(*) from qc where rule = 'inclusion_window'").fetchone()[0]
    assert window == con.sql(
        "select count(*) from studies where reason like 'outside_window:%'").fetchone()[0] > 0
    con.close()


def identifier_patterns(truth: dict, min_length: int = 3) -> list[re.Pattern]:
    """The planted identifiers as one pattern (one pass over a text finds any of them) that
    cannot match inside a longer word or number."""
    idents = sorted({ident for site in truth["sites"].values() for ident in site["identifiers"]
                     if len(ident) >= min_length}, key=lambda i: (-len(i), i))
    return [re.compile(r"(?<![A-Za-z0-9.])(?:" + "|".join(map(re.escape, idents))
                       + r")(?![A-Za-z0-9])", re.IGNORECASE)]


def find_leaks(root: Path, truth: dict) -> list[tuple[str, str]]:
    """(file, where) for every planted identifier found in names, DICOM values, raw DICOM
    bytes (identifiers of 6+ characters) or Parquet cells under ``root``."""
    patterns, long_patterns = identifier_patterns(truth), identifier_patterns(truth, 6)
    leaks = []
    for path in sorted(root.rglob("*")):
        rel = str(path.relative_to(root))
        leaks += [(rel, "name") for p in patterns if p.search(rel)]
        if path.suffix == ".dcm" or (path.is_file() and path.read_bytes()[128:132] == b"DICM"):
            data = path.read_bytes().decode("latin-1")
            leaks += [(rel, "bytes") for p in long_patterns if p.search(data)]
            ds = pydicom.dcmread(path)
            for where, value in [*text_values(ds), *text_values(ds.file_meta)]:
                leaks += [(rel, where) for p in patterns if p.search(value)]
        elif path.suffix == ".html":
            text = path.read_text()
            leaks += [(rel, "html") for p in patterns if p.search(text)]
        elif path.suffix == ".parquet":
            for row in pq.read_table(path).to_pylist():
                for column, value in row.items():
                    leaks += [(rel, column) for p in patterns
                              if value is not None and p.search(str(value))]
    return leaks


def text_values(ds: pydicom.Dataset):
    for elem in ds.iterall():
        if elem.VR in ("SQ", "OB", "OW", "UN") or elem.value is None:
            continue
        values = elem.value if elem.VM > 1 else [elem.value]
        for v in values:
            yield elem.keyword or str(elem.tag), str(v)


def test_quarantined_objects_are_kept_in_the_private_zone(published, corpus):
    _, truth = corpus
    config, base, summaries = published
    for s in summaries:
        listing = base / "work" / s["site_id"] / "quarantine" / s["batch_id"] / "quarantine.parquet"
        rows = pq.read_table(listing).to_pylist() if listing.exists() else []
        assert len(rows) == s["quarantined"]
        assert sorted(r["reason"] for r in rows) == sorted(
            r for r, n in s["quarantined_by_reason"].items() for _ in range(n))
        for r in rows:  # the synthetic defects all leave bytes to keep
            assert (listing.parent / r["object_id"]).exists(), r["reason"]


def test_no_planted_identifier_reaches_the_release(published, corpus):
    corpus_dir, truth = corpus
    _, base, _ = published
    assert find_leaks(base / "release", truth) == []
    # the scan itself finds what was planted: run it on one identified source folder
    tree_site = next(v for v in truth["sites"].values() if v["layout"] == "tree")
    source_leaks = find_leaks(corpus_dir / tree_site["source"], truth)
    assert {"name", "bytes", "PatientName", "PatientID", "AccessionNumber"} <= {
        where for _, where in source_leaks}


def test_rerun_adds_nothing_and_rewrites_nothing(published):
    from flows.nightly import nightly

    config, base, _ = published
    before = file_state(base / "release")
    assert nightly(config) == []
    assert file_state(base / "release") == before


def test_forced_rerun_of_a_batch_rewrites_no_bytes(published, corpus):
    from flows.site_batch import site_batch

    _, truth = corpus
    config, base, summaries = published
    site_id, batch_id = summaries[0]["site_id"], summaries[0]["batch_id"]
    before = file_state(base / "release")
    result = site_batch(config, site_id, batch_id, force=True)
    after = file_state(base / "release")
    assert result["files_written"] == 0 and result["files_unchanged"] == summaries[0]["published"]
    added = set(after) - set(before)
    assert len(added) == 1 and added.pop().startswith(
        f"catalog/runs/site_id={site_id}/batch_id={batch_id}/run-")
    assert {k: v for k, v in after.items() if k in before} == before


def test_pseudonyms_and_bytes_are_stable_across_fresh_runs(published, make_config,
                                                           tmp_path_factory):
    from flows.nightly import nightly

    config, base, _ = published
    again = tmp_path_factory.mktemp("e2e-again")
    nightly(make_config(again / "release", again / "work"))

    def content(root: Path) -> dict[str, str]:
        return {k: sha for k, (_, sha) in file_state(root).items()
                if not k.startswith("catalog/runs/") and k != "catalog.duckdb"}

    first, second = content(base / "release"), content(again / "release")
    assert first == second
    query = "select patient_id, study_uid, study_date from studies order by all"
    with duckdb.connect(str(base / "release/catalog.duckdb"), read_only=True) as a, \
            duckdb.connect(str(again / "release/catalog.duckdb"), read_only=True) as b:
        assert a.sql(query).fetchall() == b.sql(query).fetchall()


def test_backfill_by_date_window_reruns_only_those_batches(published):
    from datetime import date

    from flows.nightly import backfill

    config, base, _ = published
    before = file_state(base / "release")
    result = backfill(config, since=date(2020, 5, 20), until=date(2020, 5, 31))
    assert [(s["site_id"], s["batch_id"]) for s in result] == [("site-a", "CXR-UPDATE-20200523")]
    assert result[0]["files_written"] == 0 and result[0]["status"] == "published"
    after = file_state(base / "release")
    [added] = [k for k in after if k not in before]  # one new run record, nothing rewritten
    assert added.startswith("catalog/runs/site_id=site-a/batch_id=CXR-UPDATE-20200523/")
    assert {k: v for k, v in after.items() if k in before} == before
    by_name = backfill(config, batches=["CT-UPDATE-20200519"])
    assert [s["batch_id"] for s in by_name] == ["CT-UPDATE-20200519"]
