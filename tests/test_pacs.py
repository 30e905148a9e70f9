"""PACS sources against a real Orthanc on 127.0.0.1: C-FIND/C-MOVE and QIDO-RS/WADO-RS give
the same source index as ingesting the files directly, incomplete studies are retried and
recorded, an interrupted ingest resumes, and the nightly flow over a PACS is incremental."""

from __future__ import annotations

import io
import logging
from datetime import date
from pathlib import Path

import pyarrow as pa
import pydicom
import pytest
from pydicom.uid import generate_uid

from infra.orthanc import LOOPBACK, free_port, listening_addresses
from schemas.config import SiteConfig
from tasks import discovery, ledger
from tasks.pacs import PacsUnavailable, RetrieveFailed
from tasks.pacs.dicomweb import write_parts
from tasks.pacs.study import (
    COMPLETE_MARKER,
    PacsStudy,
    QueryPlan,
    query_plan,
    retrieve_study,
    with_retries,
)
from tests.conftest import PACS_PASSWORD, PACS_SITE
from tests.passes import take_batch

HEADER = ("patient_id", "study_uid", "series_uid", "sop_uid", "sop_class_uid", "modality",
          "study_date")
CORPUS_WINDOW = {"since": "2019-01-01", "until": "2020-12-31"}
PASSWORD_ENV = "RADREPO_TEST_PACS_PASSWORD"
UNKNOWN_SOP_CLASS = "1.2.826.0.1.3680043.10.1204.99"


def dimse_source(pacs_fixture, **changes) -> dict:
    return {"kind": "dimse", "host": "127.0.0.1", "port": pacs_fixture.server.dicom_port,
            "called_ae": pacs_fixture.server.aet, "calling_ae": "RADREPO",
            "storage_port": pacs_fixture.storage_port, "retries": 1,
            "backoff_seconds": 0.05, "timeout_seconds": 30, **changes}


def dicomweb_source(pacs_fixture, **changes) -> dict:
    return {"kind": "dicomweb", "url": pacs_fixture.server.dicomweb, "username": "radrepo",
            "password_env": PASSWORD_ENV, "retries": 1, "backoff_seconds": 0.05, **changes}


def site(source: dict) -> SiteConfig:
    return SiteConfig(site_id="pacs", source=source)


def ingest_all(config: SiteConfig, work: Path) -> pa.Table:
    batches = discovery.discover_batches(config, str(work), set())
    assert len(batches) == 1 and batches[0].pacs == (config.source.kind in ("dimse",
                                                                             "dicomweb"))
    return take_batch(config, batches[0], str(work)).index


def dataset_bytes(path: str) -> bytes:
    """A DICOM file's bytes after its file meta group (which a network transfer rebuilds)."""
    data = Path(path).read_bytes()
    assert data[128:132] == b"DICM"
    return data[144 + int.from_bytes(data[140:144], "little"):]


def in_window(row: dict) -> bool:
    return "20190101" <= (row["study_date"] or "") <= "20201231"


@pytest.fixture(autouse=True)
def pacs_password(monkeypatch):
    monkeypatch.setenv(PASSWORD_ENV, PACS_PASSWORD)


@pytest.fixture(scope="module")
def direct(pacs, tmp_path_factory) -> dict[str, dict]:
    """The folder source's index rows for the objects Orthanc stored, by SOP Instance UID."""
    config = site({"kind": "folder", "path": str(pacs.source)})
    index = ingest_all(config, tmp_path_factory.mktemp("direct"))
    return {r["sop_uid"]: r for r in index.to_pylist()
            if r["status"] == "ok" and pacs.uploaded[r["key"]] == "Success"}


def test_orthanc_listens_on_loopback_only(pacs):
    addresses = listening_addresses(pacs.server.pid)
    assert len(addresses) >= 2  # its HTTP and DICOM ports
    assert all(a.split(":")[0] in LOOPBACK for a in addresses)


