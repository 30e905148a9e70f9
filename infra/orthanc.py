"""A throwaway Orthanc PACS on 127.0.0.1 for the tests and benchmarks.

Debian's ``orthanc`` and ``orthanc-dicomweb`` (installed by infra/install-services.sh) run with
their own configuration, storage and free ports. Orthanc 1.10 has no bind-address option, so
``loopback_bind.c`` is preloaded to turn its wildcard binds into loopback ones, and the start
fails unless every socket it listens on is on loopback.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx

HERE = Path(__file__).resolve().parent
PLUGIN_DIR = Path("/usr/share/orthanc/plugins")
DICOMWEB_PLUGIN = PLUGIN_DIR / "libOrthancDicomWeb.so"
LOOPBACK = {"0100007F", "00000000000000000000000001000000"}
LISTEN = "0A"


class OrthancUnavailable(RuntimeError):
    """Orthanc is not installed here, or did not start."""


@dataclass(frozen=True)
class Orthanc:
    http_port: int
    dicom_port: int
    aet: str
    pid: int = 0
    username: str | None = None
    password: str | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    @property
    def dicomweb(self) -> str:
        return f"{self.url}/dicom-web"

    def client(self) -> httpx.Client:
        auth = (self.username, self.password) if self.username else None
        return httpx.Client(base_url=self.url, auth=auth, timeout=60)

    def upload(self, paths: list[Path]) -> dict[Path, str]:
        """POST each file to /instances; the status Orthanc gave each ('Success',
        'AlreadyStored', or 'Rejected' when it refused the file)."""
        statuses = {}
        with self.client() as http:
            for path in paths:
                reply = http.post("/instances", content=path.read_bytes())
                statuses[path] = reply.json().get("Status", "Rejected") if reply.is_success \
                    else "Rejected"
        return statuses

    def delete_instance(self, sop_uid: str) -> None:
        """Remove one stored instance, as a PACS may between a query and a retrieve."""
        with self.client() as http:
            [found] = [f for f in http.post("/tools/lookup", content=sop_uid).json()
                       if f["Type"] == "Instance"]
            http.delete(f"/instances/{found['ID']}").raise_for_status()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def loopback_shim(folder: Path) -> Path:
    """Build the preload library that keeps a server's wildcard binds on loopback."""
    shim = folder / "loopback_bind.so"
    subprocess.run(["gcc", "-shared", "-fPIC", "-O2", "-o", str(shim),
                    str(HERE / "loopback_bind.c"), "-ldl"], check=True, capture_output=True)
    return shim


def listening_addresses(pid: int) -> list[str]:
    """The local addresses (hex, as /proc/net/tcp* shows them) of the process's listening
    TCP sockets."""
    inodes = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            target = os.readlink(fd)
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[8:-1])
    found = []
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            if fields[3] == LISTEN and fields[9] in inodes:
                found.append(fields[1])
    return found


@contextmanager
def run_orthanc(folder: Path, move_destinations: dict[str, int] | None = None,
                username: str | None = None, password: str | None = None) -> Iterator[Orthanc]:
    """Start Orthanc with storage under ``folder``; ``move_destinations`` maps AE titles to
    ports on 127.0.0.1 that it may C-MOVE to. Raises OrthancUnavailable when it cannot start."""
    binary = shutil.which("Orthanc") or shutil.which("Orthanc", path="/usr/sbin")
    if not binary or not DICOMWEB_PLUGIN.exists():
        raise OrthancUnavailable("Orthanc with its DICOMweb plugin is not installed "
                                 "(infra/install-services.sh installs it)")
    folder.mkdir(parents=True, exist_ok=True)
    server = Orthanc(http_port=free_port(), dicom_port=free_port(), aet="ORTHANC",
                     username=username, password=password)
    config = {
        "Name": "radrepo-test-pacs",
        "StorageDirectory": str(folder / "storage"),
        "IndexDirectory": str(folder / "storage"),
        "HttpPort": server.http_port,
        "DicomPort": server.dicom_port,
        "DicomAet": server.aet,
        "RemoteAccessAllowed": False,
        "AuthenticationEnabled": bool(username),
        "RegisteredUsers": {username: password} if username else {},
        "DicomModalities": {aet.lower(): [aet, "127.0.0.1", port]
                            for aet, port in (move_destinations or {}).items()},
        "Plugins": [str(DICOMWEB_PLUGIN)],
        "DicomWeb": {"Enable": True, "Root": "/dicom-web/"},
        "StorageCompression": False,
        "LimitFindResults": 0,
        "LimitFindInstances": 0,
    }
    config_path = folder / "orthanc.json"
    config_path.write_text(json.dumps(config, indent=1))
    log = (folder / "orthanc.log").open("wb")
    env = {**os.environ, "LD_PRELOAD": str(loopback_shim(folder))}
    process = subprocess.Popen([binary, str(config_path)], stdout=log, stderr=subprocess.STDOUT,
                               env=env, cwd=folder)
    server = dataclasses.replace(server, pid=process.pid)
    try:
        _wait_until_up(server, process, folder / "orthanc.log")
        exposed = [a for a in listening_addresses(process.pid)
                   if a.split(":")[0] not in LOOPBACK]
        if exposed:
            raise OrthancUnavailable(f"Orthanc listens beyond loopback: {exposed}")
        yield server
    finally:
        process.terminate()
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        log.close()


def _wait_until_up(server: Orthanc, process: subprocess.Popen, log: Path,
                   timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    with server.client() as http:
        while time.monotonic() < deadline:
            if process.poll() is not None:
                tail = log.read_text(errors="replace")[-2000:]
                raise OrthancUnavailable(f"Orthanc exited with code {process.returncode}:\n{tail}")
            try:
                if http.get("/system").is_success:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.2)
    raise OrthancUnavailable(f"Orthanc did not answer on port {server.http_port} in {timeout} s")
