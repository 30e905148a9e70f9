"""One writer per site: the work-folder lock between real processes, and the S3 lease on
moto's S3 server (conditional PUTs), each with a live holder, a dead one and an expired one."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tasks.site_lock import SiteBusy, hold
from tests.moto_s3 import moto_s3

HOLDER = """
import sys, time
from tasks.site_lock import hold
with hold(sys.argv[1], "site s1", "run-held", 0):
    print("held", flush=True)
    time.sleep(120)
"""


def holding_child(work: Path) -> subprocess.Popen:
    child = subprocess.Popen([sys.executable, "-c", HOLDER, str(work)], stdout=subprocess.PIPE,
                             text=True, env={**os.environ, "PYTHONPATH": str(
                                 Path(__file__).resolve().parents[1])})
    assert child.stdout.readline().strip() == "held"
    return child


def test_a_second_holder_waits_then_names_the_holder_and_a_killed_holder_frees_it(tmp_path):
    child = holding_child(tmp_path)
    try:
        started = time.monotonic()
        with pytest.raises(SiteBusy) as err, hold(str(tmp_path), "site s1", "run-2", 0.6):
            pass
        assert time.monotonic() - started >= 0.6
        message = str(err.value)
        assert "\n" not in message and message.startswith("site s1 is locked by another run")
        assert f"pid {child.pid}" in message and "run run-held" in message
        with hold(str(tmp_path), "site s2", "run-2", 0):  # another site is not held up
            pass
    finally:
        os.kill(child.pid, signal.SIGKILL)
        child.wait()
    with hold(str(tmp_path), "site s1", "run-2", 2) as holder:  # the dead holder's lock
        assert holder.pid == os.getpid()
        recorded = json.loads((tmp_path / "locks" / "site-s1.lock").read_text())
        assert recorded["run_id"] == "run-2" and recorded["pid"] == os.getpid()
        with hold(str(tmp_path), "site s1", "run-2", 0):  # the same thread passes through
            pass
    assert (tmp_path / "locks" / "site-s1.lock").read_text() == ""


@pytest.fixture(scope="module")
def s3(tmp_path_factory):
    """An s3fs filesystem on moto's S3 server (127.0.0.1) with a bucket for releases."""
    import s3fs

    with moto_s3() as endpoint:
        fs = s3fs.S3FileSystem(client_kwargs={"endpoint_url": endpoint},
                               skip_instance_cache=True)
        fs.mkdir("leases")
        yield fs


def test_s3_lease_is_exclusive_renewed_released_and_taken_over_once_expired(s3, tmp_path):
    path = "leases/release/locks/s1.lease"
    lease = {"lease_fs": s3, "lease_path": path}
    with hold(str(tmp_path / "w1"), "site s1", "run-1", 0, lease_seconds=6, **lease):
        first = json.loads(s3.cat_file(path))
        assert first["run_id"] == "run-1" and first["expires"] > time.time()
        # another machine (its own work folder) cannot take it while it is live
        with pytest.raises(SiteBusy) as err, hold(str(tmp_path / "w2"), "site s1", "run-2",
                                                   0.5, lease_seconds=6, **lease):
            pass
        assert "run run-1" in str(err.value)
        time.sleep(2.5)  # renewed every lease_seconds / 3
        assert json.loads(s3.cat_file(path))["expires"] > first["expires"]
    assert not s3.exists(path)  # released

    # a holder that died without releasing: its lease is taken over once it has expired
    s3.pipe_file(path, json.dumps({"host": "elsewhere", "pid": 1, "run_id": "run-dead",
                                   "since": "2026-01-01T00:00:00Z",
                                   "expires": time.time() + 1}).encode())
    with pytest.raises(SiteBusy) as err, hold(str(tmp_path / "w3"), "site s1", "run-3", 0,
                                              lease_seconds=6, **lease):
        pass
    assert "host elsewhere, pid 1, run run-dead" in str(err.value)
    with hold(str(tmp_path / "w3"), "site s1", "run-3", 5, lease_seconds=6, **lease):
        assert json.loads(s3.cat_file(path))["run_id"] == "run-3"

    # a holder on this host whose process is gone: taken over at once, expiry or not
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    s3.pipe_file(path, json.dumps({"host": socket.gethostname(), "pid": dead.pid,
                                   "run_id": "run-killed", "since": "2026-01-01T00:00:00Z",
                                   "expires": time.time() + 600}).encode())
    with hold(str(tmp_path / "w4"), "site s1", "run-4", 0, lease_seconds=6, **lease):
        assert json.loads(s3.cat_file(path))["run_id"] == "run-4"
