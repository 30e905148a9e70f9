"""Ingest: batch discovery, zip batches, the ledger, reading each object, and every bad-input
path."""

from __future__ import annotations

import os
import zipfile
from pathlib import Path

import pyarrow.parquet as pq
import pydicom

from schemas.config import SiteConfig
from tasks import discovery, ledger
from tests.passes import take_batch
from tests.test_deidentify import identified_ct


def zip_site(root: Path) -> None:
    """Two complete batches and one still uploading, one zip per exam."""
    for folder, exams in {
        "CXR-UPDATE-20200523-COMPLETE": ["1234_20200301-140030_A003_XR-PORT-CHEST-1V"],
        "CT-UPDATE-20200519-COMPLETE": ["1234_20200508-105300_A002_CT-CHEST-WO"],
        "CT-UPDATE-20200602-IN-PROGRESS": ["5678_20200601-090000_A009_CT-CHEST-WO"],
    }.items():
        (root / folder).mkdir(parents=True)
        for i, exam in enumerate(exams):
            dcm = root / f"{exam}.dcm"
            identified_ct(dcm, sop=f"1.2.9.{len(folder)}.{i}", study=f"1.2.9.{len(folder)}")
            with zipfile.ZipFile(root / folder / f"{exam}.zip", "w") as zf:
                zf.write(dcm, "1_AXIAL/IM0001.dcm")
                zf.writestr("README.txt", "exported by PACS for DOE^JANE")
            dcm.unlink()


def site(kind: str, path: Path) -> SiteConfig:
    return SiteConfig(site_id="s1", source={"kind": kind, "path": str(path)})


def test_zip_batches_skip_in_progress_and_parse_exam_names(tmp_path):
    src = tmp_path / "src"
    zip_site(src)
    batches = discovery.discover_batches(site("zip_batches", src), str(tmp_path / "work"), set())
    assert [b.batch_id for b in batches] == ["CT-UPDATE-20200519", "CXR-UPDATE-20200523"]
    assert discovery.discover_batches(site("zip_batches", src), str(tmp_path / "work"),
                                   {"CT-UPDATE-20200519"})[0].batch_id == "CXR-UPDATE-20200523"
    result = take_batch(site("zip_batches", src), batches[1], str(tmp_path / "work"))
    rows = result.index.to_pylist()
    assert [r["status"] for r in rows] == ["ok", "quarantined"]
    dicom, readme = rows
    assert dicom["exam_id"] == "A003" and dicom["exam_time"] == "20200301-140030"
    assert dicom["exam_description"] == "XR-PORT-CHEST-1V"
    assert dicom["member_path"] == "1_AXIAL/IM0001.dcm"
    assert dicom["sop_uid"].startswith("1.2.9.")
    assert readme["reason"] == "not DICOM"
    # streamed out of the zip once: never staged, nor named by the identifying zip name
    assert dicom["staged_path"] is None and "1234" not in dicom["object_id"]
    assert not (tmp_path / "work" / "s1" / "staging" / batches[1].batch_id / "source").exists()
    saved = pq.read_table(tmp_path / "work" / "s1" / "index" / "CXR-UPDATE-20200523.parquet")
    assert saved.num_rows == 2
    quarantine = pq.read_table(
        tmp_path / "work/s1/quarantine/CXR-UPDATE-20200523/quarantine.parquet")
    assert quarantine.column("reason").to_pylist() == ["not DICOM"]


def test_zip_batches_take_only_new_and_newly_complete_batches(tmp_path):
    src, work = tmp_path / "src", str(tmp_path / "work")
    zip_site(src)
    config = site("zip_batches", src)
    published = {b.batch_id for b in discovery.discover_batches(config, work, set())}
    assert discovery.discover_batches(config, work, published) == []  # unchanged source
    (src / "CT-UPDATE-20200602-IN-PROGRESS").rename(src / "CT-UPDATE-20200602-COMPLETE")
    [done] = discovery.discover_batches(config, work, published)
    assert done.batch_id == "CT-UPDATE-20200602" and len(done.objects) == 1
    published.add(done.batch_id)
    (src / "CXR-UPDATE-20200610-COMPLETE").mkdir()
    identified_ct(src / "CXR-UPDATE-20200610-COMPLETE" / "x.dcm", sop="1.2.9.77")
    [added] = discovery.discover_batches(config, work, published)
    assert added.batch_id == "CXR-UPDATE-20200610"
    assert [o.key for o in added.objects] == ["CXR-UPDATE-20200610-COMPLETE/x.dcm"]