def test_dimse_by_date_window_indexes_like_the_files(pacs, direct, tmp_path):
    index = ingest_all(site(dimse_source(pacs, query=CORPUS_WINDOW)), tmp_path)
    rows = index.to_pylist()
    expected = {sop: r for sop, r in direct.items() if in_window(r)}
    assert len(expected) >= 20 and all(r["status"] == "ok" for r in rows)
    assert sorted(tuple(r[k] for k in HEADER) for r in rows) == sorted(
        tuple(r[k] for k in HEADER) for r in expected.values())
    for r in rows:
        # the PACS sent each object as stored: only the file meta is rebuilt by the transfer
        assert dataset_bytes(r["staged_path"]) == dataset_bytes(expected[r["sop_uid"]]
                                                                ["staged_path"])
        assert r["key"] == f"{r['study_uid']}/{r['sop_uid']}"
        assert Path(r["staged_path"]).is_relative_to(tmp_path / "pacs" / "received")


def test_dimse_by_accession_list(pacs, direct, tmp_path):
    by_study = {}
    for r in direct.values():
        accession = pydicom.dcmread(r["staged_path"], stop_before_pixels=True).AccessionNumber
        by_study.setdefault(r["study_uid"], (accession, set()))[1].add(r["sop_uid"])
    chosen = sorted(by_study)[:2]
    accessions = tmp_path / "accessions.txt"
    accessions.write_text("# wanted for the audit\n" + "".join(
        f"{by_study[s][0]}\n\n" for s in chosen))
    index = ingest_all(site(dimse_source(pacs, query={"accession_list": str(accessions)})),
                       tmp_path / "work")
    assert {r["study_uid"] for r in index.to_pylist()} == set(chosen)
    assert {r["sop_uid"] for r in index.to_pylist()} == by_study[chosen[0]][1] | by_study[
        chosen[1]][1]


@pytest.mark.parametrize("kind", ["dimse", "dicomweb"])
def test_accession_numbers_no_study_answers_are_reported_by_line(pacs, direct, tmp_path,
                                                                   kind):
    accession = pydicom.dcmread(next(iter(direct.values()))["staged_path"],
                                stop_before_pixels=True).AccessionNumber
    missing = ("ACC-NOSUCH-1", "ACC-NOSUCH-2")
    accessions = tmp_path / "accessions.txt"
    accessions.write_text(f"# audit list\n{accession}\n{missing[0]}  # ward 5\n\n"
                          f"{missing[1]}\n{accession}\n")
    make = dimse_source if kind == "dimse" else dicomweb_source
    config = site(make(pacs, query={"accession_list": str(accessions)}))
    notes: list[str] = []
    [batch] = discovery.discover_batches(config, str(tmp_path), set(), notify=notes.append)
    assert len(batch.objects) == 1
    assert notes == ["2 of 3 accession numbers matched no study (accession list lines 3, 5)"]
    accessions.write_text(f"{accession}\n")
    notes.clear()
    discovery.discover_batches(config, str(tmp_path), set(), notify=notes.append)
    assert notes == []


def test_dicomweb_indexes_like_the_files_byte_for_byte(pacs, direct, tmp_path):
    index = ingest_all(site(dicomweb_source(pacs, query=CORPUS_WINDOW)), tmp_path)
    rows = index.to_pylist()
    expected = {sop: r for sop, r in direct.items() if in_window(r)}
    assert sorted(tuple(r[k] for k in HEADER) for r in rows) == sorted(
        tuple(r[k] for k in HEADER) for r in expected.values())
    for r in rows:  # WADO-RS with transfer-syntax=* returns the stored file unchanged
        assert (r["sha256"], r["size"]) == (expected[r["sop_uid"]]["sha256"],
                                            expected[r["sop_uid"]]["size"])


