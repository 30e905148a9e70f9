"""The nightly flow at one Yale night's scale, on a real Prefect server and two Dask workers.

A synthetic consortium (three sites, at full size at least 380 exams and 20,000 files, small
matrices) is run through ``nightly`` at 1/4, 1/2 and full size: one ``prefect server``
subprocess for all, a fresh ``dask scheduler`` and two ``dask worker`` processes per size. Reported:
files/s, studies/hour, peak RSS of the flow process and of each Dask worker (VmHWM), and
orchestration seconds per batch (a batch's wall time minus its steps' seconds, both from its
artifact: Prefect's and Dask's overhead). Each size's
results are appended to the report as soon as it finishes.

    .venv/bin/python bench/nightly_scale.py            # writes bench/out/nightly-scale.md
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from infra.services import dask_cluster, prefect_server  # noqa: E402

FULL_PATIENTS = 62  # per site: about 390 exams over three sites
CT_SLICES = 150  # with the radiographs, about 21,000 files at full size
SECRET = "bench-secret-not-for-real-data-0123456789"


def peak_rss_mb(pid: int) -> float:
    """A live process's peak resident set (VmHWM), in MB."""
    text = Path(f"/proc/{pid}/status").read_text()
    return int(re.search(r"^VmHWM:\s+(\d+) kB", text, re.M).group(1)) / 1024


def consortium(out: Path, patients: int) -> tuple[Path, int, int]:
    """Synthesize the sources and write a config; (config path, files, exams)."""
    from synth import synthesize

    truth = synthesize(out / "sources", sites=3, patients=patients, seed=2026,
                       ct_slices=CT_SLICES, ct_size=16, cr_size=16)
    kinds = {"zip_batches": "zip_batches", "tree": "folder", "flat": "flat"}
    sites = [{"site_id": sid, "source": {"kind": kinds[s["layout"]],
                                         "path": str(out / "sources" / s["source"])},
              "clinical": {"path": str(out / "sources" / s["clinical"])},
              "id_remap": str(out / "sources" / s["remap"])}
             for sid, s in truth["sites"].items()]
    config = out / "consortium.yaml"
    config.write_text(yaml.safe_dump({"release": str(out / "release"),
                                      "work_dir": str(out / "work"), "sites": sites}))
    files = sum(len(s["files"]) for s in truth["sites"].values())
    exams = sum(len({f["study_uid"] for f in s["files"]}) for s in truth["sites"].values())
    return config, files, exams


def child(config: Path, scheduler: str) -> None:
    """Run nightly in this process and print what the parent measures, as JSON."""
    from prefect.client.orchestration import get_client

    from flows.batch_report import artifact_key
    from flows.nightly import nightly_flow

    raw = yaml.safe_load(config.read_text())
    raw["dask"] = {"scheduler": scheduler}
    config.write_text(yaml.safe_dump(raw))
    started = time.perf_counter()
    summaries = nightly_flow(str(config))
    seconds = time.perf_counter() - started

    async def orchestration_seconds() -> dict[str, float]:
        """Per batch artifact: its wall time minus its steps' seconds."""
        async with get_client() as client:
            out = {}
            for a in await client.read_artifacts():
                found = re.search(r"Whole batch: ([\d.]+) s, of which ([\d.]+) s", a.data or "")
                if a.key and found:
                    out[a.key] = float(found.group(1)) - float(found.group(2))
            return out

    per_batch = asyncio.run(orchestration_seconds())
    keys = {artifact_key(s["site_id"], s["batch_id"]) for s in summaries}
    orchestration = sum(v for k, v in per_batch.items() if k in keys)
    print(json.dumps({
        "seconds": seconds, "batches": len(summaries),
        "files_in": sum(s["files_in"] for s in summaries),
        "published": sum(s["published"] for s in summaries),
        "flow_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "orchestration_per_batch": orchestration / max(len(summaries), 1),
    }))


def run_size(label: str, patients: int, out: Path, api_url: str, home: Path) -> dict:
    """One size end to end: sources, a fresh Dask cluster, nightly in a child process."""
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    config, files, exams = consortium(out, patients)
    env = {"PYTHONPATH": str(ROOT), "RADREPO_SECRET": SECRET}
    with dask_cluster(2, out / "dask", env=env) as (scheduler, workers):
        from distributed import Client

        done = subprocess.run(
            [sys.executable, __file__, "--child", str(config), scheduler.address],
            capture_output=True, text=True, check=False,
            env={**os.environ, **env, "PREFECT_API_URL": api_url, "PREFECT_HOME": str(home),
                 "PREFECT_LOGGING_HANDLERS_CONSOLE_LEVEL": "WARNING"})
        if done.returncode:
            raise SystemExit(f"{label}: nightly failed:\n{done.stderr[-3000:]}")
        result = json.loads(done.stdout.strip().splitlines()[-1])
        with Client(scheduler.address) as client:
            pids = list(client.run(os.getpid).values())
        result["worker_rss_mb"] = [peak_rss_mb(pid) for pid in pids]
    result.update(label=label, files=files, exams=exams)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "out")
    parser.add_argument("--sizes", default="1/4,1/2,1")
    parser.add_argument("--child", nargs=2, metavar=("CONFIG", "SCHEDULER"))
    args = parser.parse_args()
    if args.child:
        child(Path(args.child[0]), args.child[1])
        return
    scratch = args.out / "nightly-scale"
    report = args.out / "nightly-scale.md"
    report.parent.mkdir(parents=True, exist_ok=True)
    report.write_text(
        "| size | exams | files | batches | seconds | files/s | studies/hour | flow RSS MB "
        "| worker RSS MB | orchestration s/batch |\n"
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- | ---: |\n")
    home = scratch / "prefect-home"
    home.mkdir(parents=True, exist_ok=True)
    with prefect_server(home) as server:
        for size in args.sizes.split(","):
            num, _, den = size.partition("/")
            patients = max(1, round(FULL_PATIENTS * int(num) / int(den or 1)))
            r = run_size(size, patients, scratch / size.replace("/", "-"), server.address, home)
            line = (f"| {r['label']} | {r['exams']} | {r['files']} | {r['batches']} "
                    f"| {r['seconds']:.0f} | {r['files_in'] / r['seconds']:.1f} "
                    f"| {r['exams'] / r['seconds'] * 3600:.0f} | {r['flow_rss_mb']:.0f} "
                    f"| {', '.join(f'{m:.0f}' for m in r['worker_rss_mb'])} "
                    f"| {r['orchestration_per_batch']:.1f} |\n")
            with report.open("a") as fh:
                fh.write(line)
            print(line, end="", flush=True)


if __name__ == "__main__":
    main()
