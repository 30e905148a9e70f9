"""The one pass: each source object's bytes are read once and each output written once, split
exams are merged before anything is written, and an identifier met in another unit of the
batch still keeps a file out."""

from __future__ import annotations

import sys
from collections import Counter
from pathlib import Path

import pydicom
import pytest
from distributed import Client, WorkerPlugin

from flows.cluster import local_cluster
from flows.one_pass import PassContext, read_batch
from tasks import discovery, indexing, ledger, sources
from tasks.deidentify import DeidContext, PseudonymKeys
from tests.test_deidentify import identified_ct

OPENS: list[tuple[str, str]] = []  # (path, "r" or "w") of every file opened while recording


def _record(event: str, args: tuple) -> None:
    if event != "open" or not OPENS or not isinstance(args[0], str | bytes):
        return
    path, mode, flags = args
    writing = (mode and any(c in mode for c in "wax+")) or (
        mode is None and isinstance(flags, int) and flags & 0o3)
    OPENS.append((str(Path(args[0] if isinstance(path, str) else path.decode()).resolve()),
                  "w" if writing else "r"))


def start_recording() -> None:
    """Record every open of this process from now on (the first entry is a marker)."""
    if not getattr(sys, "_radrepo_open_hook", False):
        sys.addaudithook(_record)
        sys._radrepo_open_hook = True
    OPENS.clear()
    OPENS.append(("", ""))


def recorded() -> list[tuple[str, str]]:
    return OPENS[1:]


class RecordOpens(WorkerPlugin):
    """Installs the open recorder in each worker process of the cluster under test."""

    def setup(self, worker) -> None:
        start_recording()


def _opens_by_path(opens: list[tuple[str, str]], under: Path, mode: str,
                   suffix: str = "") -> Counter:
    """How often each file under ``under`` (ending in ``suffix``) was opened in ``mode``."""
    root = str(under.resolve())
    return Counter(p for p, m in opens
                   if m == mode and p.startswith(root + "/") and p.endswith(suffix))


def test_a_site_batch_reads_each_source_file_once_and_writes_each_output_once(
        make_config, corpus, prefect_server, tmp_path):
    from flows.site_batch import site_batch

    corpus_dir, truth = corpus
    site_id = next(s for s, site in truth["sites"].items() if site["layout"] == "zip_batches")
    source = corpus_dir / truth["sites"][site_id]["source"]
    config = make_config(tmp_path / "release", tmp_path / "work")
    site = config.site(site_id)
    batches = discovery.discover_batches(site, config.work_dir, set())
    batch = next(b for b in batches if len(b.objects) > 3)
    ledger.save_pending(batch, config.work_dir)
    with local_cluster(1) as cluster, Client(cluster) as client:
        client.register_plugin(RecordOpens())
        start_recording()
        summary = site_batch(config, site_id, batch.batch_id, scheduler=cluster.scheduler_address)
        flow_opens = recorded()
        [worker_opens] = client.run(recorded).values()
    opens = flow_opens + worker_opens
    assert summary["status"] == "published" and summary["published"] > 0

    archives = sorted((source / o.key).resolve() for o in batch.objects if not o.problem)
    reads = _opens_by_path(opens, source, "r")
    assert {str(p): reads[str(p)] for p in archives} == {str(p): 1 for p in archives}
    assert set(reads) == {str(p) for p in archives}  # nothing else of the source opened
    assert not _opens_by_path(opens, source, "w")

    staging = Path(config.work_dir) / site_id / "staging"
    written = _opens_by_path(opens, staging, "w", ".dcm")
    assert sum(written.values()) >= summary["published"]
    assert set(written.values()) == {1}, "an output was written twice"
    assert not _opens_by_path(opens, staging, "r", ".dcm"), "an output was read back"


def _zip_of(folder: Path, name: str, files: list[Path]) -> None:
    import zipfile

    with zipfile.ZipFile(folder / name, "w") as archive:
        for f in files:
            archive.write(f, f.name)


def _ct(path: Path, *, model: str | None = None, pixel: int = 0, **kwargs) -> Path:
    """An identified CT file (tests/test_deidentify.py) with its own pixel values, its model
    name set when given: a kept value, where only the file's own identifiers are removed."""
    identified_ct(path, **kwargs)
    ds = pydicom.dcmread(path)
    ds.PixelData = bytes([pixel]) * 32
    if model is not None:
        ds.ManufacturerModelName = model
    ds.save_as(path)
    return path


def _context(tmp_path: Path) -> PassContext:
    return PassContext(DeidContext(PseudonymKeys(b"k" * 32), "s1", (), {}),
                       str(tmp_path / "out"), str(tmp_path / "quarantine"))