@pytest.mark.parametrize("kind", ["dimse", "dicomweb"])
def test_a_pacs_that_reports_no_study_count_is_counted_by_series(pacs, direct, tmp_path,
                                                                 monkeypatch, kind):
    from dataclasses import replace

    from tasks.pacs import merged, open_client
    from tasks.pacs.dicomweb import DicomWebClient
    from tasks.pacs.dimse import DimseClient

    config = site((dimse_source if kind == "dimse" else dicomweb_source)(
        pacs, query=CORPUS_WINDOW))
    with open_client(config.source) as client:
        reported = merged(client.find_studies(query_plan(config.source.query).matches))
        assert len(reported) >= 3
        for study in reported:  # counted series by series, the PACS agrees with itself
            assert client.count_instances(study.study_uid) == study.instances
        if kind == "dimse":  # a PACS that counts neither studies nor series: image level
            from tasks.pacs import dimse
            real_find = dimse._find

            def find_without_series_counts(assoc, level, keys):
                answers = real_find(assoc, level, keys)
                for answer in answers:
                    if level == "SERIES" and "NumberOfSeriesRelatedInstances" in answer:
                        del answer.NumberOfSeriesRelatedInstances
                return answers

            monkeypatch.setattr(dimse, "_find", find_without_series_counts)
            for study in reported:
                assert client.count_instances(study.study_uid) == study.instances
        assert client.count_instances(generate_uid()) == 0

    # the PACS answers study searches without NumberOfStudyRelatedInstances
    cls = DimseClient if kind == "dimse" else DicomWebClient
    real_find_studies = cls.find_studies
    monkeypatch.setattr(cls, "find_studies", lambda self, matches: [
        [replace(s, instances=None) for s in answer]
        for answer in real_find_studies(self, matches)])
    [batch] = discovery.discover_batches(config, str(tmp_path), set())
    assert sorted((o.key, o.size) for o in batch.objects) == sorted(
        (s.study_uid, s.instances) for s in reported)
    index = take_batch(config, batch, str(tmp_path)).index
    assert sorted(r["sop_uid"] for r in index.to_pylist() if r["status"] == "ok") == sorted(
        sop for sop, r in direct.items() if in_window(r))


def test_modality_query_takes_only_studies_with_that_modality(pacs, direct, tmp_path):
    config = site(dicomweb_source(pacs, query={**CORPUS_WINDOW, "modalities": ["CR", "DX"]}))
    [batch] = discovery.discover_batches(config, str(tmp_path), set())
    studies = {r["study_uid"] for r in direct.values()
               if in_window(r) and r["modality"] in ("CR", "DX")}
    assert {o.key for o in batch.objects} == studies
    assert sum(o.size for o in batch.objects) == sum(
        1 for r in direct.values() if r["study_uid"] in studies)


def add_study(pacs, template: str, study_date: str, accession: str, count: int,
              scratch: Path, odd_class: bool = False) -> list[str]:
    """Store a new study of ``count`` objects in the PACS; with ``odd_class`` its last object
    has a SOP class no storage SCP accepts. Returns the SOP Instance UIDs."""
    ds = pydicom.dcmread(template)
    ds.StudyInstanceUID = generate_uid(entropy_srcs=[accession, "study"])
    ds.SeriesInstanceUID = generate_uid(entropy_srcs=[accession, "series"])
    ds.StudyDate = study_date
    ds.AccessionNumber = accession
    paths = []
    for n in range(count):
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid(
            entropy_srcs=[accession, str(n)])
        if odd_class and n == count - 1:
            ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = UNKNOWN_SOP_CLASS
        paths.append(scratch / f"{accession}-{n}.dcm")
        ds.save_as(paths[-1], enforce_file_format=True)
    assert set(pacs.server.upload(paths).values()) == {"Success"}
    return [generate_uid(entropy_srcs=[accession, str(n)]) for n in range(count)]


def accession_site(source: dict, folder: Path, accession: str) -> SiteConfig:
    listing = folder / f"{accession}.txt"
    listing.write_text(f"{accession}\n")
    return site({**source, "query": {"accession_list": str(listing)}})


def cr_template(direct: dict) -> str:
    return next(r["staged_path"] for r in direct.values() if r["modality"] == "CR")


