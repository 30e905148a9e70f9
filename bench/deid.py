"""Benchmark radrepo's de-identification side by side with peers and a raw file copy.

    .venv/bin/python bench/deid.py [--rounds 3] [--out bench/out] [--no-peers]

Builds the corpus with ``radrepo synth`` (400 CT slices 512x512 and 8 radiographs 2048x2048 from
the synthetic tree site), installs the Python peers (dicognito, deid, dicom-anonymizer) into
their own virtualenv and Debian's pixelmed-apps, then times in one run, several rounds each,
medians, two tables. Processing only (cluster, interpreter and JVM start-up excluded for
everyone; pixelmed reports its own time): ``cp -r``; radrepo's de-identification step alone on
one and on two Dask workers; the whole ``site_batch`` flow (two workers); each peer. End to end
(wall clock of the command a user types, process start included): ``radrepo deidentify CORPUS
OUT`` with its defaults, pixelmed's DeidentifyAndRedact (JVM start included) and dicognito's
own command line.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from contextlib import ExitStack
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PEERS = ("dicognito", "deid", "dicom-anonymizer")
PIXELMED_JAR = Path("/usr/share/java/pixelmed.jar")
OPTIONS = ("retain_long_modif_dates", "retain_patient_chars", "clean_descriptors")
CT_FILES, XR_FILES = 400, 8
END_TO_END = "end to end: "


def build_corpus(out: Path) -> Path:
    """400 CT slices and 8 radiographs from a ``radrepo synth`` tree site, in one flat folder
    (cached under ``out``)."""
    corpus = out / "corpus"
    marker = out / "corpus.complete"
    if marker.exists():
        return corpus
    synth = out / "synth"
    radrepo = str(Path(sys.executable).parent / "radrepo")
    subprocess.run([radrepo, "synth", str(synth), "--sites", "2",
                    "--patients", "4", "--ct-slices", "100", "--ct-size", "512",
                    "--cr-size", "2048", "--seed", "1"], check=True, cwd=ROOT,
                   stdout=subprocess.DEVNULL)
    truth = json.loads((synth / "ground_truth.json").read_text())
    tree = next(s for s in truth["sites"].values() if s["layout"] == "tree")
    ct = [f for f in tree["files"] if f["role"] == "ct_axial"][:CT_FILES]
    xr = [f for f in tree["files"] if f["role"] in ("cr_frontal", "cr_lateral")][:XR_FILES]
    if len(ct) < CT_FILES or len(xr) < XR_FILES:
        raise SystemExit(f"synthetic site too small: {len(ct)} CT, {len(xr)} radiographs")
    if corpus.exists():
        shutil.rmtree(corpus)
    corpus.mkdir(parents=True)
    for i, f in enumerate(ct + xr):  # one flat folder, unique names: every peer can read it
        shutil.copyfile(synth / tree["source"] / f["key"], corpus / f"{i:04d}.dcm")
    shutil.rmtree(synth)
    marker.write_text("ok\n")
    return corpus


def peers_python(out: Path) -> Path:
    """A virtualenv holding the Python peers, apart from radrepo's own."""
    venv = out / "peers-venv"
    python = venv / "bin" / "python"
    if not (venv / ".complete").exists():
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
        subprocess.run([str(python), "-m", "pip", "install", "--quiet",
                        "--disable-pip-version-check", *PEERS], check=True)
        (venv / ".complete").write_text("ok\n")
    return python


def ensure_pixelmed() -> bool:
    if PIXELMED_JAR.exists():
        return True
    if os.geteuid() != 0:
        return False
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    subprocess.run(["apt-get", "install", "-y", "-qq", "--no-install-recommends",
                    "pixelmed-apps"], check=False, env=env, stdout=subprocess.DEVNULL)
    return PIXELMED_JAR.exists()


