"""Named points between steps where a fault-injection test can kill the process outright.

``RADREPO_KILL_AT=<point>`` makes the process SIGKILL itself the first time it reaches that
point, ``<point>#<n>`` the n-th time, as a power cut or an OOM kill would: no cleanup handler,
``finally`` block or Prefect hook runs. Recovery tests use it to prove that a plain rerun
repairs a crash at every boundary.
"""

from __future__ import annotations

import os
import signal
from collections import Counter

KILL_AT = "RADREPO_KILL_AT"
POINTS = (
    "after:ingest", "after:deidentify", "after:verify", "publish:manifest", "publish:files",
    "publish:placed", "publish:complete", "after:catalog", "after:superseded", "after:ledger",
    "cleanup:manifest",
)
_reached: Counter[str] = Counter()


def kill_point(name: str) -> None:
    """Die here, at once, when ``RADREPO_KILL_AT`` names this point (and this time)."""
    wanted = os.environ.get(KILL_AT)
    if not wanted:
        return
    point, _, nth = wanted.partition("#")
    if point != name:
        return
    _reached[name] += 1
    if _reached[name] == int(nth or 1):
        os.kill(os.getpid(), signal.SIGKILL)