@pytest.mark.parametrize("kind", ["dimse", "dicomweb"])
def test_study_changed_after_the_query_is_retried_then_quarantined(pacs, direct, tmp_path,
                                                                   kind):
    accession = f"RRGONE-{kind}"
    sops = add_study(pacs, cr_template(direct), "19990101", accession, 3, tmp_path)
    source = (dimse_source if kind == "dimse" else dicomweb_source)(pacs, retries=2)
    config = accession_site(source, tmp_path, accession)
    [batch] = discovery.discover_batches(config, str(tmp_path / "work"), set())
    assert [o.size for o in batch.objects] == [3]  # what the query reported
    pacs.server.delete_instance(sops[0])  # ...and then one object is gone from the PACS
    result = take_batch(config, batch, str(tmp_path / "work"))
    [row] = result.index.to_pylist()
    assert (row["status"], row["key"]) == ("quarantined", batch.objects[0].key)
    assert row["reason"] == "study incomplete: received 2 of 3 instances (after 3 attempts)"
    assert result.quarantine.column("reason").to_pylist() == [row["reason"]]
    received = tmp_path / "work" / "pacs" / "received"
    assert not any(received.rglob("*.dcm"))  # a partial copy is not kept as if it were whole
    # the next run asks again and takes the study as it now is
    [again] = discovery.discover_batches(config, str(tmp_path / "work"), set())
    index = take_batch(config, again, str(tmp_path / "work")).index
    assert sorted(index.column("sop_uid").to_pylist()) == sorted(sops[1:])


def test_refused_move_is_recorded_and_dicomweb_takes_the_study(pacs, direct, tmp_path):
    """A study with an object of a SOP class our storage SCP does not accept: the PACS
    fails the C-MOVE; DICOMweb, which negotiates nothing, retrieves it whole."""
    add_study(pacs, cr_template(direct), "19990101", "RRODD01", 3, tmp_path, odd_class=True)
    config = accession_site(dimse_source(pacs), tmp_path, "RRODD01")
    [batch] = discovery.discover_batches(config, str(tmp_path / "dimse"), set())
    [row] = take_batch(config, batch, str(tmp_path / "dimse")).index.to_pylist()
    assert row["status"] == "quarantined"
    assert row["reason"].startswith("study incomplete: received 0 of 3 instances; "
                                    "C-MOVE ended with status 0x")
    assert row["reason"].endswith("(after 2 attempts)")
    # the batch is published without the study; the next run asks for it again
    ledger.record_ingested(batch, take_batch(config, batch, str(
        tmp_path / "dimse")).index, str(tmp_path / "dimse"))
    [retry] = discovery.discover_batches(config, str(tmp_path / "dimse"), {batch.batch_id})
    assert retry.batch_id == f"{batch.batch_id}-2" and retry.objects == batch.objects
    web = accession_site(dicomweb_source(pacs), tmp_path, "RRODD01")
    index = ingest_all(web, tmp_path / "web")
    assert index.column("status").to_pylist() == ["ok"] * 3
    assert UNKNOWN_SOP_CLASS in index.column("sop_class_uid").to_pylist()


@pytest.mark.parametrize("kind", ["dimse", "dicomweb"])
def test_debug_logging_quotes_no_identifier(pacs, direct, tmp_path, caplog, kind):
    caplog.set_level(logging.DEBUG)  # as an operator chasing a problem would set it
    study = sorted({r["study_uid"] for r in direct.values() if r["modality"] == "CT"})[0]
    accession = pydicom.dcmread(next(r["staged_path"] for r in direct.values()
                                     if r["study_uid"] == study)).AccessionNumber
    source = (dimse_source if kind == "dimse" else dicomweb_source)(pacs)
    index = ingest_all(accession_site(source, tmp_path, accession), tmp_path / "work")
    assert index.num_rows > 1
    # the network libraries, whose debug lines print whole queries, stay at WARNING
    for name in ("pynetdicom", "httpx", "httpcore"):
        assert logging.getLogger(name).getEffectiveLevel() >= logging.WARNING, name
    for value in [accession, study, *index.column("sop_uid").to_pylist()]:
        assert value not in caplog.text


