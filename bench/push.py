"""Push throughput to a research PACS, side by side with DCMTK: radrepo's STOW-RS and C-STORE
pushes of a published release into an empty Orthanc, against ``storescu`` sending the same
release's DICOM files over one association.

    .venv/bin/python bench/push.py [--rounds 3] [--out bench/out]

The release is bench/deid.py's corpus (400 CT slices 512x512, 8 radiographs 2048x2048) run
through ``radrepo run`` once and cached under --out. Each round starts a fresh, empty Debian
Orthanc on loopback (infra/orthanc.py) per sender; radrepo's time includes reading the manifests,
the push ledger and the count check asked back per study.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.deid import build_corpus  # noqa: E402
from infra.orthanc import free_port, run_orthanc  # noqa: E402

SECRET = "bench-push-secret-0123456789abcdef"


def build_release(out: Path) -> Path:
    """The benchmark corpus published by ``radrepo run`` (cached)."""
    release = out / "push-release"
    if (release / "catalog.duckdb").exists():
        return release
    corpus = build_corpus(out)
    work = out / "push-work"
    shutil.rmtree(release, ignore_errors=True)
    shutil.rmtree(work, ignore_errors=True)
    radrepo = Path(sys.executable).with_name("radrepo")
    subprocess.run([str(radrepo), "run", "--source", f"bench={corpus}", "--release",
                    str(release), "--work", str(work)], check=True,
                   env={**os.environ, "RADREPO_SECRET": SECRET, "PYTHONPATH": str(ROOT)})
    return release


def time_radrepo(release: Path, kind: str, scratch: Path) -> tuple[float, int]:
    from schemas.config import DicomWebResearchPacs, DimseResearchPacs
    from tasks.pacs.push import PushLedger, push_release
    from tasks.zones import Release

    with run_orthanc(scratch / "orthanc", {"RADREPO": free_port()}) as server:
        target = (DicomWebResearchPacs(kind="dicomweb", url=server.dicomweb)
                  if kind == "dicomweb" else
                  DimseResearchPacs(kind="dimse", host="127.0.0.1", port=server.dicom_port,
                                    called_ae=server.aet))
        ledger = PushLedger(scratch / "ledger.sqlite")
        start = time.perf_counter()
        result = push_release(Release(str(release)), target, ledger)
        elapsed = time.perf_counter() - start
        ledger.close()
        if not result.ok or result.sent != result.planned:
            raise SystemExit(f"radrepo {kind} push incomplete: {result}")
        return elapsed, result.sent


def time_storescu(release: Path, scratch: Path, expected: int) -> float:
    with run_orthanc(scratch / "orthanc") as server:
        start = time.perf_counter()
        subprocess.run(["storescu", "--required", "+sd", "+r", "-aec", server.aet,
                        "127.0.0.1", str(server.dicom_port), str(release / "dicom")],
                       check=True, capture_output=True)
        elapsed = time.perf_counter() - start
        with server.client() as http:
            stored = http.get("/statistics").json()["CountInstances"]
        if stored != expected:
            raise SystemExit(f"storescu stored {stored} of {expected} instances")
        return elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "out")
    args = parser.parse_args()
    if not shutil.which("storescu"):
        raise SystemExit("DCMTK's storescu is not installed (infra/install-services.sh)")
    args.out.mkdir(parents=True, exist_ok=True)
    release = build_release(args.out)
    times: dict[str, list[float]] = {"radrepo STOW-RS": [], "radrepo C-STORE": [],
                                     "DCMTK storescu": []}
    objects = 0
    for _ in range(args.rounds):
        with tempfile.TemporaryDirectory(dir=args.out) as scratch:
            t, objects = time_radrepo(release, "dicomweb", Path(scratch) / "web")
            times["radrepo STOW-RS"].append(t)
            t, _ = time_radrepo(release, "dimse", Path(scratch) / "dimse")
            times["radrepo C-STORE"].append(t)
            times["DCMTK storescu"].append(time_storescu(release, Path(scratch) / "dcmtk",
                                                         objects))
    size = sum(p.stat().st_size for p in (release / "dicom").rglob("*.dcm")) / 1e6
    floor = statistics.median(times["DCMTK storescu"])
    lines = [f"push of {objects} objects ({size:.0f} MB) to an empty Orthanc on loopback, "
             f"median of {args.rounds} rounds", ""]
    for name, values in times.items():
        t = statistics.median(values)
        lines.append(f"  {name:16s} {t:7.2f} s  {objects / t:7.1f} objects/s  "
                     f"{t / floor:5.2f}x storescu's time")
    text = "\n".join(lines)
    print(text)
    (args.out / "push.txt").write_text(text + "\n")


if __name__ == "__main__":
    main()
