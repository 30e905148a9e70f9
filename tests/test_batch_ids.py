"""Batch ids from source folder names: only the documented shape that names no identifier met
anywhere at the site is published as it is; the decision is kept, so ids never drift."""

from __future__ import annotations

import hashlib
import json
import zipfile
from pathlib import Path

from schemas.config import SiteConfig
from tasks import discovery
from tasks.ledger import BatchRef
from tests.passes import take_batch
from tests.test_deidentify import identified_ct


def _zip_batch(src: Path, folder: str, name: str, sop: str) -> None:
    (src / folder).mkdir(parents=True)
    dcm = src / f"{sop}.dcm"
    identified_ct(dcm, sop=sop, study=sop + ".0", name=name, mrn="MRN" + sop.replace(".", ""))
    with zipfile.ZipFile(src / folder / "exam.zip", "w") as zf:
        zf.write(dcm, "IM0001.dcm")
    dcm.unlink()


def _site(src: Path) -> SiteConfig:
    return SiteConfig(site_id="s1", source={"kind": "zip_batches", "path": str(src)})


def _deidentify(batch: BatchRef, work: Path) -> None:
    """Take a batch through the one pass, which leaves its identifier list in the private
    zone."""
    take_batch(_site(Path(batch.root)), batch, str(work))


def _ingested(src: Path, work: Path, folder: str, name: str, sop: str,
              batch_id: str) -> BatchRef:
    """A site's only batch, discovered under its readable id, de-identified and recorded."""
    _zip_batch(src, folder, name, sop)
    [batch] = discovery.discover_batches(_site(src), str(work), set())
    assert batch.batch_id == batch_id
    _deidentify(batch, work)
    discovery.mark_batch_published(str(work), "s1", batch.batch_id)
    return batch


def test_readable_ids_need_the_documented_shape():
    assert discovery.readable_batch_id("CXR-UPDATE-20200523") == "CXR-UPDATE-20200523"
    assert discovery.readable_batch_id("CT-20200519") == "CT-20200519"
    for name in ("SMITH", "SMITH-20200523", "CXR-UPDATE", "CXR-UPDATE-20201341",
                 "CXR-1234567-20200523", "cxr-update-20200523", "CXR_UPDATE_20200523",
                 "CXR-UPDATE-20200523-2", "DOE^JANE-20200523", "CXR-UPDATE-202005231"):
        assert discovery.readable_batch_id(name) is None, name


def test_a_folder_named_for_a_patient_met_in_another_batch_gets_an_opaque_id(tmp_path):
    src, work = tmp_path / "src", tmp_path / "work"
    # a real surname that is also a batch-vocabulary word, so only the site-wide gate stops it
    first = _ingested(src, work, "CT-UPDATE-20200519-COMPLETE", "FULL^MARY", "1.2.91.1",
                      "CT-UPDATE-20200519")

    _zip_batch(src, "FULL-UPDATE-20200601-COMPLETE", "ROE^ANN", "1.2.91.2")
    _zip_batch(src, "FULL-COMPLETE", "ROE^ANN", "1.2.91.3")
    _zip_batch(src, "CXR-UPDATE-20200602-COMPLETE", "ROE^ANN", "1.2.91.4")
    published = {first.batch_id}
    ids = {b.objects[0].key.split("/")[0]: b.batch_id
           for b in discovery.discover_batches(_site(src), str(work), published)}
    assert ids["CXR-UPDATE-20200602-COMPLETE"] == "CXR-UPDATE-20200602"
    for folder in ("FULL-UPDATE-20200601-COMPLETE", "FULL-COMPLETE"):
        assert ids[folder].startswith("batch-") and "FULL" not in ids[folder].upper()
        # keyed by a per-site salt: not the plain hash anyone could compute from a guess
        assert ids[folder] != "batch-" + hashlib.sha256(folder.encode()).hexdigest()[:12]
    # the same folders get the same ids on every run, and from find_batch's unfiltered view
    again = {b.objects[0].key.split("/")[0]: b.batch_id
             for b in discovery.discover_batches(_site(src), str(work), set())}
    assert {k: again[k] for k in ids} == ids and again["CT-UPDATE-20200519-COMPLETE"] == (
        "CT-UPDATE-20200519")
    record = json.loads((work / "s1" / "batch_ids.json").read_text())
    assert record["folders"]["CT-UPDATE-20200519-COMPLETE"] == {
        "batch_id": "CT-UPDATE-20200519", "published": True}


