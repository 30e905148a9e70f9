"""Every entry of a source gets an outcome: what is not a readable regular file is quarantined
with a reason under an opaque id, and the rest of the batch goes on; discovery never blocks."""

from __future__ import annotations

import os
import random
import socket
import stat
import subprocess
import sys
import threading
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from schemas.config import SiteConfig
from tasks import discovery, ledger
from tasks.failures import SourceUnavailable
from tests.passes import take_batch
from tests.test_deidentify import identified_ct
from tests.test_s3 import s3_endpoint  # noqa: F401, F811 - the moto S3 server fixture

ZIP_FOLDER = "CT-UPDATE-20200519-COMPLETE"


def _dangling(folder: Path, outside: Path) -> str:
    (folder / "gone.dcm").symlink_to(folder / "no-such-file.dcm")
    return "gone.dcm"


def _folder_inside(folder: Path, outside: Path) -> str:
    (folder / "sub").mkdir()
    identified_ct(folder / "sub" / "real.dcm", sop="1.2.77.3")
    (folder / "linked").symlink_to(folder / "sub", target_is_directory=True)
    return "linked"


def _loop(folder: Path, outside: Path) -> str:
    (folder / "loop.dcm").symlink_to(folder / "loop.dcm")
    return "loop.dcm"


def _parent_loop(folder: Path, outside: Path) -> str:
    (folder / "up").symlink_to(folder, target_is_directory=True)  # a folder holding itself
    return "up"


def _outside_file(folder: Path, outside: Path) -> str:
    identified_ct(outside / "elsewhere.dcm", sop="1.2.77.4")
    (folder / "out.dcm").symlink_to(outside / "elsewhere.dcm")
    return "out.dcm"


def _outside_folder(folder: Path, outside: Path) -> str:
    identified_ct(outside / "elsewhere.dcm", sop="1.2.77.5")
    (folder / "outdir").symlink_to(outside, target_is_directory=True)
    return "outdir"


def _fifo(folder: Path, outside: Path) -> str:
    os.mkfifo(folder / "x.dcm")  # opening it for reading would block discovery forever
    return "x.dcm"


def _socket(folder: Path, outside: Path) -> str:
    sock = socket.socket(socket.AF_UNIX)
    sock.bind(str(folder / "s.dcm"))
    sock.close()
    return "s.dcm"


def _device(folder: Path, outside: Path) -> str:
    if os.geteuid() != 0:
        pytest.skip("creating a device node needs root")
    os.mknod(folder / "dev.dcm", stat.S_IFCHR | 0o600, os.makedev(1, 3))  # like /dev/null
    return "dev.dcm"


def _symlink_to_fifo(folder: Path, outside: Path) -> str:
    os.mkfifo(folder / "pipe")
    (folder / "pipe.dcm").symlink_to(folder / "pipe")
    return "pipe.dcm"


def _bad_name(folder: Path, outside: Path) -> str:
    name = os.fsencode(folder) + b"/caf\xe9.dcm"  # Latin-1 bytes, not UTF-8
    identified_ct(Path(os.fsdecode(name)), sop="1.2.77.6")
    return "caf\\xe9.dcm"


def _bad_folder_name(folder: Path, outside: Path) -> str:
    sub = os.fsdecode(os.fsencode(folder) + b"/M\xdcLLER")
    os.mkdir(sub)
    identified_ct(Path(sub) / "a.dcm", sop="1.2.77.7")
    return "M\\xdcLLER/a.dcm"


HOSTILE = {
    "dangling symlink": (_dangling, "dangling symlink"),
    "symlink to a folder inside": (_folder_inside, "symlink to a folder (not followed)"),
    "symlink loop": (_loop, "symlink loop"),
    "symlink to its own folder": (_parent_loop, "symlink to a folder (not followed)"),
    "symlink to a file outside": (_outside_file, "symlink leads outside the source folder"),
    "symlink to a folder outside": (_outside_folder, "symlink leads outside the source folder"),
    "FIFO": (_fifo, "not a regular file (FIFO)"),
    "symlink to a FIFO": (_symlink_to_fifo, "symlink to a FIFO"),
    "socket": (_socket, "not a regular file (socket)"),
    "device": (_device, "not a regular file (device)"),
    "file name not UTF-8": (_bad_name, "file name is not valid UTF-8"),
    "folder name not UTF-8": (_bad_folder_name, "file name is not valid UTF-8"),
}


