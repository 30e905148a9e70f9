"""Child processes end with radrepo, ``kill -9`` included: none is left behind to hold ports,
files or a database.

Linux delivers a signal to a child when its parent dies if the child asked for it
(``prctl(PR_SET_PDEATHSIG)``); radrepo's children ask for SIGKILL right after they are forked.
The temporary Prefect server (started when no PREFECT_API_URL is set) is started here, from the
main thread (Linux ties the signal to the thread that forked the child), before Prefect would
start one of its own. Dask's worker processes already end with their parent: each watches a
pipe the parent holds open.
"""

from __future__ import annotations

import ctypes
import os
import signal
import subprocess
import sys
import threading
from collections.abc import Callable
from typing import Any

PR_SET_PDEATHSIG = 1


def die_with_parent() -> Callable[[], None]:
    """A ``preexec_fn`` that has the child killed when this process ends (Linux); elsewhere it
    does nothing."""
    parent = os.getpid()
    if not sys.platform.startswith("linux"):
        return lambda: None
    libc = ctypes.CDLL(None, use_errno=True)

    def in_child() -> None:
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
        if os.getppid() != parent:  # the parent died before the request took effect
            os._exit(1)

    return in_child


class _DyingWithUs:
    """The ``subprocess`` module, but every Popen it starts dies with this process."""

    def __getattr__(self, name: str) -> Any:
        return getattr(subprocess, name)

    @staticmethod
    def Popen(*args: Any, **kwargs: Any) -> subprocess.Popen:  # noqa: N802 - as subprocess's
        return subprocess.Popen(*args, preexec_fn=die_with_parent(), **kwargs)


def start_temporary_prefect_server() -> None:
    """Start the temporary Prefect server a run without PREFECT_API_URL uses, as a child
    that dies with radrepo; Prefect then finds it running. Does nothing when a server is
    configured or the temporary server already runs."""
    from prefect.server.api import server as prefect_server
    from prefect.settings import PREFECT_API_URL, PREFECT_SERVER_EPHEMERAL_ENABLED

    if PREFECT_API_URL.value() or not PREFECT_SERVER_EPHEMERAL_ENABLED.value():
        return
    if threading.current_thread() is not threading.main_thread():
        raise RuntimeError("the temporary Prefect server must be started from the main thread")
    server = prefect_server.SubprocessASGIServer()  # the one instance Prefect will reuse
    if server.running:
        return
    prefect_server.subprocess = _DyingWithUs()
    try:
        server.start()
    finally:
        prefect_server.subprocess = subprocess