def test_a_study_with_a_malformed_uid_is_quarantined_never_asked_for(pacs, direct, tmp_path):
    from tasks.pacs import MALFORMED_UID

    weird, fine = "1.2.3/../../etc", "1.2.826.0.1.3680043.10.1204.7"
    ds = pydicom.dcmread(cr_template(direct))
    ds.StudyDate = "19980607"
    paths, sops = [], []
    for n, study in enumerate((weird, fine)):
        ds.StudyInstanceUID, ds.SeriesInstanceUID = study, generate_uid()
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        paths.append(tmp_path / f"{n}.dcm")
        sops.append(ds.SOPInstanceUID)
        ds.save_as(paths[-1], enforce_file_format=True)
    assert set(pacs.server.upload(paths).values()) == {"Success"}  # the PACS took it as is
    try:
        for kind, make in (("dimse", dimse_source), ("dicomweb", dicomweb_source)):
            work = tmp_path / kind
            config = site(make(pacs, query={"since": "1998-06-07", "until": "1998-06-07"}))
            [batch] = discovery.discover_batches(config, str(work), set())
            assert sorted(o.key for o in batch.objects) == sorted([weird, fine])
            rows = take_batch(config, batch, str(work)).index.to_pylist()
            assert [(r["key"], r["reason"]) for r in rows if r["status"] == "quarantined"] == [
                (weird, MALFORMED_UID)]
            assert [r["study_uid"] for r in rows if r["status"] == "ok"] == [fine]
            assert not (tmp_path / "etc").exists()
            assert all(".." not in p.name for p in work.rglob("*"))
    finally:
        for sop in sops:
            pacs.server.delete_instance(sop)


def test_unreachable_pacs_is_retried_then_reported(tmp_path):
    port = free_port()  # nothing listens there
    sources = {
        "dimse": {"kind": "dimse", "host": "127.0.0.1", "port": port, "called_ae": "NOWHERE",
                  "storage_port": free_port(), "retries": 2, "backoff_seconds": 0.01,
                  "timeout_seconds": 5},
        "dicomweb": {"kind": "dicomweb", "url": f"http://127.0.0.1:{port}/dicom-web",
                     "retries": 2, "backoff_seconds": 0.01},
    }
    messages = {}
    for kind, source in sources.items():
        with pytest.raises(PacsUnavailable) as err:
            discovery.discover_batches(site(source), str(tmp_path), set())
        messages[kind] = str(err.value)
    assert messages["dimse"] == (f"association with NOWHERE at 127.0.0.1:{port} failed "
                                 "(refused, aborted or timed out) (after 3 attempts)")
    assert messages["dicomweb"] == (f"QIDO-RS at http://127.0.0.1:{port}: ConnectError "
                                    "(after 3 attempts)")


def test_wrong_dicomweb_password_or_url_is_reported(pacs, tmp_path, monkeypatch):
    monkeypatch.setenv(PASSWORD_ENV, "wrong")
    with pytest.raises(PacsUnavailable, match=r"^QIDO-RS at \S+ answered HTTP 401"):
        discovery.discover_batches(site(dicomweb_source(pacs, retries=0)), str(tmp_path), set())
    monkeypatch.setenv(PASSWORD_ENV, PACS_PASSWORD)
    native_api = dicomweb_source(pacs, url=pacs.server.url, retries=0)  # not the DICOMweb root
    with pytest.raises(PacsUnavailable, match=r"^QIDO-RS at \S+ answered HTTP 400"):
        discovery.discover_batches(site(native_api), str(tmp_path), set())
    monkeypatch.delenv(PASSWORD_ENV)
    with pytest.raises(PacsUnavailable, match=f"{PASSWORD_ENV} is not set"):
        discovery.discover_batches(site(dicomweb_source(pacs)), str(tmp_path), set())


def test_a_web_page_instead_of_dicom_json_is_reported(tmp_path):
    from functools import partial
    from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
    from threading import Thread

    (tmp_path / "studies").write_text("<html>Please log in</html>")  # a portal, not QIDO-RS
    handler = partial(SimpleHTTPRequestHandler, directory=str(tmp_path))
    with ThreadingHTTPServer(("127.0.0.1", 0), handler) as server:
        Thread(target=server.serve_forever, daemon=True).start()
        source = {"kind": "dicomweb", "url": f"http://127.0.0.1:{server.server_port}",
                  "retries": 0}
        with pytest.raises(PacsUnavailable, match="not a DICOM JSON list"):
            discovery.discover_batches(site(source), str(tmp_path / "work"), set())
        server.shutdown()


