"""Peak memory of each Dask worker of ``radrepo deidentify`` on a 10,000-file batch and on a
quarter of it: it should follow the largest study, not the batch.

    .venv/bin/python bench/worker_memory.py [--files 10000] [--out bench/out]

Builds (once, cached under ``--out``) a batch of small CT slices, every one a distinct SOP
instance with its own pixels, cut from one ``radrepo synth`` slice: one large study of 15% of
the files and studies of 500 slices for the rest. The quarter batch is the large study and
as many 500-slice studies as make a quarter. Runs ``radrepo deidentify`` (the console script,
default workers) on each and samples every process it starts; a Dask worker is a child forked
from it (the resource tracker is not). Peak RSS is the kernel's high-water mark (VmHWM), read
until the process ends. Writes ``worker-memory.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parent.parent
STUDY_FILES = 500
LARGEST_SHARE = 0.15
SAMPLE_SECONDS = 0.2


def template_slice(out: Path) -> Path:
    """One small CT slice of a ``radrepo synth`` tree site."""
    synth = Path(tempfile.mkdtemp(prefix="synth-", dir=out))
    radrepo = str(Path(sys.executable).parent / "radrepo")
    subprocess.run([radrepo, "synth", str(synth), "--sites", "2", "--patients", "1",
                    "--ct-slices", "1", "--ct-size", "128", "--seed", "1"], check=True,
                   cwd=ROOT, stdout=subprocess.DEVNULL)
    truth = json.loads((synth / "ground_truth.json").read_text())
    tree = next(s for s in truth["sites"].values() if s["layout"] == "tree")
    axial = next(f for f in tree["files"] if f["role"] == "ct_axial")
    target = out / "template.dcm"
    shutil.copyfile(synth / tree["source"] / axial["key"], target)
    shutil.rmtree(synth)
    return target


def study_sizes(files: int) -> list[int]:
    """Slices per study: the largest first, then 500-slice studies (the last one smaller)."""
    largest = int(files * LARGEST_SHARE)
    rest = files - largest
    return [largest] + [STUDY_FILES] * (rest // STUDY_FILES) + (
        [rest % STUDY_FILES] if rest % STUDY_FILES else [])


def build_batch(out: Path, files: int) -> Path:
    """``files`` distinct slices in ``out/memory-<files>/<study>/``, cached."""
    import pydicom
    from pydicom.uid import generate_uid

    batch = out / f"memory-{files}"
    marker = out / f"memory-{files}.complete"
    if marker.exists():
        return batch
    if batch.exists():
        shutil.rmtree(batch)
    template = pydicom.dcmread(template_slice(out))
    pixels = bytearray(template.PixelData)
    for s, size in enumerate(study_sizes(files)):
        folder = batch / f"study{s:03d}"
        folder.mkdir(parents=True)
        template.PatientID = f"MEM{s:05d}"
        template.PatientName = f"MEMORY^PATIENT{s:03d}"
        template.AccessionNumber = f"ACC{s:05d}"
        template.StudyInstanceUID = generate_uid(entropy_srcs=[f"study-{s}"])
        template.SeriesInstanceUID = generate_uid(entropy_srcs=[f"series-{s}"])
        for i in range(size):
            uid = generate_uid(entropy_srcs=[f"sop-{s}-{i}"])
            template.SOPInstanceUID = template.file_meta.MediaStorageSOPInstanceUID = uid
            template.InstanceNumber = i + 1
            pixels[:8] = (s * 100_000 + i).to_bytes(8, "little")  # distinct pixels too
            template.PixelData = bytes(pixels)
            template.save_as(folder / f"{i:05d}.dcm")
    marker.write_text("ok\n")
    return batch


def quarter_of(batch: Path, files: int) -> Path:
    """The largest study and 500-slice studies up to a quarter of ``files``, hard-linked."""
    quarter = batch.with_name(batch.name + "-quarter")
    if quarter.exists():
        shutil.rmtree(quarter)
    studies = sorted(p for p in batch.iterdir() if p.is_dir())
    taken = 0
    for study in studies:
        if taken >= files // 4:
            break
        (quarter / study.name).mkdir(parents=True)
        for f in study.iterdir():
            os.link(f, quarter / study.name / f.name)
            taken += 1
    return quarter


@dataclass
class Run:
    files: int
    studies: int
    largest_study_mb: float
    worker_peaks_mb: list[float]
    main_peak_mb: float
    seconds: float


def vm_hwm_mb(pid: int) -> float | None:
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return None
    line = next((x for x in status.splitlines() if x.startswith("VmHWM:")), None)
    return int(line.split()[1]) / 1024 if line else None


def forked_from(proc: psutil.Process, root: psutil.Process) -> bool:
    """Whether ``proc`` is a fork of ``root`` (a worker of Dask's local scheduler runs the
    command radrepo runs; multiprocessing's resource tracker is a fresh interpreter)."""
    try:
        return proc.cmdline() == root.cmdline()
    except psutil.Error:
        return False


def measure(folder: Path, scratch: Path) -> Run:
    """Run ``radrepo deidentify`` on ``folder`` and follow its processes' peak RSS."""
    studies = [p for p in folder.iterdir() if p.is_dir()]
    sizes = {p: sum(f.stat().st_size for f in p.iterdir()) for p in studies}
    files = sum(len(list(p.iterdir())) for p in studies)
    out = scratch / "out"
    if out.exists():
        shutil.rmtree(out)
    radrepo = str(Path(sys.executable).parent / "radrepo")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    start = time.perf_counter()
    proc = subprocess.Popen([radrepo, "deidentify", str(folder), str(out)], env=env,
                            stdout=subprocess.DEVNULL)
    root = psutil.Process(proc.pid)
    peaks: dict[int, float] = {}
    workers: set[int] = set()
    while proc.poll() is None:
        try:
            children = root.children(recursive=True)
        except psutil.Error:
            children = []
        for p in [root, *children]:
            peak = vm_hwm_mb(p.pid)
            if peak is not None:
                peaks[p.pid] = max(peak, peaks.get(p.pid, 0.0))
            if p.pid != root.pid and p.pid not in workers and forked_from(p, root):
                workers.add(p.pid)
        time.sleep(SAMPLE_SECONDS)
    seconds = time.perf_counter() - start
    if proc.returncode != 0:
        raise RuntimeError(f"radrepo deidentify exited {proc.returncode}")
    if not workers:
        raise RuntimeError("no Dask worker process seen")
    shutil.rmtree(out)
    return Run(files, len(studies), max(sizes.values()) / 1e6,
               sorted(peaks[p] for p in workers), peaks[root.pid], seconds)


def report(runs: list[Run]) -> str:
    lines = ["| files | studies | largest study MB | peak RSS per worker MB | "
             "main process peak MB | seconds |", "| ---: | ---: | ---: | --- | ---: | ---: |"]
    for r in runs:
        per_worker = ", ".join(f"{mb:.0f}" for mb in r.worker_peaks_mb)
        lines.append(f"| {r.files} | {r.studies} | {r.largest_study_mb:.1f} | {per_worker} | "
                     f"{r.main_peak_mb:.0f} | {r.seconds:.1f} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--files", type=int, default=10_000)
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "out")
    args = parser.parse_args()
    args.out = args.out.resolve()  # configs resolve relative paths against their own folder
    os.environ["RADREPO_SECRET"] = "benchmark-secret-0001"
    args.out.mkdir(parents=True, exist_ok=True)
    batch = build_batch(args.out, args.files)
    scratch = Path(tempfile.mkdtemp(prefix="worker-memory-", dir=args.out))
    try:
        runs = [measure(quarter_of(batch, args.files), scratch), measure(batch, scratch)]
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
        shutil.rmtree(batch.with_name(batch.name + "-quarter"), ignore_errors=True)
    text = report(runs)
    (args.out / "worker-memory.md").write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
