"""Ingest throughput, side by side with a raw copy: discovery (listing and hashing what is new)
and indexing (header read, hash, staging) of the benchmark corpus, as a folder source and as
zip batches.

    .venv/bin/python bench/ingest.py [--rounds 5] [--out bench/out]

The corpus is bench/deid.py's (built with ``radrepo synth`` on first use). DIMSE and DICOMweb
sources are not implemented yet, so they are not measured here.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
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


def time_ingest(kind: str, source: Path, scratch: Path) -> tuple[float, int]:
    from schemas.config import SiteConfig
    from tasks import ingest

    work = scratch / "work"
    if work.exists():
        shutil.rmtree(work)
    site = SiteConfig(site_id="bench", source={"kind": kind, "path": str(source)})
    start = time.perf_counter()
    objects = 0
    for batch in ingest.discover_batches(site, str(work), set()):
        objects += ingest.ingest_batch(batch, site.source, str(work)).index.num_rows
    return time.perf_counter() - start, objects


def time_cp(source: Path, scratch: Path) -> float:
    import subprocess

    dst = scratch / "cp"
    if dst.exists():
        shutil.rmtree(dst)
    start = time.perf_counter()
    subprocess.run(["cp", "-r", str(source), str(dst)], check=True)
    return time.perf_counter() - start


def main() -> None:
    sys.path.insert(0, str(ROOT))
    from bench.deid import build_corpus

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "out")
    args = parser.parse_args()
    corpus = build_corpus(args.out)
    zips = zip_batches(corpus, args.out)
    scratch = args.out / "ingest-scratch"
    scratch.mkdir(parents=True, exist_ok=True)
    runs = {
        "cp -r": lambda: (time_cp(corpus, scratch), 408),
        "folder source": lambda: time_ingest("folder", corpus, scratch),
        "zip_batches source": lambda: time_ingest("zip_batches", zips, scratch),
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
    lines = ["| run | objects | median s | objects/s |", "| --- | ---: | ---: | ---: |"]
    for name, values in times.items():
        median = statistics.median(values)
        lines.append(f"| {name} | {counts[name]} | {median:.2f} | {counts[name] / median:.0f} |")
    text = "\n".join(lines)
    (args.out / "ingest-results.md").write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