def _within(seconds: float, fn, *args):
    """``fn(*args)``, failing the test if it has not returned in ``seconds`` (a hang)."""
    out: dict = {}

    def call():
        try:
            out["value"] = fn(*args)
        except BaseException as err:  # noqa: BLE001 - re-raised in the test's thread
            out["error"] = err

    worker = threading.Thread(target=call, daemon=True)
    worker.start()
    worker.join(seconds)
    assert not worker.is_alive(), f"{fn.__name__} blocked"
    if "error" in out:
        raise out["error"]
    return out["value"]


def _site(kind: str, src: Path) -> SiteConfig:
    return SiteConfig(site_id="s1", source={"kind": kind, "path": str(src)})


@pytest.mark.parametrize("kind", ["flat", "zip_batches"])
@pytest.mark.parametrize("entry", sorted(HOSTILE))
def test_hostile_entry_is_quarantined_and_the_batch_goes_on(tmp_path, entry, kind):
    make, reason = HOSTILE[entry]
    src, outside, work = tmp_path / "src", tmp_path / "outside", str(tmp_path / "work")
    folder = src / ZIP_FOLDER if kind == "zip_batches" else src
    folder.mkdir(parents=True)
    outside.mkdir()
    identified_ct(folder / "good.dcm", sop="1.2.77.1")
    bad = make(folder, outside)
    prefix = f"{ZIP_FOLDER}/" if kind == "zip_batches" else ""
    cfg = _site(kind, src)

    batches = _within(30, discovery.discover_batches, cfg, work, set())
    rows = [r for b in batches for r in _within(
        30, take_batch, cfg, b, work).index.to_pylist()]
    by_key = {r["key"]: r for r in rows}
    assert by_key[prefix + "good.dcm"]["status"] == "ok"
    quarantined = by_key[prefix + bad]
    assert (quarantined["status"], quarantined["reason"]) == ("quarantined", reason)
    assert quarantined["object_id"].startswith("o") and bad not in quarantined["object_id"]
    # every entry is accounted for once, and nothing outside the source was read
    assert len(by_key) == len(rows)
    assert all(r["status"] == "ok" or r["reason"] for r in rows)
    assert not any("elsewhere" in (r["staged_path"] or "") for r in rows)
    [batch] = [b for b in batches if any(o.key == prefix + bad for o in b.objects)]
    listing = pq.read_table(
        Path(work) / "s1" / "quarantine" / batch.batch_id / "quarantine.parquet").to_pylist()
    assert (prefix + bad, reason) in [(r["key"], r["reason"]) for r in listing]


def test_a_bad_entry_is_not_taken_again_once_its_batch_is_published(tmp_path):
    src, work = tmp_path / "src", str(tmp_path / "work")
    src.mkdir()
    identified_ct(src / "good.dcm", sop="1.2.78.1")
    _fifo(src, tmp_path)
    _dangling(src, tmp_path)
    cfg = _site("folder", src)
    [first] = discovery.discover_batches(cfg, work, set())
    index = take_batch(cfg, first, work).index
    ledger.record_ingested(first, index, work)
    assert discovery.discover_batches(cfg, work, {first.batch_id}) == []
    identified_ct(src / "new.dcm", sop="1.2.78.2")
    [second] = discovery.discover_batches(cfg, work, {first.batch_id})
    assert [o.key for o in second.objects] == ["new.dcm"]


def test_an_entry_that_turns_into_a_fifo_after_discovery_never_blocks_ingest(tmp_path):
    src, work = tmp_path / "src", str(tmp_path / "work")
    src.mkdir()
    identified_ct(src / "a.dcm", sop="1.2.79.1")
    identified_ct(src / "b.dcm", sop="1.2.79.2")
    cfg = _site("flat", src)
    [batch] = discovery.discover_batches(cfg, work, set())
    (src / "b.dcm").unlink()
    os.mkfifo(src / "b.dcm")
    rows = _within(30, take_batch, cfg, batch, work).index.to_pylist()
    assert [(r["key"], r["reason"]) for r in rows] == [
        ("a.dcm", None), ("b.dcm", "not a regular file (FIFO)")]


