"""Operating radrepo as a service, with the README's own commands: a real ``prefect server``
subprocess, ``radrepo deploy``, a ``prefect worker start --pool radrepo`` subprocess, and the
deployments ``nightly/nightly`` and ``backfill/backfill`` triggered by ``prefect deployment run``.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import re
import subprocess
import time
from pathlib import Path

import duckdb
import pytest
import yaml

from flows.batch_report import artifact_key
from infra.services import BIN, ServiceUnavailable, prefect_server, prefect_worker
from tests.conftest import consortium_config
from tests.test_flow_e2e import expected_counts

ROOT = Path(__file__).resolve().parents[1]
BACKFILL_BATCH = "CXR-UPDATE-20200523"


@pytest.fixture(scope="module")
def prefect_api(tmp_path_factory):
    """A ``prefect server start`` subprocess of its own on loopback; yields its API URL.
    Outside CI a server that cannot start skips; in CI it fails."""
    home = tmp_path_factory.mktemp("prefect-home")
    try:
        with prefect_server(home) as server:
            yield server.address, home
    except ServiceUnavailable as err:
        if os.environ.get("CI") == "true":
            pytest.fail(f"the Prefect server for the test cannot start: {err}")
        pytest.skip(f"the Prefect server for the test cannot start: {err}")


def operator(argv: list[str], api_url: str, home: Path, cwd: Path) -> str:
    """Run one of the README's commands as an operator would, from the virtualenv's bin."""
    env = {**os.environ, "PREFECT_API_URL": api_url, "PREFECT_HOME": str(home),
           "PYTHONPATH": str(ROOT), "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}
    done = subprocess.run([str(BIN / argv[0]), *argv[1:]], capture_output=True, text=True,
                          env=env, cwd=cwd, timeout=300)
    assert done.returncode == 0, f"{argv}: {done.stdout}\n{done.stderr}"
    return done.stdout + done.stderr


def flow_run_id(output: str) -> str:
    found = re.search(r"UUID:\s*([0-9a-f-]{36})", output)
    assert found, output
    return found.group(1)


async def wait_for_final_state(api_url: str, run_id: str, timeout: float = 600):
    from prefect.client.orchestration import PrefectClient

    async with PrefectClient(api_url) as client:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            run = await client.read_flow_run(run_id)
            if run.state and run.state.is_final():
                children = await client.read_flow_runs()
                return run, [r for r in children if r.parent_task_run_id is not None]
            await asyncio.sleep(1)
    raise AssertionError(f"flow run {run_id} not finished after {timeout:.0f} s")


async def read_deployment(api_url: str, name: str):
    from prefect.client.orchestration import PrefectClient

    async with PrefectClient(api_url) as client:
        return await client.read_deployment_by_name(name)


async def read_batch_reports(api_url: str) -> dict[str, str]:
    from prefect.client.orchestration import PrefectClient

    async with PrefectClient(api_url) as client:
        return {a.key: a.data for a in await client.read_artifacts()
                if a.key and a.key.startswith("batch-")}


def assert_report(markdown: str, release: Path, site_id: str, batch_id: str) -> None:
    """The artifact's counts are the batch's run record; its steps and contact sheet exist."""
    import pyarrow.parquet as pq

    [run] = pq.read_table(release / f"catalog/runs/site_id={site_id}/batch_id={batch_id}"
                          ).to_pylist()
    counts = json.loads(run["counts"])
    for key in ("files_in", "published", "excluded", "quarantined"):
        assert f"| {key.replace('_', ' ')} | {counts[key]} |" in markdown
    for reason, n in {**counts["excluded_by_reason"], **counts["quarantined_by_reason"]}.items():
        assert f"| {reason} | {n} |" in markdown
    steps = dict(re.findall(r"^\| (\w+) \| (\d+\.\d\d) \|$", markdown, re.M))
    assert {"ingest", "deidentify", "qc", "verify", "publish"} <= set(steps)
    [sheet] = re.findall(r"`([^`]+\.html)` in the release", markdown)
    assert (release / sheet).is_file()


def tree(root: Path, prefix: str) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted((root / prefix).rglob("*")) if p.is_file()}


def test_deploy_then_worker_runs_nightly_and_backfill(prefect_api, corpus, dask_scheduler,
                                                      tmp_path, secret_env):
    api_url, home = prefect_api
    corpus_dir, truth = corpus
    raw = consortium_config(corpus_dir, truth, tmp_path / "release", tmp_path / "work",
                            dask_scheduler)
    raw["schedule"] = {"cron": "0 2 * * *", "timezone": "America/New_York"}
    config = tmp_path / "consortium.yaml"
    config.write_text(yaml.safe_dump(raw))

    said = operator(["radrepo", "deploy", str(config)], api_url, home, tmp_path)
    assert "deployment nightly/nightly: 0 2 * * * in America/New_York" in said
    assert "deployment backfill/backfill: on demand" in said
    nightly = asyncio.run(read_deployment(api_url, "nightly/nightly"))
    backfill = asyncio.run(read_deployment(api_url, "backfill/backfill"))
    assert nightly.work_pool_name == backfill.work_pool_name == "radrepo"
    [schedule] = nightly.schedules
    assert (schedule.schedule.cron, schedule.schedule.timezone) == ("0 2 * * *",
                                                                    "America/New_York")
    assert nightly.parameters == backfill.parameters == {"config_path": str(config)}
    assert set(backfill.parameter_openapi_schema["properties"]) == {
        "config_path", "sites", "batches", "since", "until"}
    again = operator(["radrepo", "deploy", str(config)], api_url, home, tmp_path)
    assert again == said  # deploying twice updates, never duplicates

    worker_env = {"PYTHONPATH": str(ROOT), "RADREPO_SECRET": secret_env}
    with prefect_worker(api_url, home, "radrepo", worker_env):
        run_id = flow_run_id(operator(["prefect", "deployment", "run", "nightly/nightly"],
                                      api_url, home, tmp_path))
        run, children = asyncio.run(wait_for_final_state(api_url, run_id))
        assert run.state.is_completed(), run.state.message
        release = tmp_path / "release"
        complete = sorted(str(p.parent.relative_to(release / "batches"))
                          for p in (release / "batches").rglob("COMPLETE"))
        with duckdb.connect(str(release / "catalog.duckdb"), read_only=True) as con:
            per_site = dict(con.sql("select site_id, count(*) from instances group by 1")
                            .fetchall())
        assert per_site == {k: v["published"] for k, v in expected_counts(truth).items()}
        zip_site = next(k for k, v in truth["sites"].items() if v["layout"] == "zip_batches")
        assert {f"{zip_site}/{b}" for b, info in truth["sites"][zip_site]["batches"].items()
                if info["complete"]} <= set(complete)
        assert {c.split("/")[0] for c in complete} == set(truth["sites"])
        assert sorted(r.name for r in children if r.flow_id != run.flow_id) == complete
        site_runs = [r for r in children if r.name in complete]
        assert all(set(r.parameters) == {"config", "site_id", "batch_id", "force", "scheduler"}
                   and r.parameters["config"] == str(config) for r in site_runs)
        assert run.parameters == {"config_path": str(config)}
        reports = asyncio.run(read_batch_reports(api_url))
        assert sorted(reports) == sorted(artifact_key(*c.split("/")) for c in complete)
        for c in complete:
            site_id, batch_id = c.split("/")
            assert_report(reports[artifact_key(site_id, batch_id)], release, site_id, batch_id)
        catalog_before = tree(release, "catalog/instances")
        runs_before = set(tree(release, "catalog/runs"))

        run_id = flow_run_id(operator(
            ["prefect", "deployment", "run", "backfill/backfill", "--param",
             f'batches=["{BACKFILL_BATCH}"]'], api_url, home, tmp_path))
        run, _ = asyncio.run(wait_for_final_state(api_url, run_id))
        assert run.state.is_completed(), run.state.message
    assert tree(release, "catalog/instances") == catalog_before
    added = set(tree(release, "catalog/runs")) - runs_before
    assert len(added) == 1
    assert all(f"batch_id={BACKFILL_BATCH}/" in path for path in added)


def test_a_normal_run_prints_a_short_summary(prefect_api, corpus, dask_scheduler, tmp_path):
    """``radrepo run`` on three sites: the summary table and notes, at most 15 lines, and no
    Prefect or Dask chatter (no dashboard is claimed: there is none)."""
    api_url, home = prefect_api
    corpus_dir, truth = corpus
    config = tmp_path / "consortium.yaml"
    config.write_text(yaml.safe_dump(consortium_config(
        corpus_dir, truth, tmp_path / "release", tmp_path / "work", dask_scheduler)))
    output = operator(["radrepo", "run", str(config)], api_url, home, tmp_path)
    lines = output.splitlines()
    assert 3 <= len(lines) <= 15, output
    assert "published" in output and "dashboard" not in output
    assert not [line for line in lines if " | INFO " in line or "distributed." in line]


def test_progress_bars_show_on_a_terminal(prefect_api, corpus, dask_scheduler, tmp_path):
    """On a terminal (a pty), ``radrepo run`` shows discovery, de-identification (files done of
    total, files/s) and publication bars; in a pipe (above) it does not."""
    import pty

    api_url, home = prefect_api
    corpus_dir, truth = corpus
    flat_id, flat = next((k, v) for k, v in truth["sites"].items() if v["layout"] == "flat")
    controller, terminal = pty.openpty()
    env = {**os.environ, "PREFECT_API_URL": api_url, "PREFECT_HOME": str(home),
           "PYTHONPATH": str(ROOT), "COLUMNS": "160"}
    process = subprocess.Popen(
        [str(BIN / "radrepo"), "run", "--source", f"{flat_id}={corpus_dir / flat['source']}",
         "--release", str(tmp_path / "release"), "--work", str(tmp_path / "work")],
        stdin=terminal, stdout=terminal, stderr=terminal, env=env, cwd=tmp_path)
    os.close(terminal)
    seen = b""
    try:
        while True:
            try:
                chunk = os.read(controller, 65536)
            except OSError:  # the terminal closed: the process is done
                break
            if not chunk:
                break
            seen += chunk
        assert process.wait(timeout=300) == 0, seen.decode(errors="replace")
    finally:
        if process.poll() is None:
            process.kill()
        os.close(controller)
    text = re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", seen.decode(errors="replace"))
    assert "discovery (sites)" in text and "publication (batches)" in text
    files = [(int(a), int(b)) for a, b in re.findall(
        r"de-identification \(files\)\W*(\d+)/(\d+)", text)]
    total = max(b for _, b in files)
    assert total >= len(flat["files"]) // 2 and (total, total) in files, text[-2000:]
    assert re.search(r"\d+ files/s", text)
    assert "published" in text