def test_folder_source_is_incremental_through_the_ledger(tmp_path):
    src, work = tmp_path / "src", str(tmp_path / "work")
    (src / "p1").mkdir(parents=True)
    identified_ct(src / "p1" / "a.dcm", sop="1.2.5.1")
    cfg = site("folder", src)
    [first] = discovery.discover_batches(cfg, work, set())
    ledger.record_ingested(first, take_batch(cfg, first, work).index, work)
    published = {first.batch_id}
    assert discovery.discover_batches(cfg, work, published) == []
    os.utime(src / "p1" / "a.dcm", (1, 1))  # touched, same bytes: still nothing new
    assert discovery.discover_batches(cfg, work, published) == []
    # the ledger vouches only for published batches: a rebuilt release takes everything again
    [again] = discovery.discover_batches(cfg, work, set())
    assert [o.key for o in again.objects] == ["p1/a.dcm"]
    identified_ct(src / "p1" / "b.dcm", sop="1.2.5.2")
    [second] = discovery.discover_batches(cfg, work, published)
    assert [o.key for o in second.objects] == ["p1/b.dcm"]
    assert second.batch_id != first.batch_id and second.batch_id.startswith("folder-")


def test_bad_inputs_are_quarantined_with_reasons(tmp_path):
    src, work = tmp_path / "src", tmp_path / "work"
    src.mkdir()
    identified_ct(src / "good.dcm", sop="1.2.6.1")
    (src / "notes.txt").write_text("not an image")
    (src / "empty").write_bytes(b"")
    (src / "truncated.dcm").write_bytes((src / "good.dcm").read_bytes()[:200])
    (src / "broken.zip").write_bytes(b"PK\x03\x04 this is not really a zip")
    outside = tmp_path / "outside.dcm"
    identified_ct(outside, sop="1.2.6.2")
    (src / "link.dcm").symlink_to(outside)
    with zipfile.ZipFile(src / "bomb.zip", "w", zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("zeros.dcm", b"\0" * (4 << 20))
    [batch] = discovery.discover_batches(site("flat", src), str(work), set())
    result = take_batch(site("flat", src), batch, str(work))
    reasons = {r["key"]: r["reason"] for r in result.quarantine.to_pylist()}
    assert reasons == {
        "bomb.zip!zeros.dcm": "zip entry compression ratio too high (zip bomb)",
        "broken.zip": "corrupt zip archive (BadZipFile)",
        "empty": "not DICOM",
        "link.dcm": "symlink leads outside the source folder",
        "notes.txt": "not DICOM",
        "truncated.dcm": "truncated file (data ends before the header says)",
    }
    assert result.index.num_rows == 7 and result.deidentified.column("status").to_pylist() == [
        "ok", "quarantined"]  # good.dcm, and truncated.dcm refused once it was parsed
    # nothing was written outside the private work folder
    assert sorted(p.name for p in tmp_path.iterdir()) == ["outside.dcm", "src", "work"]
    assert sorted(p.name for p in src.iterdir()) == sorted(
        ["good.dcm", "notes.txt", "empty", "truncated.dcm", "broken.zip", "link.dcm", "bomb.zip"])
    # the bytes of each object refused once read are kept in the private zone to look at
    folder = work / "s1" / "quarantine" / batch.batch_id
    ids = {r["key"]: r["object_id"] for r in result.index.to_pylist()}
    for key in ("notes.txt", "truncated.dcm", "empty"):
        assert (folder / ids[key]).read_bytes() == (src / key).read_bytes()


def test_vanished_file_is_quarantined(tmp_path):
    src, work = tmp_path / "src", str(tmp_path / "work")
    src.mkdir()
    identified_ct(src / "a.dcm", sop="1.2.7.1")
    identified_ct(src / "b.dcm", sop="1.2.7.2")
    [batch] = discovery.discover_batches(site("flat", src), work, set())
    (src / "b.dcm").unlink()
    rows = take_batch(site("flat", src), batch, work).index.to_pylist()
    assert [(r["key"], r["reason"]) for r in rows] == [
        ("a.dcm", None), ("b.dcm", "file vanished during ingest")]


def test_detect_source_kind(tmp_path):
    zip_site(tmp_path / "zips")
    (tmp_path / "tree" / "p").mkdir(parents=True)
    assert discovery.detect_source_kind(str(tmp_path / "zips")) == "zip_batches"
    assert discovery.detect_source_kind(str(tmp_path / "tree")) == "folder"


def test_dicomdir_is_recognised_and_never_passed_on(tmp_path):
    from pydicom.fileset import FileSet

    identified_ct(tmp_path / "a.dcm", sop="1.2.4.1")
    ds = pydicom.dcmread(tmp_path / "a.dcm")
    ds.SeriesNumber, ds.StudyTime = 1, "101500"
    ds.save_as(tmp_path / "a.dcm")
    media = tmp_path / "media"
    fileset = FileSet()
    fileset.add(str(tmp_path / "a.dcm"))
    fileset.write(media)
    [batch] = discovery.discover_batches(site("folder", media), str(tmp_path / "work"), set())
    rows = take_batch(site("folder", media), batch, str(tmp_path / "work")).index.to_pylist()
    reasons = {r["key"].rsplit("/", 1)[-1]: r["reason"] for r in rows}
    assert reasons.pop("DICOMDIR") == "DICOMDIR index file (not an image)"
    assert list(reasons.values()) == [None]  # the image it indexes is ingested as usual


def test_folders_outside_the_batch_scheme_get_opaque_batch_ids(tmp_path):
    src = tmp_path / "src"
    (src / "SMITH_JOHN").mkdir(parents=True)
    identified_ct(src / "SMITH_JOHN" / "a.dcm", sop="1.2.8.1")
    [batch] = discovery.discover_batches(site("zip_batches", src), str(tmp_path / "work"), set())
    assert batch.batch_id.startswith("batch-") and "SMITH" not in batch.batch_id


def test_loose_files_beside_batch_folders_are_not_lost(tmp_path):
    src = tmp_path / "src"
    zip_site(src)
    (src / "export-notes.txt").write_text("sent by PACS admin")
    batches = discovery.discover_batches(site("zip_batches", src), str(tmp_path / "work"), set())
    loose = [b for b in batches if b.batch_id.startswith("loose-")]
    assert len(loose) == 1 and [o.key for o in loose[0].objects] == ["export-notes.txt"]
    rows = take_batch(site("zip_batches", src), loose[0], str(tmp_path / "work")).index.to_pylist()
    assert [(r["key"], r["reason"]) for r in rows] == [("export-notes.txt", "not DICOM")]


def test_folder_discovery_counts_what_it_skips(tmp_path):
    src, work = tmp_path / "src", str(tmp_path / "work")
    src.mkdir()
    identified_ct(src / "a.dcm", sop="1.2.5.1")
    cfg = site("folder", src)
    [first] = discovery.discover_batches(cfg, work, set())
    ledger.record_ingested(first, take_batch(cfg, first, work).index, work)
    identified_ct(src / "b.dcm", sop="1.2.5.2")
    [second] = discovery.discover_batches(cfg, work, {first.batch_id})
    assert second.already_ingested == 1 and len(second.objects) == 1
    ledger.save_pending(second, work)
    assert ledger.load_pending(work, "s1", second.batch_id) == second


def test_objects_refused_later_join_the_quarantine(tmp_path):
    src, work = tmp_path / "src", str(tmp_path / "work")
    src.mkdir()
    identified_ct(src / "a.dcm", sop="1.2.9.1")
    ds = pydicom.dcmread(src / "a.dcm")
    del ds.PatientID
    ds.save_as(src / "a.dcm")
    (src / "b.txt").write_text("not an image")
    [batch] = discovery.discover_batches(site("flat", src), work, set())
    done = take_batch(site("flat", src), batch, work)
    folder = tmp_path / "work" / "s1" / "quarantine" / batch.batch_id
    rows = pq.read_table(folder / "quarantine.parquet").to_pylist()
    assert [(r["key"], r["stage"], r["reason"]) for r in rows] == [
        ("a.dcm", "deidentify", "no Patient ID"), ("b.txt", "ingest", "not DICOM")]
    ok_id = done.index.to_pylist()[0]["object_id"]
    assert (folder / ok_id).read_bytes() == (src / "a.dcm").read_bytes()


def test_a_rerun_of_a_batch_reads_it_again_alike(tmp_path):
    src, work = tmp_path / "src", str(tmp_path / "work")
    zip_site(src)
    config = site("zip_batches", src)
    batch = discovery.discover_batches(config, work, set())[0]
    clean = take_batch(config, batch, work)
    again = take_batch(config, batch, work)
    assert again.index.equals(clean.index) and again.deidentified.equals(clean.deidentified)
    assert not (tmp_path / "work" / "s1" / "staging" / batch.batch_id / "source").exists()