# root reads any file whatever its mode: run the check without the capabilities that allow it
WITHOUT_OVERRIDE = (["setpriv", "--bounding-set=-dac_override,-dac_read_search"]
                    if os.geteuid() == 0 else [])

PERMISSION_CHECK = """
import json, os, sys
from schemas.config import SiteConfig
from tasks import discovery
from tests.passes import take_batch
src, work, stage = sys.argv[1:4]
cfg = SiteConfig(site_id="s1", source={"kind": "flat", "path": src})
batches = discovery.discover_batches(cfg, work, set())
if stage == "ingest":
    os.chmod(os.path.join(src, "b.dcm"), 0)
rows = [r for b in batches for r in take_batch(cfg, b, work).index.to_pylist()]
print(json.dumps([(r["key"], r["reason"]) for r in rows]))
"""


@pytest.mark.parametrize("stage", ["discovery", "ingest"])
def test_unreadable_file_or_folder_is_quarantined_as_permission_denied(tmp_path, stage):
    import json

    src, work = tmp_path / "src", tmp_path / "work"
    (src / "locked").mkdir(parents=True)
    identified_ct(src / "a.dcm", sop="1.2.80.1")
    identified_ct(src / "b.dcm", sop="1.2.80.2")
    identified_ct(src / "locked" / "c.dcm", sop="1.2.80.3")
    (src / "locked").chmod(0)
    if stage == "discovery":
        (src / "b.dcm").chmod(0)
    try:
        done = subprocess.run(
            [*WITHOUT_OVERRIDE, sys.executable, "-c", PERMISSION_CHECK, str(src), str(work),
             stage], capture_output=True, text=True, timeout=120, check=False,
            env={**os.environ, "PYTHONPATH": str(Path(__file__).parent.parent)})
    finally:
        (src / "locked").chmod(0o700)
    assert done.returncode == 0, done.stderr
    rows = dict(map(tuple, json.loads(done.stdout)))
    assert rows == {"a.dcm": None, "b.dcm": "unreadable (permission denied)",
                    "locked": "folder unreadable (PermissionError)"}


@pytest.mark.parametrize("kind", ["flat", "zip_batches"])
def test_a_missing_source_fails_with_one_line_naming_the_site(tmp_path, kind):
    hidden = tmp_path / "SMITH_JOHN-exports"
    with pytest.raises(SourceUnavailable) as caught:
        discovery.discover_batches(_site(kind, hidden), str(tmp_path / "work"), set())
    message = str(caught.value)
    assert message == "site s1: the source folder is missing or unreadable"
    assert caught.value.__cause__ is None and (
        caught.value.__context__ is None or caught.value.__suppress_context__)


def test_a_source_that_is_a_file_is_unavailable(tmp_path):
    (tmp_path / "src").write_text("not a folder")
    with pytest.raises(SourceUnavailable, match=r"^site s1: "):
        discovery.discover_batches(_site("folder", tmp_path / "src"), str(tmp_path / "w"), set())


def test_a_missing_clinical_export_fails_with_one_line_naming_the_site(tmp_path):
    from schemas.config import ClinicalConfig
    from tasks.deidentify.clinical import deidentify_clinical
    from tasks.deidentify.keys import PseudonymKeys

    path = tmp_path / "DOE_JANE" / "emr.csv"
    with pytest.raises(SourceUnavailable) as caught:
        deidentify_clinical(str(path), ClinicalConfig(path=str(path)),
                            PseudonymKeys(b"k" * 32), "s1", {})
    assert str(caught.value) == "site s1: the clinical export is missing or unreadable"


