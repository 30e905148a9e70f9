"""No orphans: ``kill -9`` of a running ``radrepo run`` takes its temporary Prefect server and
its Dask workers with it."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import yaml

from tests.conftest import TEST_SECRET, consortium_config

REPO = Path(__file__).resolve().parent.parent


def _alive(proc: psutil.Process) -> bool:
    try:
        return proc.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def _kinds(children: list[psutil.Process]) -> dict[str, list[psutil.Process]]:
    """The run's children by what they are: the uvicorn Prefect server, Dask worker processes."""
    kinds: dict[str, list[psutil.Process]] = {"prefect server": [], "dask worker": []}
    for child in children:
        try:
            cmd = " ".join(child.cmdline())
        except psutil.NoSuchProcess:
            continue
        if "uvicorn" in cmd and "prefect.server.api.server:create_app" in cmd:
            kinds["prefect server"].append(child)
        elif "multiprocessing" in cmd and "spawn_main" in cmd:
            kinds["dask worker"].append(child)
    return kinds


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux's")
def test_kill_9_of_radrepo_leaves_no_child_running(corpus, tmp_path):
    corpus_dir, truth = corpus
    cfg = consortium_config(corpus_dir, truth, tmp_path / "release", tmp_path / "work")
    cfg["dask"] = {"workers": 2}
    (tmp_path / "radrepo.yaml").write_text(yaml.safe_dump(cfg))
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_API")}
    env.update(PYTHONPATH=str(REPO), RADREPO_SECRET=TEST_SECRET)
    run = subprocess.Popen(
        [sys.executable, "-c", "from flows.cli import main; main()", "run",
         str(tmp_path / "radrepo.yaml")], cwd=tmp_path, env=env,
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    seen: set[psutil.Process] = set()
    try:
        parent = psutil.Process(run.pid)
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline and run.poll() is None:
            seen.update(parent.children(recursive=True))
            kinds = _kinds(list(seen))
            if kinds["prefect server"] and len(kinds["dask worker"]) >= 2:
                break
            time.sleep(0.1)
        assert run.poll() is None, "the run ended before its children were all seen"
        assert kinds["prefect server"] and kinds["dask worker"], kinds
        seen.update(parent.children(recursive=True))
        os.kill(run.pid, signal.SIGKILL)
        run.wait(timeout=30)
        gone_by = time.monotonic() + 20
        while time.monotonic() < gone_by and any(_alive(p) for p in seen):
            time.sleep(0.2)
        survivors = [" ".join(p.cmdline())[:120] for p in seen if _alive(p)]
        assert not survivors, survivors
    finally:
        for proc in [*seen, psutil.Process(run.pid) if run.poll() is None else None]:
            if proc is not None and _alive(proc):
                proc.kill()