def fresh(path: Path) -> Path:
    """``path`` removed, its parent present: a clean target for one round."""
    if path.exists():
        shutil.rmtree(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    return path


def time_cp(corpus: Path, scratch: Path) -> float:
    dst = fresh(scratch / "cp")
    start = time.perf_counter()
    subprocess.run(["cp", "-r", str(corpus), str(dst)], check=True)
    return time.perf_counter() - start


def time_peer(python: Path, tool: str, corpus: Path, scratch: Path) -> float:
    dst = fresh(scratch / tool)
    # -P: bench/deid.py must not shadow the peer package named deid
    result = subprocess.run([str(python), "-P", str(ROOT / "bench" / "peer_driver.py"), tool,
                             str(corpus), str(dst)], check=True, capture_output=True, text=True)
    report = json.loads(result.stdout.strip().splitlines()[-1])
    if report["written"] < report["files"] * 0.9:
        raise RuntimeError(f"{tool} wrote {report['written']} of {report['files']} files")
    return report["seconds"]


def time_pixelmed(corpus: Path, scratch: Path) -> dict[str, float]:
    """DeidentifyAndRedact's own processing time and the wall clock of its command (JVM start
    included)."""
    dst = fresh(scratch / "pixelmed")
    dst.mkdir(parents=True)
    control = scratch / "redaction-control.txt"
    control.write_text("")
    start = time.perf_counter()
    result = subprocess.run(["java", "-cp", str(PIXELMED_JAR),
                             "com.pixelmed.apps.DeidentifyAndRedact", str(corpus), str(dst),
                             str(control), "BLOCK", "KEEPSAFEPRIVATE"],
                            capture_output=True, text=True, check=True)
    wall = time.perf_counter() - start
    found = re.search(r"entire set took = (\d+) ms", result.stderr + result.stdout)
    return {"peer: pixelmed DeidentifyAndRedact": int(found.group(1)) / 1000 if found else wall,
            f"{END_TO_END}pixelmed DeidentifyAndRedact": wall}


def written_files(folder: Path) -> int:
    return sum(1 for p in folder.rglob("*") if p.is_file())


def time_dicognito_cli(python: Path, corpus: Path, scratch: Path) -> float:
    """dicognito's own command line into an output folder (its console script takes no
    arguments in 0.19, so ``python -m dicognito``)."""
    dst = fresh(scratch / "dicognito-cli")
    start = time.perf_counter()
    subprocess.run([str(python), "-m", "dicognito", "--quiet", "--output-directory", str(dst),
                    str(corpus)], check=True, stdout=subprocess.DEVNULL)
    seconds = time.perf_counter() - start
    if written_files(dst) < (CT_FILES + XR_FILES) * 0.9:
        raise RuntimeError(f"dicognito wrote {written_files(dst)} files")
    return seconds


def time_radrepo_cli(corpus: Path, scratch: Path) -> float:
    """``radrepo deidentify CORPUS OUT`` as a user runs it: the console script, default
    options and workers, this checkout's code."""
    dst = fresh(scratch / "radrepo-cli")
    radrepo = str(Path(sys.executable).parent / "radrepo")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    start = time.perf_counter()
    subprocess.run([radrepo, "deidentify", str(corpus), str(dst)], check=True, env=env,
                   stdout=subprocess.DEVNULL)
    seconds = time.perf_counter() - start
    if written_files(dst) < CT_FILES + XR_FILES - 1:  # the corpus repeats one SOP UID
        raise RuntimeError(f"radrepo deidentify wrote {written_files(dst)} files")
    return seconds


def radrepo_units(corpus: Path, work: Path):
    """The corpus as the one pass takes it: discovered (names and sizes), in work units."""
    from flows.one_pass import work_units
    from schemas.config import SiteConfig
    from tasks import discovery

    site = SiteConfig(site_id="bench", source={"kind": "folder", "path": str(corpus)})
    [batch] = discovery.discover_batches(site, str(work), set())
    return work_units(batch, site.source, str(work))


def time_radrepo_step(units, client, scratch: Path) -> float:
    """The one pass on the cluster: each file read, de-identified, gated and written once."""
    from flows.one_pass import PassContext, read_batch
    from tasks.deidentify import DeidContext, PseudonymKeys

    out = fresh(scratch / "radrepo")
    ctx = PassContext(DeidContext(PseudonymKeys(b"benchmark-secret-0001"), "bench", OPTIONS, {}),
                      str(out / "deidentified"), str(out / "quarantine"))
    start = time.perf_counter()
    done = read_batch(units, ctx, client)
    seconds = time.perf_counter() - start
    if done.index.num_rows != CT_FILES + XR_FILES or done.quarantine.num_rows:
        raise RuntimeError("radrepo quarantined benchmark files")
    return seconds


def time_site_batch(corpus: Path, scratch: Path, scheduler: str) -> float:
    from flows.site_batch import site_batch
    from schemas.config import parse_config
    from tasks import discovery, ledger

    base = fresh(scratch / "site_batch")
    config = parse_config({
        "release": str(base / "release"), "work_dir": str(base / "work"),
        "dask": {"scheduler": scheduler},
        "sites": [{"site_id": "bench", "source": {"kind": "folder", "path": str(corpus)}}],
    }, base)
    [batch] = discovery.discover_batches(config.sites[0], config.work_dir, set())
    ledger.save_pending(batch, config.work_dir)
    start = time.perf_counter()
    summary = site_batch(config, "bench", batch.batch_id, scheduler=scheduler)
    seconds = time.perf_counter() - start
    if summary["files_in"] != CT_FILES + XR_FILES:
        raise RuntimeError(f"site_batch saw {summary['files_in']} files")
    return seconds


def report(results: dict[str, float], files: int, corpus_mb: float) -> str:
    """The processing-only table, the end-to-end table and the targets, in markdown."""
    processing = {k: v for k, v in results.items() if not k.startswith(END_TO_END)}
    ends = {k.removeprefix(END_TO_END): v for k, v in results.items() if k.startswith(END_TO_END)}
    cp = processing["cp -r"]
    one = files / processing["radrepo deidentify, 1 worker"]
    two = files / processing["radrepo deidentify, 2 workers"]
    lines = [f"Corpus: {files} files, {corpus_mb:.0f} MB ({CT_FILES} CT 512x512, {XR_FILES} "
             "radiographs 2048x2048, about 120 header elements each).", "",
             "Processing only (interpreter, cluster and JVM start excluded):", "",
             "| run | median s | files/s | vs cp -r | radrepo 1 worker vs it |",
             "| --- | ---: | ---: | ---: | ---: |"]
    for name, seconds in processing.items():
        rate = files / seconds
        lines.append(f"| {name} | {seconds:.2f} | {rate:.0f} | {rate / (files / cp):.2f}x | "
                     f"{one / rate:.2f}x |")
    mine = files / ends["radrepo deidentify"]
    lines += ["", "End to end, process start included (wall clock of the command):", "",
              "| command | median s | files/s | radrepo deidentify vs it |",
              "| --- | ---: | ---: | ---: |"]
    for name, seconds in sorted(ends.items(), key=lambda kv: kv[0] != "radrepo deidentify"):
        lines.append(f"| {name} | {seconds:.2f} | {files / seconds:.0f} | "
                     f"{mine / (files / seconds):.2f}x |")
    lines.append("")
    checks = []
    peers = {k: files / v for k, v in processing.items() if k.startswith("peer: ")}
    if "peer: dicognito" in peers:
        checks.append(("1 worker >= 4x dicognito (processing)", one / peers["peer: dicognito"],
                       4.0))
    checks.append(("2 workers >= 1.7x 1 worker", two / one, 1.7))
    site = files / processing["site_batch (whole flow, 2 workers)"]
    checks.append(("site_batch >= 0.8x deidentify alone (2 workers)", site / two, 0.8))
    peer_ends = {k: files / v for k, v in ends.items() if k != "radrepo deidentify"}
    if peer_ends:
        fastest = max(peer_ends, key=peer_ends.get)
        checks.append((f"radrepo deidentify end to end >= 2x the fastest peer end to end "
                       f"({fastest})", mine / peer_ends[fastest], 2.0))
    lines += ["| target | measured | met |", "| --- | ---: | --- |"]
    for label, value, goal in checks:
        lines.append(f"| {label} | {value:.2f}x | {'yes' if value >= goal else 'NO'} |")
    return "\n".join(lines)


def one_clock(label: str, fn: Callable[[], float]) -> Callable[[], dict[str, float]]:
    return lambda: {label: fn()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "out")
    parser.add_argument("--no-peers", action="store_true", help="radrepo and cp -r only")
    args = parser.parse_args()
    args.out = args.out.resolve()  # configs resolve relative paths against their own folder
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ["RADREPO_SECRET"] = "benchmark-secret-0001"
    args.out.mkdir(parents=True, exist_ok=True)
    corpus = build_corpus(args.out)
    scratch = args.out / "scratch"
    files = sum(1 for p in corpus.rglob("*.dcm"))
    corpus_mb = sum(p.stat().st_size for p in corpus.rglob("*.dcm")) / 1e6
    from prefect.testing.utilities import prefect_test_harness

    from flows.cluster import local_cluster
    from flows.site_batch import without_heartbeat

    # each run returns its clocks by label: pixelmed's one command gives two
    runs: list[Callable[[], dict[str, float]]] = [
        one_clock("cp -r", lambda: time_cp(corpus, scratch))]
    units = radrepo_units(corpus, fresh(scratch / "index-work"))
    with ExitStack() as stack:
        clusters = {}
        for workers in (1, 2):
            cluster = stack.enter_context(local_cluster(workers))
            clusters[workers] = (cluster, stack.enter_context(cluster.get_client()))
        stack.enter_context(prefect_test_harness(server_startup_timeout=120))
        stack.enter_context(without_heartbeat())  # as the nightly flow runs site_batch
        for workers, (_, client) in clusters.items():
            label = f"radrepo deidentify, {workers} worker{'s' if workers > 1 else ''}"
            runs.append(one_clock(label, lambda c=client: time_radrepo_step(units, c, scratch)))
        address = clusters[2][0].scheduler_address
        runs.append(one_clock("site_batch (whole flow, 2 workers)",
                              lambda: time_site_batch(corpus, scratch, address)))
        if not args.no_peers:
            python = peers_python(args.out)
            for tool in PEERS:
                runs.append(one_clock(f"peer: {tool}",
                                      lambda t=tool: time_peer(python, t, corpus, scratch)))
            if ensure_pixelmed():
                runs.append(lambda: time_pixelmed(corpus, scratch))
        runs.append(one_clock(f"{END_TO_END}radrepo deidentify",
                              lambda: time_radrepo_cli(corpus, scratch)))
        if not args.no_peers:
            runs.append(one_clock(f"{END_TO_END}dicognito",
                                  lambda: time_dicognito_cli(python, corpus, scratch)))
        for fn in runs:
            fn()  # warm-up round, not counted: imports, JIT, page cache
        # rounds interleave the runs, so a noisy moment on a shared machine hits them alike
        times: dict[str, list[float]] = {}
        for _ in range(args.rounds):
            for fn in runs:
                for name, seconds in fn().items():
                    times.setdefault(name, []).append(seconds)
    results = {name: statistics.median(values) for name, values in times.items()}
    shutil.rmtree(scratch, ignore_errors=True)
    text = report(results, files, corpus_mb)
    (args.out / "deid-results.md").write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    main()
