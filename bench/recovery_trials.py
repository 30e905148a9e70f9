"""Crash and concurrency trials against real ``radrepo run`` subprocesses (issue 11).

Concurrent trials run first, then the republish kills, then the first-run kills.

1. A ``kill -9`` at every named step boundary (tasks/kill_point.py) of a first run, then a
   plain rerun: the release must be byte-identical to a clean run's (run log aside,
   ``catalog.duckdb`` by its view fingerprint) and the work folder settled.
2. A ``--force`` republish after an option change killed at each republish boundary: the old
   version readable whole, then a plain rerun equal to an uninterrupted republish.
3. ``--trials`` pairs of concurrent runs on one config at random offsets: the clean release
   every time, and each loser either finding nothing to do or giving up with one line.

    PYTHONPATH=$PWD .venv/bin/python bench/recovery_trials.py [--trials 20] [--seed 11]

Writes bench/out/recovery_trials.json and prints one line per trial.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from flows.cluster import local_cluster  # noqa: E402
from synth import synthesize  # noqa: E402
from tasks.kill_point import POINTS  # noqa: E402
from tasks.zones import Release  # noqa: E402
from tests.conftest import TEST_SECRET  # noqa: E402
from tests.test_recovery import (  # noqa: E402
    RUN_TIMEOUT,
    assert_readable,
    radrepo,
    release_state,
    work_state,
    write_config,
)

CHANGED = {"deid": {"options": ["retain_long_modif_dates", "retain_patient_chars",
                                "clean_descriptors", "retain_device_identity"]}}
FIRST_RUN_POINTS = [p for p in POINTS if p != "cleanup:manifest"]
# site-a has three batches and site-b one: "#4" is the last batch's (after the last COMPLETE)
EXTRA_FIRST_RUN = ["publish:complete#4", "after:catalog#4", "after:ledger#2"]
REPUBLISH_POINTS = ["publish:manifest", "publish:files", "publish:placed", "publish:complete",
                    "after:catalog", "cleanup:manifest", "after:superseded"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def prefect_server(home: Path) -> tuple[subprocess.Popen, str]:
    port = free_port()
    env = {**os.environ, "PREFECT_HOME": str(home), "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}
    server = subprocess.Popen([sys.executable, "-m", "prefect", "server", "start", "--host",
                               "127.0.0.1", "--port", str(port)], env=env,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}/api"
    import urllib.request

    for _ in range(240):
        try:
            urllib.request.urlopen(f"{url}/health", timeout=1)
            return server, url
        except OSError:
            time.sleep(0.5)
    server.kill()
    raise RuntimeError("prefect server did not start")


def check(folder: Path, release: dict, work: dict | None) -> str:
    problems = []
    if release_state(folder / "release") != release:
        problems.append("release differs")
    if work is not None and work_state(folder / "work") != work:
        problems.append("work folder differs")
    try:
        assert_readable(folder / "release")
    except AssertionError:
        problems.append("manifest findings")
    if list((folder / "release").rglob("*.tmp-*")):
        problems.append("temporary file left")
    return "; ".join(problems) or "ok"


def versions(folder: Path) -> dict[tuple[str, str], str]:
    """The manifest each COMPLETE batch of a release names (its current version)."""
    release = Release(str(folder / "release"))
    return {b: release.current_version(*b).manifest for b in release.complete_batches()}


def save(results: dict) -> None:
    out = ROOT / "bench" / "out"
    out.mkdir(exist_ok=True)
    (out / "recovery_trials.json").write_text(json.dumps(results, indent=1) + "\n")


def main() -> None:
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # stop the server and cluster
    parser = argparse.ArgumentParser()
    parser.add_argument("--trials", type=int, default=20)
    parser.add_argument("--seed", type=int, default=11)
    parser.add_argument("--max-offset", type=float, default=8.0)
    parser.add_argument("--parts", default="concurrent,republish,kills",
                        help="comma-separated: concurrent, republish, kills")
    args = parser.parse_args()
    rng = random.Random(args.seed)
    scratch = Path(tempfile.mkdtemp(prefix="radrepo-recovery-"))
    results: dict[str, list] = {"kills": [], "republish_kills": [], "concurrent": []}
    server, url = prefect_server(scratch / "prefect")
    try:
        with local_cluster(2) as cluster:
            env = {**os.environ, "PYTHONPATH": str(ROOT), "PREFECT_API_URL": url,
                   "RADREPO_SECRET": TEST_SECRET, "PREFECT_LOGGING_LEVEL": "WARNING"}
            env.pop("RADREPO_KILL_AT", None)
            sources = scratch / "sources"
            synthesize(sources, sites=2, patients=1, seed=3, ct_slices=3, ct_size=16,
                       cr_size=16)
            scheduler = cluster.scheduler_address
            clean = scratch / "clean"
            started = time.monotonic()
            assert radrepo(env, "run", str(write_config(clean, sources, scheduler))
                           ).returncode == 0
            print(f"clean run: {time.monotonic() - started:.1f} s", flush=True)
            clean_release, clean_work = release_state(clean / "release"), work_state(
                clean / "work")

            parts = set(args.parts.split(","))
            for trial in range(args.trials if "concurrent" in parts else 0):
                folder = scratch / f"concurrent-{trial}"
                config = write_config(folder, sources, scheduler)
                offset = rng.uniform(0, args.max_offset)
                command = [sys.executable, "-c", "from flows.cli import main; main()", "run",
                           str(config)]
                runs = [subprocess.Popen(command, env=env, stdout=subprocess.PIPE,
                                         stderr=subprocess.PIPE, text=True)]
                time.sleep(offset)
                runs.append(subprocess.Popen(command, env=env, stdout=subprocess.PIPE,
                                             stderr=subprocess.PIPE, text=True))
                codes, lines = [], []
                for run in runs:
                    out, err = run.communicate(timeout=RUN_TIMEOUT)
                    codes.append(run.returncode)
                    tail = err.strip().splitlines()[-1:] if run.returncode else []
                    lines += tail
                    if run.returncode == 0 and "already published" in out:
                        lines.append("loser waited, then found the batches published")
                outcome = check(folder, clean_release, None)
                results["concurrent"].append({"trial": trial, "offset_s": round(offset, 2),
                                              "exit_codes": codes, "messages": lines,
                                              "outcome": outcome})
                print(f"concurrent trial {trial:2} offset {offset:4.1f} s exit codes {codes} "
                      f"{outcome}  {' | '.join(lines)}", flush=True)
                save(results)
            reference = scratch / "republished"
            shutil.copytree(clean, reference, ignore=shutil.ignore_patterns("radrepo.yaml"))
            assert radrepo(env, "run", str(write_config(reference, sources, scheduler,
                                                        **CHANGED)), "--force").returncode == 0
            republished = release_state(reference / "release")
            old_versions, new_versions = versions(clean), versions(reference)
            for point in REPUBLISH_POINTS if "republish" in parts else []:
                folder = scratch / f"force-{point.replace(':', '-')}"
                shutil.copytree(clean, folder, ignore=shutil.ignore_patterns("radrepo.yaml"))
                config = write_config(folder, sources, scheduler, **CHANGED)
                killed = radrepo(env, "run", str(config), "--force", kill_at=point).returncode
                whole = check(folder, release_state(folder / "release"), None)
                seen = Counter(
                    {old_versions.get(b): "old", new_versions.get(b): "new"}.get(m, "neither")
                    for b, m in versions(folder).items())
                version = ", ".join(f"{n} {v}" for v, n in sorted(seen.items()))
                rerun = radrepo(env, "run", str(config)).returncode
                outcome = check(folder, republished, None)
                results["republish_kills"].append({
                    "point": point, "killed_rc": killed, "batch_versions": version,
                    "readable_after_kill": whole, "rerun_rc": rerun, "outcome": outcome})
                print(f"--force kill at {point:16} batches: {version} ({whole}); rerun rc "
                      f"{rerun}  {outcome}", flush=True)
                save(results)

            for point in FIRST_RUN_POINTS + EXTRA_FIRST_RUN if "kills" in parts else []:
                folder = scratch / f"kill-{point.replace(':', '-').replace('#', '-')}"
                config = write_config(folder, sources, scheduler)
                killed = radrepo(env, "run", str(config), kill_at=point).returncode
                rerun = radrepo(env, "run", str(config)).returncode
                outcome = check(folder, clean_release, clean_work)
                results["kills"].append({"point": point, "killed_rc": killed,
                                         "rerun_rc": rerun, "outcome": outcome})
                print(f"kill at {point:22} killed rc {killed:3}  rerun rc {rerun}  {outcome}",
                      flush=True)
                save(results)

    finally:
        server.terminate()
        server.wait(timeout=30)
    save(results)
    failed = [r for group in results.values() for r in group if r["outcome"] != "ok"]
    print(f"{sum(len(g) for g in results.values())} trials, {len(failed)} failed")
    shutil.rmtree(scratch, ignore_errors=True)
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