def test_split_exam_parts_are_written_once_into_the_first_parts_study(tmp_path):
    import zipfile

    folder = tmp_path / "src" / "B-20200520-COMPLETE"
    folder.mkdir(parents=True)
    parts = {"PID1_20200520-101500_EX42_CT CHEST.zip": "1.2.77.1",
             "PID1_20200520-103000_EX42_CT CHEST.zip": "1.2.77.2"}
    for n, (name, study) in enumerate(parts.items()):
        with zipfile.ZipFile(folder / name, "w") as archive:
            for i in range(2):
                f = _ct(tmp_path / f"{n}-{i}.dcm", sop=f"{study}.5.{i}", study=study,
                        pixel=2 * n + i)
                archive.write(f, f.name)
    site = discovery.SiteConfig(site_id="s1", source={"kind": "zip_batches",
                                                      "path": str(tmp_path / "src")})
    [batch] = discovery.discover_batches(site, str(tmp_path / "work"), set())
    units = indexing.zip_units(str(tmp_path / "src"), [
        sources.UnitObject(o.key, o.size) for o in batch.objects], {})
    assert len(units) == 1  # one exam id: one task decides the merge
    done = read_batch(units, _context(tmp_path))
    rows = done.deidentified.to_pylist()
    assert {r["status"] for r in rows} == {"ok"} and len(rows) == 4
    [merge] = done.merges
    assert merge["files"] == 2 and merge["gap_minutes"] == 15
    assert {r["study_uid"] for r in rows} == {merge["kept_uid"]}
    for r in rows:
        assert pydicom.dcmread(r["output_path"]).StudyInstanceUID == merge["kept_uid"]
        assert len(Path(r["output_path"]).read_bytes()) == r["size_bytes"]


@pytest.mark.parametrize("apart", [True, False], ids=["other unit", "same unit"])
def test_another_patients_name_in_a_kept_value_quarantines_the_file(tmp_path, apart):
    src = tmp_path / "src"
    (src / "one").mkdir(parents=True)
    (src / "two").mkdir()
    first = src / "one" / "a.dcm"
    second = (src / "two" if apart else src / "one") / "b.dcm"
    _ct(first, sop="1.2.77.31", study="1.2.77.3", name="QUIRREL^ODALYS", mrn="PX-3131")
    # another patient's file naming the first patient in a value the profile keeps
    _ct(second, sop="1.2.77.32", study="1.2.77.4", name="OTHER^PERSON", mrn="PX-3232",
        model="Scanner for Odalys Quirrel")
    site = discovery.SiteConfig(site_id="s1", source={"kind": "folder", "path": str(src)})
    [batch] = discovery.discover_batches(site, str(tmp_path / "work"), set())
    units = indexing.folder_units(str(src), [sources.UnitObject(o.key, o.size)
                                             for o in batch.objects], {})
    assert len(units) == (2 if apart else 1)
    done = read_batch(units, _context(tmp_path))
    seq = {r["key"]: r["seq"] for r in done.index.to_pylist()}
    rows = {r["seq"]: r for r in done.deidentified.to_pylist()}
    bad = rows[seq[second.relative_to(src).as_posix()]]
    assert (bad["status"], bad["reason"]) == ("quarantined", "gate: ManufacturerModelName")
    assert not (tmp_path / "out" / f"{bad['object_id']}.dcm").exists()
    assert (tmp_path / "quarantine" / bad["object_id"]).read_bytes() == second.read_bytes()
    assert rows[seq["one/a.dcm"]]["status"] == "ok"
    assert [r["reason"] for r in done.quarantine.to_pylist()] == [bad["reason"]]


def test_files_named_alike_in_two_pacs_studies_stay_apart(tmp_path):
    """A DICOMweb retrieval names each study's files 000000.dcm, 000001.dcm...: the two
    studies' files must get their own object ids, outputs and rows."""
    units = []
    for n, study in enumerate(("1.2.77.61", "1.2.77.62")):
        folder = tmp_path / "received" / f"s{n}"
        folder.mkdir(parents=True)
        _ct(folder / "000000.dcm", sop=f"{study}.1", study=study, mrn=f"PX-61{n}", pixel=n)
        units.append(sources.WorkUnit(str(folder), (sources.UnitObject("000000.dcm"),),
                                      keyed_by_sop=study))
    done = read_batch(units, _context(tmp_path))
    rows = done.deidentified.to_pylist()
    assert [r["status"] for r in rows] == ["ok", "ok"]
    assert len({r["object_id"] for r in rows}) == 2
    assert all(Path(r["output_path"]).exists() for r in rows)
    assert done.index.column("key").to_pylist() == ["1.2.77.61/1.2.77.61.1",
                                                    "1.2.77.62/1.2.77.62.1"]
    assert [r["seq"] for r in rows] == [0, 1]