def test_interrupted_ingest_resumes_without_asking_again(pacs, tmp_path):
    config = site(dimse_source(pacs, query=CORPUS_WINDOW))
    work = str(tmp_path)
    [batch] = discovery.discover_batches(config, work, set())
    first = take_batch(config, batch, work).index
    received = tmp_path / "pacs" / "received"
    folders = sorted(received.iterdir())
    assert len(folders) == len(batch.objects) >= 3
    # as a run killed while receiving the last study leaves it: no marker, half the files
    broken = folders[-1]
    (broken / COMPLETE_MARKER).unlink()
    for extra in sorted(broken.glob("*.dcm"))[1:]:
        extra.unlink()
    before = {p: p.stat().st_mtime_ns for f in folders[:-1] for p in f.glob("*.dcm")}
    again = take_batch(config, batch, work).index
    assert again.drop(["staged_path"]).equals(first.drop(["staged_path"]))
    assert {p: p.stat().st_mtime_ns for p in before} == before  # whole studies not fetched again
    assert (broken / COMPLETE_MARKER).exists()


def test_query_plan_crosses_accessions_and_modalities(tmp_path):
    from schemas.config import StudyQuery

    accessions = tmp_path / "a.txt"
    accessions.write_text("A2\nA1  # first\n\nA2\n")
    plan = query_plan(StudyQuery(since=date(2020, 3, 1), modalities=("CT", "CR"),
                                 accession_list=str(accessions)))
    assert plan.matches == [
        {"StudyDate": "20200301-", "AccessionNumber": "A1", "ModalitiesInStudy": "CT"},
        {"StudyDate": "20200301-", "AccessionNumber": "A1", "ModalitiesInStudy": "CR"},
        {"StudyDate": "20200301-", "AccessionNumber": "A2", "ModalitiesInStudy": "CT"},
        {"StudyDate": "20200301-", "AccessionNumber": "A2", "ModalitiesInStudy": "CR"},
    ]
    assert plan.accession_lines == {"A2": 1, "A1": 2}
    assert query_plan(StudyQuery(), (None, date(2020, 5, 1))).matches == [
        {"StudyDate": "-20200501"}]
    assert query_plan(StudyQuery()) == QueryPlan([{}], {})


def test_retries_back_off_exponentially_then_give_up():
    from schemas.config import PacsSourceConfig

    waits, calls = [], []

    def flaky():
        calls.append(1)
        raise RetrieveFailed("C-MOVE ended with status 0xA701")

    source = PacsSourceConfig(retries=3, backoff_seconds=0.5)
    with pytest.raises(RetrieveFailed, match=r"^C-MOVE ended with status 0xA701 \(after 4"):
        with_retries(flaky, source, RetrieveFailed, sleep=waits.append)
    assert len(calls) == 4 and waits == [0.5, 1.0, 2.0]
    outcomes = iter([RetrieveFailed("x"), "whole"])

    def second_time_lucky():
        outcome = next(outcomes)
        if isinstance(outcome, Exception):
            raise outcome
        return outcome

    assert with_retries(second_time_lucky, source, RetrieveFailed, sleep=waits.append) == "whole"


def test_a_study_without_a_reported_count_is_not_taken_on_trust(tmp_path):
    from schemas.config import PacsSourceConfig

    with pytest.raises(RetrieveFailed, match="reported no instance count for the study"):
        retrieve_study(None, PacsStudy("1.2.3", None), tmp_path / "s", PacsSourceConfig())
    assert not (tmp_path / "s").exists()


def test_a_study_that_cannot_be_counted_stays_without_a_count():
    from schemas.config import PacsSourceConfig
    from tasks.pacs import with_counts

    class CountingPacs:  # how a PACS answers the series-by-series count, study by study
        answers = {"1.1": 4, "1.2": 0, "1.3": None, "1.4": PacsUnavailable("C-FIND 0xC000")}

        def count_instances(self, uid):
            answer = self.answers[uid]
            if isinstance(answer, Exception):
                raise answer
            return answer

    studies = [PacsStudy(uid, None) for uid in ("1.1", "1.2", "1.3", "1.4")]
    studies += [PacsStudy("1.5", 7), PacsStudy("1/../5", None)]
    counted = with_counts(CountingPacs(), studies, PacsSourceConfig(retries=0))
    # a listed study counting to nothing, or not countable, is not dropped: its retrieve is
    # refused with a reason; one study's failure does not stop the others
    assert [(s.study_uid, s.instances) for s in counted] == [
        ("1.1", 4), ("1.2", None), ("1.3", None), ("1.4", None), ("1.5", 7), ("1/../5", None)]


