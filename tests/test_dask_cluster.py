"""Dask by address: a real ``dask scheduler`` and two ``dask worker`` processes on loopback (not
a LocalCluster), the work folder shared; one worker is SIGKILLed while the batch's
de-identification tasks run, and the batch still publishes every study exactly once."""

from __future__ import annotations

import os
import signal
import threading
import time
from collections import Counter
from pathlib import Path

import duckdb
import pytest

from infra.services import ServiceUnavailable, dask_cluster
from tests.conftest import consortium_config
from tests.test_flow_e2e import expected_counts

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def dask_processes(tmp_path_factory):
    """Scheduler and two workers started by the operator's commands; yields the scheduler
    address and the worker services. Outside CI a cluster that cannot start skips."""
    try:
        with dask_cluster(2, tmp_path_factory.mktemp("dask"),
                          env={"PYTHONPATH": str(ROOT)}) as (scheduler, workers):
            yield scheduler.address, workers
    except ServiceUnavailable as err:
        if os.environ.get("CI") == "true":
            pytest.fail(f"the Dask cluster for the test cannot start: {err}")
        pytest.skip(f"the Dask cluster for the test cannot start: {err}")


@pytest.fixture(scope="module")
def big_site(tmp_path_factory):
    """One site with enough studies that de-identification takes a while on two workers."""
    from synth import synthesize

    out = tmp_path_factory.mktemp("dask-corpus")
    truth = synthesize(out, sites=1, patients=5, seed=11, ct_slices=16, ct_size=32, cr_size=48)
    return out, truth


def kill_a_worker_while_deidentifying(address: str, stop: threading.Event) -> int | None:
    """SIGKILL (by pid) the first worker seen running a de-identification task; its pid."""
    from distributed import Client

    with Client(address, timeout=60) as client:
        pids = client.run(os.getpid)  # worker address -> the worker process's pid
        while not stop.is_set():
            for worker, keys in client.processing().items():
                if any("process_unit" in str(key) for key in keys):
                    os.kill(pids[worker], signal.SIGKILL)
                    return pids[worker]
            time.sleep(0.05)
    return None


def test_a_worker_killed_mid_batch_loses_nothing_and_doubles_nothing(
        prefect_server, dask_processes, big_site, tmp_path):
    from flows.nightly import nightly
    from schemas.config import parse_config

    address, _ = dask_processes
    corpus_dir, truth = big_site
    config = parse_config(consortium_config(corpus_dir, truth, tmp_path / "release",
                                            tmp_path / "work", address), corpus_dir)
    stop, killed = threading.Event(), []

    def watch() -> None:
        try:
            killed.append(kill_a_worker_while_deidentifying(address, stop))
        except Exception as err:  # noqa: BLE001 - reported by the assertion below
            killed.append(err)

    killer = threading.Thread(target=watch)
    killer.start()
    try:
        summaries = nightly(config)
    finally:
        stop.set()
        killer.join()
    assert killed and isinstance(killed[0], int), f"no worker killed mid-batch: {killed}"

    [(site_id, want)] = expected_counts(truth).items()
    assert {s["status"] for s in summaries} == {"published"}
    assert sum(s["published"] for s in summaries) == want["published"]
    release = tmp_path / "release"
    with duckdb.connect(str(release / "catalog.duckdb"), read_only=True) as con:
        sops = [r[0] for r in con.sql("select sop_uid from instances").fetchall()]
        paths = {r[0] for r in con.sql("select path from instances").fetchall()}
        studies = con.sql("select batch_id, study_uid, n_instances from studies").fetchall()
    assert len(sops) == want["published"] and not [s for s, n in Counter(sops).items() if n > 1]
    on_disk = {str(p.relative_to(release)) for p in (release / "dicom").rglob("*.dcm")}
    assert on_disk == paths
    assert len({(batch, uid) for batch, uid, _ in studies}) == len(studies)
    assert sum(n for _, _, n in studies) == len(sops)
