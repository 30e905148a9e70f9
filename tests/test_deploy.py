"""Operating radrepo as a service, with the README's own commands: a real ``prefect server``
subprocess, ``radrepo deploy``, a ``prefect worker start --pool radrepo`` subprocess, and the
deployments ``nightly/nightly`` and ``backfill/backfill`` triggered by ``prefect deployment run``.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import re
import subprocess
import time
from pathlib import Path

import duckdb
import pytest
import yaml

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
