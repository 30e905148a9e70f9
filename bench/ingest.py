"""Ingest throughput, side by side with a raw copy and with DCMTK: discovery (listing and
hashing what is new, or asking the PACS) and indexing (retrieve, header read, hash, staging) of
the benchmark corpus as a folder source, as zip batches, and from a PACS by DIMSE and DICOMweb.

    .venv/bin/python bench/ingest.py [--rounds 5] [--out bench/out]

The corpus is bench/deid.py's (built with ``radrepo synth`` on first use). The PACS is a
throwaway Debian Orthanc on loopback (infra/orthanc.py) loaded with the corpus before timing;
the DIMSE peer is DCMTK's ``movescu`` moving every study to its ``storescp``, the DICOMweb floor
is ``curl`` saving each study's WADO-RS answer unparsed.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import time
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def zip_batches(corpus: Path, out: Path) -> Path:
    """The corpus as one COMPLETE batch folder of exam zips (50 files per zip), cached."""
    root = out / "ingest-zips"
    folder = root / "CT-UPDATE-20200519-COMPLETE"
    if folder.exists():
        return root
    folder.mkdir(parents=True)
    files = sorted(corpus.glob("*.dcm"))
    for n, start in enumerate(range(0, len(files), 50)):
        name = folder / f"{1000 + n}_20200512-0900{n:02d}_A{n:03d}_CT-CHEST-WO.zip"
        with zipfile.ZipFile(name, "w", zipfile.ZIP_DEFLATED, compresslevel=1) as zf:
            for path in files[start:start + 50]:
                zf.write(path, f"2_AXIAL/{path.name}")
    return root


def time_ingest(source: dict, scratch: Path) -> tuple[float, int]:
    """Discovery, retrieval (PACS) and reading every object's bytes once, as the one pass
    does before it de-identifies them."""
    from flows.one_pass import work_units
    from schemas.config import SiteConfig
    from tasks import discovery, indexing

    work = scratch / "work"
    if work.exists():
        shutil.rmtree(work)
    site = SiteConfig(site_id="bench", source=source)
    start = time.perf_counter()
    objects = 0
    for batch in discovery.discover_batches(site, str(work), set()):
        for unit in work_units(batch, site.source, str(work)):
            objects += sum(1 for _ in indexing.read_unit(unit))
    return time.perf_counter() - start, objects


def time_cp(source: Path, scratch: Path) -> float:
    dst = scratch / "cp"
    if dst.exists():
        shutil.rmtree(dst)
    start = time.perf_counter()
    subprocess.run(["cp", "-r", str(source), str(dst)], check=True)
    return time.perf_counter() - start


def study_uids(pacs) -> list[str]:
    with pacs.client() as http:
        return sorted(http.get(f"/studies/{sid}").json()["MainDicomTags"]["StudyInstanceUID"]
                      for sid in http.get("/studies").json())


def time_movescu(pacs, studies: list[str], port: int, shim: Path, scratch: Path) -> float:
    """DCMTK: storescp (kept on loopback by the same shim as Orthanc) receiving a movescu
    C-MOVE of every study."""
    out = scratch / "storescp"
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    env = {**os.environ, "LD_PRELOAD": str(shim), "TCP_NODELAY": "1"}  # no Nagle stalls
    scp = subprocess.Popen(["storescp", "+xa", "--max-pdu", "131072", "-aet", "RADREPO",
                            "-od", str(out), str(port)],
                           env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        time.sleep(0.5)
        start = time.perf_counter()
        for uid in studies:
            subprocess.run(["movescu", "-S", "-aet", "RADREPO", "-aec", pacs.aet, "-aem",
                            "RADREPO", "-k", "QueryRetrieveLevel=STUDY", "-k",
                            f"StudyInstanceUID={uid}", "127.0.0.1", str(pacs.dicom_port)],
                           check=True, env=env, stdout=subprocess.DEVNULL,
                           stderr=subprocess.DEVNULL)
        seconds = time.perf_counter() - start
    finally:
        scp.terminate()
        scp.wait()
    return seconds


def time_curl(pacs, studies: list[str], scratch: Path) -> float:
    out = scratch / "curl"
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    start = time.perf_counter()
    for n, uid in enumerate(studies):
        subprocess.run(["curl", "-sf", "-o", str(out / f"{n}.multipart"), "-H",
                        'Accept: multipart/related; type="application/dicom"; transfer-syntax=*',
                        f"{pacs.dicomweb}/studies/{uid}"], check=True)
    return time.perf_counter() - start


def main() -> None:
    sys.path.insert(0, str(ROOT))
    from bench.deid import build_corpus
    from infra.orthanc import free_port, loopback_shim, run_orthanc

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "out")
    args = parser.parse_args()
    corpus = build_corpus(args.out)
    files = sorted(corpus.glob("*.dcm"))
    zips = zip_batches(corpus, args.out)
    scratch = args.out / "ingest-scratch"
    if scratch.exists():
        shutil.rmtree(scratch)
    scratch.mkdir(parents=True)
    port = free_port()
    with run_orthanc(scratch / "orthanc", {"RADREPO": port}) as pacs:
        statuses = pacs.upload(files)
        if "Rejected" in statuses.values():
            raise SystemExit("Orthanc refused part of the corpus")
        stored = sum(1 for v in statuses.values() if v == "Success")
        studies = study_uids(pacs)
        shim = loopback_shim(scratch)
        pacs_source = {"host": "127.0.0.1", "port": pacs.dicom_port, "called_ae": pacs.aet,
                       "storage_port": port}
        runs = {
            "cp -r": lambda: (time_cp(corpus, scratch), len(files)),
            "folder source": lambda: time_ingest({"kind": "folder", "path": str(corpus)},
                                                 scratch),
            "zip_batches source": lambda: time_ingest(
                {"kind": "zip_batches", "path": str(zips)}, scratch),
            "dimse source (C-FIND, C-MOVE)": lambda: time_ingest(
                {"kind": "dimse", **pacs_source}, scratch),
            "peer: DCMTK movescu + storescp": lambda: (
                time_movescu(pacs, studies, port, shim, scratch), stored),
            "dicomweb source (QIDO-RS, WADO-RS)": lambda: time_ingest(
                {"kind": "dicomweb", "url": pacs.dicomweb}, scratch),
            "floor: curl WADO-RS, unparsed": lambda: (
                time_curl(pacs, studies, scratch), stored),
        }
        for fn in runs.values():
            fn()  # warm-up
        times: dict[str, list[float]] = {k: [] for k in runs}
        counts: dict[str, int] = {}
        for _ in range(args.rounds):
            for name, fn in runs.items():
                seconds, counts[name] = fn()
                times[name].append(seconds)
    shutil.rmtree(scratch, ignore_errors=True)
    lines = [f"{len(files)} files; the PACS holds {stored} distinct objects in {len(studies)} "
             f"studies; {args.rounds} rounds, medians",
             "", "| run | objects | median s | objects/s | vs cp -r |",
             "| --- | ---: | ---: | ---: | ---: |"]
    cp = statistics.median(times["cp -r"])
    for name, values in times.items():
        median = statistics.median(values)
        lines.append(f"| {name} | {counts[name]} | {median:.2f} | "
                     f"{counts[name] / median:.0f} | {cp / median:.2f}x |")
    text = "\n".join(lines)
    (args.out / "ingest-results.md").write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