def test_a_patient_met_later_never_renames_a_published_batch(tmp_path):
    src, work = tmp_path / "src", tmp_path / "work"
    first = _ingested(src, work, "CXR-UPDATE-20200523-COMPLETE", "ROE^ANN", "1.2.92.1",
                      "CXR-UPDATE-20200523")
    _zip_batch(src, "CT-UPDATE-20200530-COMPLETE", "UPDATE^CXR", "1.2.92.2")
    [pending] = discovery.discover_batches(_site(src), str(work), {first.batch_id})
    assert pending.batch_id == "CT-UPDATE-20200530"  # its patient is not met yet
    _deidentify(pending, work)  # now UPDATE and CXR are identifiers met at the site
    ids = sorted(b.batch_id for b in discovery.discover_batches(_site(src), str(work), set()))
    assert ids == ["CT-UPDATE-20200530", "CXR-UPDATE-20200523"]  # decisions are kept
    # the gate found the unpublished one's id among the identifiers: it is withdrawn, the
    # published one is not renamed behind the release's back
    assert not discovery.withdraw_batch_id(str(work), "s1", "CXR-UPDATE-20200523")
    assert discovery.withdraw_batch_id(str(work), "s1", "CT-UPDATE-20200530")
    assert not discovery.withdraw_batch_id(str(work), "s1", "CT-UPDATE-20200530")
    ids = sorted(b.batch_id for b in discovery.discover_batches(_site(src), str(work), set()))
    assert ids[0] == "CXR-UPDATE-20200523" and ids[1].startswith("batch-")


def test_loose_files_get_a_salted_id(tmp_path):
    src, work = tmp_path / "src", tmp_path / "work"
    src.mkdir()
    (src / "SMITH_JOHN.dcm").write_bytes(b"not really")
    [loose] = discovery.discover_batches(_site(src), str(work), set())
    plain = hashlib.sha256(b"SMITH_JOHN.dcm\t10\n").hexdigest()[:12]
    assert loose.batch_id.startswith("loose-") and loose.batch_id != f"loose-{plain}"
    assert [b.batch_id for b in discovery.discover_batches(_site(src), str(work), set())] == [
        loose.batch_id]


def test_the_gate_on_one_batch_knows_identifiers_met_in_another(tmp_path):
    import pyarrow as pa
    import pytest

    from flows.site_batch import verify_step
    from tasks.catalog import CatalogBatch
    from tasks.verify import LeakFound

    src, work = tmp_path / "src", tmp_path / "work"
    _zip_batch(src, "CT-UPDATE-20200519-COMPLETE", "WHITAKER^MARY", "1.2.93.1")
    [first] = discovery.discover_batches(_site(src), str(work), set())
    _deidentify(first, work)
    clean = CatalogBatch({"studies": pa.table({"description": ["CT CHEST"]})}, [], {})
    leaking = CatalogBatch({"studies": pa.table({"description": ["CT CHEST whitaker"]})}, [],
                           {})
    run = pa.table({"run_id": ["r1"]})
    # another batch of the site: its own identifier list does not hold the name
    assert verify_step.fn(str(work), "s1", clean, run, {}, "CXR-UPDATE-20200601") == 0
    with pytest.raises(LeakFound) as caught:
        verify_step.fn(str(work), "s1", leaking, run, {}, "CXR-UPDATE-20200601")
    assert "whitaker" not in str(caught.value).lower()