def test_multipart_parts_survive_any_chunking():
    boundary = b"b0und"
    parts = [b"DICM" + bytes(range(256)) * 3, b"\r\n--b0unx not a boundary", b""]
    body = b"".join(b"--b0und\r\nContent-Type: application/dicom\r\n\r\n" + p + b"\r\n"
                    for p in parts) + b"--b0und--\r\n"
    for size in (1, 2, 7, 64, len(body)):
        chunks = [body[i:i + size] for i in range(0, len(body), size)]
        written: list[io.BytesIO] = []
        assert write_parts(chunks, boundary, lambda out=written: keep_open(out)) == 3
        assert [p.getvalue() for p in written] == parts
    with pytest.raises(RetrieveFailed, match="ended before its closing boundary"):
        write_parts([body[:-20]], boundary, lambda: keep_open([]))


def keep_open(into: list) -> io.BytesIO:
    """A part file whose bytes stay readable after the parser closes it."""
    part = io.BytesIO()
    part.close = lambda: None
    into.append(part)
    return part


class RecordingHandler(logging.Handler):
    """Keeps the records a logger emits, whatever the logging setup's propagation."""

    def __init__(self):
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


def test_nightly_over_a_pacs_takes_only_what_is_new(pacs, direct, corpus, prefect_server,
                                                    dask_scheduler, tmp_path):
    from flows.nightly import backfill, nightly
    from schemas.config import parse_config

    corpus_dir, truth = corpus
    info = truth["sites"][PACS_SITE]

    def config_for(query: dict):
        return parse_config({
            "release": str(tmp_path / "release"), "work_dir": str(tmp_path / "work"),
            "dask": {"scheduler": dask_scheduler},
            "sites": [{"site_id": PACS_SITE, "source": dimse_source(pacs, query=query),
                       "clinical": {"path": str(corpus_dir / info["clinical"])},
                       "id_remap": str(corpus_dir / info["remap"])}],
        }, tmp_path)

    config = config_for({"since": "2019-01-01", "until": "2021-12-31"})
    in_pacs = sum(1 for r in direct.values() if in_window(r))

    [first] = nightly(config)
    assert first["status"] == "published" and first["files_in"] == in_pacs
    assert first["published"] + first["excluded"] + first["quarantined"] == in_pacs
    assert first["published"] > 0 and first["skipped_already_ingested"] == 0

    assert nightly(config) == []  # nothing new in the PACS: nothing asked for, nothing run

    added = add_study(pacs, cr_template(direct), "20210301", "RRNEW01", 2, tmp_path)
    [third] = nightly(config)
    assert third["batch_id"] != first["batch_id"]
    assert third["files_in"] == 2 and third["skipped_already_ingested"] == in_pacs
    assert third["published"] + third["excluded"] + third["quarantined"] == 2

    # an accession list naming a number no study has: one warning, by line, never the number
    listed = tmp_path / "accessions.txt"
    listed.write_text("RRNEW01\nRRMISSING9\n")
    heard = RecordingHandler()
    flow_log = logging.getLogger("prefect.flow_runs")  # where the flow's run logger writes
    flow_log.addHandler(heard)
    try:
        assert nightly(config_for({"accession_list": str(listed)})) == []  # all received
    finally:
        flow_log.removeHandler(heard)
    warnings = [r.getMessage() for r in heard.records if r.levelno == logging.WARNING]
    assert (f"site {PACS_SITE}: 1 of 2 accession numbers matched no study "
            "(accession list lines 2)") in warnings
    assert not any("RRMISSING9" in r.getMessage() for r in heard.records)

    # a backfill asks the PACS again for the window's studies and takes them on purpose
    [again] = backfill(config, since=date(2021, 1, 1), until=date(2021, 12, 31))
    assert again["files_in"] == 2 and again["batch_id"] == third["batch_id"]
    assert again["files_written"] == 0  # the same bytes again: nothing rewritten

    # an object deleted in the PACS: the study is taken again once, as it now is
    pacs.server.delete_instance(added[0])
    [fourth] = nightly(config)
    assert fourth["files_in"] == 1 and fourth["batch_id"] != third["batch_id"]
    assert nightly(config) == []
