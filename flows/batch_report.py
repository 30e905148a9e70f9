"""What an operator reads about one batch in Prefect: a markdown artifact with the counts by
outcome, exclusions and quarantine by reason (radrepo's own words), seconds per step and where
the contact sheet is. It quotes ids and counts only, never a header value or a source path."""

from __future__ import annotations

import functools
import re
import time
from collections.abc import Callable
from contextvars import ContextVar
from typing import Any

from prefect.artifacts import create_markdown_artifact

STEP_SECONDS: ContextVar[dict[str, float] | None] = ContextVar("step_seconds", default=None)


def timed(name: str, fn: Callable) -> Callable:
    """``fn``, adding its wall-clock seconds under ``name`` to the current batch's clock."""
    @functools.wraps(fn)
    def run(*args: Any, **kwargs: Any) -> Any:
        started = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            seconds = STEP_SECONDS.get()
            if seconds is not None:
                seconds[name] = seconds.get(name, 0.0) + time.perf_counter() - started
    return run


def artifact_key(site_id: str, batch_id: str) -> str:
    """A Prefect artifact key (lowercase letters, digits, dashes) for one batch."""
    return re.sub(r"[^a-z0-9-]+", "-", f"batch-{site_id}-{batch_id}".lower()).strip("-")


def batch_markdown(site_id: str, batch_id: str, counts: dict, seconds: dict[str, float],
                   reports: list[str], wall_seconds: float) -> str:
    """The batch's report as markdown."""
    lines = [f"# {site_id} / {batch_id}", "", "| outcome | files |", "| --- | ---: |"]
    lines += [f"| {k.replace('_', ' ')} | {counts.get(k, 0)} |"
              for k in ("files_in", "published", "excluded", "quarantined",
                        "skipped_already_ingested")]
    for title, key in (("Excluded", "excluded_by_reason"),
                       ("Quarantined", "quarantined_by_reason")):
        reasons = counts.get(key) or {}
        lines += ["", f"## {title} by reason", ""]
        lines += (["| reason | files |", "| --- | ---: |"]
                  + [f"| {reason.replace('|', '/')} | {n} |" for reason, n in reasons.items()]
                  if reasons else ["none"])
    lines += ["", "## Seconds per step", "", "| step | s |", "| --- | ---: |"]
    lines += [f"| {name} | {s:.2f} |" for name, s in seconds.items()]
    lines += ["", f"Whole batch: {wall_seconds:.2f} s, of which {sum(seconds.values()):.2f} s "
              "in the steps above; the rest is orchestration."]
    sheet = [r for r in reports if r.endswith(".html")]
    lines += ["", "## Contact sheet", "",
              f"`{sheet[0]}` in the release" if sheet else "none (nothing published)"]
    return "\n".join(lines) + "\n"


def publish_report(site_id: str, batch_id: str, counts: dict, seconds: dict[str, float],
                   reports: list[str], wall_seconds: float) -> None:
    """Attach the batch's report to the running flow as a markdown artifact."""
    create_markdown_artifact(
        batch_markdown(site_id, batch_id, counts, seconds, reports, wall_seconds),
        key=artifact_key(site_id, batch_id),
        description=f"radrepo batch report: {site_id} {batch_id}")
