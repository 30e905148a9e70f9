"""One writer per site: a lock in the work folder, and a lease in an object-store release.

The work-folder lock is an ``flock`` on ``<work_dir>/locks/<name>.lock``; the kernel drops it
when its holder dies (``kill -9`` included), so a dead holder's lock is taken over at once.
The holder (host, pid, run id) is written into the file for the message a waiting run prints.

A release on object storage may be written from machines that share no work folder, so
there the lock is also a lease object ``locks/<name>.lease`` in the release: created with a
conditional PUT (``If-None-Match: *``), renewed and taken over only by a PUT conditional on
the ETag read (``If-Match``), and taken over once its expiry has passed or when its holder
was a process of this host that is gone. Residual risk: a
store that ignores conditional headers turns this into last-writer-wins (the holder is read
back after writing to narrow the window), and a holder paused longer than the lease
(``lease_seconds``) can lose it while still writing.
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path

POLL_SECONDS = 0.2
_held: dict[tuple[str, str, int], int] = {}
_held_guard = threading.Lock()


class SiteBusy(RuntimeError):
    """Another run holds the lock; the message names the lock and the holder in one line."""


@dataclass(frozen=True)
class Holder:
    host: str
    pid: int
    run_id: str
    since: str

    def describe(self) -> str:
        return f"host {self.host}, pid {self.pid}, run {self.run_id}, since {self.since}"


def this_holder(run_id: str) -> Holder:
    return Holder(socket.gethostname(), os.getpid(), run_id,
                  datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"))


def _read_holder(text: str) -> Holder | None:
    try:
        raw = json.loads(text)
        return Holder(str(raw["host"]), int(raw["pid"]), str(raw["run_id"]), str(raw["since"]))
    except (ValueError, KeyError, TypeError):
        return None


def _busy(name: str, holder: Holder | None, waited: float) -> SiteBusy:
    who = holder.describe() if holder else "holder unknown"
    return SiteBusy(f"{name} is locked by another run ({who}); gave up after waiting "
                    f"{waited:.0f} s")


@contextmanager
def _flock(path: Path, name: str, holder: Holder, wait_seconds: float) -> Iterator[None]:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        deadline = time.monotonic() + wait_seconds
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    raise _busy(name, _read_holder(path.read_text()), wait_seconds) from None
                time.sleep(POLL_SECONDS)
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(asdict(holder)).encode(), 0)
        try:
            yield
        finally:
            os.ftruncate(fd, 0)
            fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)


def _stale(raw: dict) -> bool:
    """A lease past its expiry, or held by a process of this host that is gone."""
    if float(raw.get("expires", 0)) < time.time():
        return True
    if raw.get("host") != socket.gethostname():
        return False
    try:
        os.kill(int(raw.get("pid", 0)), 0)
    except ProcessLookupError:
        return True
    except (PermissionError, ValueError, OverflowError):
        return False
    return False


class Lease:
    """A lease object with an expiry in an fsspec filesystem that has conditional PUTs."""

    def __init__(self, fs, path: str, name: str, holder: Holder, lease_seconds: float):
        self.fs, self.path, self.name = fs, path, name
        self.holder, self.lease_seconds = holder, lease_seconds
        self.etag: str | None = None
        self._stop = threading.Event()

    def _body(self) -> bytes:
        return json.dumps({**asdict(self.holder),
                           "expires": time.time() + self.lease_seconds}).encode()

    def _current(self) -> tuple[dict | None, str | None]:
        self.fs.invalidate_cache(self.path)
        try:
            info = self.fs.info(self.path)
            with self.fs.open(self.path, "rb") as fh:
                return json.loads(fh.read()), info.get("ETag")
        except FileNotFoundError:
            return None, None
        except ValueError:  # unreadable lease: treat as expired
            return {"expires": 0}, self.fs.info(self.path).get("ETag")

    def _put(self, etag: str | None) -> bool:
        """Create (no etag) or replace the lease seen with ``etag``; False if beaten to it."""
        try:
            if etag is None:
                out = self.fs.pipe_file(self.path, self._body(), mode="create")
            else:
                out = self.fs.pipe_file(self.path, self._body(), IfMatch=etag)
        except OSError:
            return False
        mine, seen = self._current()
        if mine is None or _read_holder(json.dumps(mine)) != self.holder:
            return False
        self.etag = (out or {}).get("ETag") if isinstance(out, dict) else None
        self.etag = self.etag or seen
        return True

    def acquire(self, wait_seconds: float) -> None:
        deadline = time.monotonic() + wait_seconds
        while True:
            raw, etag = self._current()
            if raw is None and self._put(None):
                break
            if raw is not None and _stale(raw) and self._put(etag):
                break
            if time.monotonic() >= deadline:
                raw, _ = self._current()
                holder = _read_holder(json.dumps(raw)) if raw else None
                raise _busy(self.name, holder, wait_seconds)
            time.sleep(POLL_SECONDS)
        threading.Thread(target=self._renew, daemon=True, name=f"lease-{self.name}").start()

    def _renew(self) -> None:
        while not self._stop.wait(self.lease_seconds / 3):
            if not self._put(self.etag):  # taken over after expiring: stop renewing
                return

    def release(self) -> None:
        self._stop.set()
        raw, _ = self._current()
        if raw is not None and _read_holder(json.dumps(raw)) == self.holder:
            self.fs.rm_file(self.path)


@contextmanager
def hold(work_dir: str, name: str, run_id: str, wait_seconds: float,
         lease_fs=None, lease_path: str | None = None,
         lease_seconds: float = 300.0) -> Iterator[Holder]:
    """Hold the lock ``name`` (and the lease at ``lease_path``, if given) for the block.

    Waits up to ``wait_seconds`` for another holder, then raises SiteBusy naming it. The same
    thread taking a lock it already holds passes straight through (a flow holding a site's
    lock can call one that takes it again)."""
    key = (str(Path(work_dir).resolve()), name, threading.get_ident())
    with _held_guard:
        depth = _held.get(key, 0)
        _held[key] = depth + 1
    try:
        holder = this_holder(run_id)
        if depth:
            yield holder
            return
        lock_file = Path(work_dir) / "locks" / f"{name.replace(' ', '-')}.lock"
        with _flock(lock_file, name, holder, wait_seconds):
            lease = None
            if lease_fs is not None and lease_path is not None:
                lease = Lease(lease_fs, lease_path, name, holder, lease_seconds)
                lease.acquire(wait_seconds)
            try:
                yield holder
            finally:
                if lease is not None:
                    lease.release()
    finally:
        with _held_guard:
            _held[key] -= 1
            if not _held[key]:
                del _held[key]