def test_on_s3_an_object_that_vanishes_is_quarantined_and_a_missing_prefix_is_one_line(
        s3_endpoint, tmp_path):  # noqa: F811 - the fixture imported above
    import s3fs

    options = {"client_kwargs": {"endpoint_url": s3_endpoint}}
    fs = s3fs.S3FileSystem(**options)
    fs.mkdir("radrepo-hostile")
    for sop in ("1.2.81.1", "1.2.81.2"):
        identified_ct(tmp_path / f"{sop}.dcm", sop=sop)
        fs.put(str(tmp_path / f"{sop}.dcm"), f"radrepo-hostile/s1/p/{sop}.dcm")
    cfg = SiteConfig(site_id="s1", source={"kind": "folder", "path": "s3://radrepo-hostile/s1",
                                           "storage_options": options})
    work = str(tmp_path / "work")
    [batch] = discovery.discover_batches(cfg, work, set())
    fs.rm("radrepo-hostile/s1/p/1.2.81.2.dcm")
    fs.invalidate_cache()
    rows = take_batch(cfg, batch, work).index.to_pylist()
    assert [(r["key"], r["reason"]) for r in rows] == [
        ("p/1.2.81.1.dcm", None), ("p/1.2.81.2.dcm", "file vanished during ingest")]
    gone = SiteConfig(site_id="s1", source={"kind": "folder", "path": "s3://radrepo-hostile/nope",
                                            "storage_options": options})
    with pytest.raises(SourceUnavailable) as caught:
        discovery.discover_batches(gone, work, set())
    assert str(caught.value) == "site s1: the source folder is missing or unreadable"


def _corrupt_deflate_zip(path: Path) -> None:
    import zipfile
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as archive:
        archive.writestr("a.dcm", random.Random(0).randbytes(10000) * 2)
    data = bytearray(path.read_bytes())
    start = data.find(b"a.dcm") + len("a.dcm")
    for i in range(start + 2, start + 20):  # inside the deflate stream of the one member
        data[i] ^= 0xFF
    path.write_bytes(bytes(data))


def _bad_utf8_name_zip(path: Path) -> None:
    import zipfile
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("ab.dcm", b"x")
    data = bytearray(path.read_bytes().replace(b"ab.dcm", b"\xff\xfe.dcm"))
    central = data.find(b"PK\x01\x02")
    data[central + 9] |= 0x08  # the UTF-8 name flag, on a name that is not UTF-8
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("make, reason", [
    (_corrupt_deflate_zip, "corrupt zip entry (error)"),
    (_bad_utf8_name_zip, "corrupt zip archive (UnicodeDecodeError)"),
])
def test_a_zip_with_a_corrupt_stream_or_a_bad_member_name_is_quarantined(tmp_path, make,
                                                                         reason):
    src, work = tmp_path / "src", str(tmp_path / "work")
    src.mkdir()
    identified_ct(src / "good.dcm", sop="1.2.80.1")
    make(src / "bad.zip")
    cfg = _site("flat", src)
    [batch] = discovery.discover_batches(cfg, work, set())
    rows = take_batch(cfg, batch, work).index.to_pylist()
    assert {r["key"]: r["status"] for r in rows}["good.dcm"] == "ok"
    assert reason in [r["reason"] for r in rows if r["key"].startswith("bad.zip")]


def test_an_entry_too_deep_to_look_at_is_quarantined_not_fatal(tmp_path):
    src, work = tmp_path / "src", str(tmp_path / "work")
    src.mkdir()
    identified_ct(src / "good.dcm", sop="1.2.81.1")
    fd = os.open(src, os.O_RDONLY)
    depth = 0
    while len(str(src)) + (depth + 1) * 201 < os.pathconf(src, "PC_PATH_MAX") - 100:
        os.mkdir("d" * 200, dir_fd=fd)
        fd = os.open("d" * 200, os.O_RDONLY, dir_fd=fd)
        depth += 1
    os.close(os.open("f" * 250, os.O_CREAT | os.O_WRONLY, dir_fd=fd))  # its path is too long
    os.close(fd)
    cfg = _site("flat", src)
    [batch] = discovery.discover_batches(cfg, work, set())
    rows = take_batch(cfg, batch, work).index.to_pylist()
    assert {r["key"]: r["status"] for r in rows}["good.dcm"] == "ok"
    assert [r["reason"] for r in rows if r["key"].endswith("f" * 250)] == [
        "unreadable (OSError)"]
