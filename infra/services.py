"""Real service processes on 127.0.0.1 for the tests and benchmarks: a Prefect server, a Prefect
process worker, a Dask scheduler and Dask workers, each started with the same command an
operator types (``prefect server start``, ``prefect worker start``, ``dask scheduler``,
``dask worker``) and stopped, with everything it spawned, when the block ends.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from infra.orthanc import free_port

BIN = Path(sys.executable).parent  # the virtualenv's bin: prefect, dask, radrepo


class ServiceUnavailable(RuntimeError):
    """A service process did not start (or not in time)."""


@dataclass
class Service:
    name: str
    process: subprocess.Popen
    log: Path
    address: str = ""
    extra: dict = field(default_factory=dict)

    def tail(self, lines: int = 30) -> str:
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])


def start(name: str, argv: list[str], log: Path, env: dict[str, str] | None = None,
          cwd: Path | None = None) -> Service:
    """Start ``argv`` in its own process group, output to ``log``."""
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("ab") as out:
        process = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, cwd=cwd,
                                   env={**os.environ, **(env or {})}, start_new_session=True)
    return Service(name, process, log)


def stop(service: Service, timeout: float = 15) -> None:
    """End the service's process group: SIGTERM, then SIGKILL after ``timeout`` seconds."""
    if service.process.poll() is None:
        try:
            os.killpg(service.process.pid, signal.SIGTERM)
            service.process.wait(timeout)
        except subprocess.TimeoutExpired:
            pass
        except ProcessLookupError:
            return
    with suppress(ProcessLookupError):
        os.killpg(service.process.pid, signal.SIGKILL)  # stragglers in its group
    service.process.wait()


def wait_until(service: Service, ready, timeout: float) -> None:
    """Poll ``ready()`` until true; fail with the log's tail if the process dies or time ends."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if service.process.poll() is not None:
            raise ServiceUnavailable(f"{service.name} exited with {service.process.returncode}:"
                                     f"\n{service.tail()}")
        try:
            if ready():
                return
        except (httpx.HTTPError, OSError):
            pass
        time.sleep(0.5)
    raise ServiceUnavailable(f"{service.name} not ready after {timeout:.0f} s:\n{service.tail()}")


def prefect_env(home: Path, api_url: str | None = None) -> dict[str, str]:
    """Settings for a Prefect process of its own: home, no analytics, quiet console."""
    env = {"PREFECT_HOME": str(home), "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
           "PREFECT_LOGGING_LEVEL": "WARNING"}
    if api_url:
        env["PREFECT_API_URL"] = api_url
    return env


@contextmanager
def prefect_server(home: Path, timeout: float = 180) -> Iterator[Service]:
    """``prefect server start`` on a free loopback port; ``address`` is its API URL."""
    port = free_port()
    url = f"http://127.0.0.1:{port}/api"
    service = start("prefect server", [str(BIN / "prefect"), "server", "start", "--host",
                                       "127.0.0.1", "--port", str(port), "--no-ui"],
                    home / "server.log", prefect_env(home))
    service.address = url
    try:
        wait_until(service, lambda: httpx.get(f"{url}/health", timeout=2).status_code == 200,
                   timeout)
        yield service
    finally:
        stop(service)


@contextmanager
def prefect_worker(api_url: str, home: Path, pool: str, env: dict[str, str] | None = None,
                   log: Path | None = None) -> Iterator[Service]:
    """``prefect worker start --pool POOL`` against ``api_url``, polling every 2 s."""
    service = start("prefect worker", [str(BIN / "prefect"), "worker", "start", "--pool", pool],
                    log or home / "worker.log",
                    {**prefect_env(home, api_url), "PREFECT_WORKER_QUERY_SECONDS": "2",
                     "PREFECT_WORKER_PREFETCH_SECONDS": "2", **(env or {})})
    try:
        yield service
    finally:
        stop(service)


@contextmanager
def dask_cluster(workers: int, local_dir: Path, timeout: float = 90,
                 env: dict[str, str] | None = None) -> Iterator[tuple[Service, list[Service]]]:
    """``dask scheduler`` and ``workers`` x ``dask worker`` (one process, one thread each) on
    loopback; the scheduler's ``address`` is its tcp:// address."""
    from distributed import Client

    port = free_port()
    address = f"tcp://127.0.0.1:{port}"
    scheduler = start("dask scheduler", [str(BIN / "dask"), "scheduler", "--host", "127.0.0.1",
                                         "--port", str(port), "--no-dashboard"],
                      local_dir / "scheduler.log", env)
    scheduler.address = address
    started = [scheduler]
    try:
        wait_until(scheduler, lambda: _accepts(port), timeout)
        for n in range(workers):
            started.append(start(f"dask worker {n}", [
                str(BIN / "dask"), "worker", address, "--host", "127.0.0.1", "--nworkers", "1",
                "--nthreads", "1", "--no-dashboard", "--name", f"worker-{n}",
                "--local-directory", str(local_dir / f"worker-{n}")],
                local_dir / f"worker-{n}.log", env))
        with Client(address, timeout=timeout) as client:
            client.wait_for_workers(workers, timeout=timeout)
        yield scheduler, started[1:]
    finally:
        for service in reversed(started):
            stop(service)


def _accepts(port: int) -> bool:
    import socket

    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0
