"""The CLI's progress bars, on a terminal only: discovery (sites), de-identification (files,
files/s) and publication (batches). Flows report through ``current()``, which is None unless
the CLI opened bars around the run."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TaskProgressColumn,
    TextColumn,
    TimeElapsedColumn,
)

_CURRENT: ContextVar[RunProgress | None] = ContextVar("radrepo_progress", default=None)


class RunProgress:
    """Three bars; every method may be called from any of the run's threads."""

    def __init__(self, bars: Progress, sites: int):
        self._bars, self._lock = bars, threading.Lock()
        self._sites = bars.add_task("discovery (sites)", total=sites, rate="")
        self._files = bars.add_task("de-identification (files)", total=0, rate="")
        self._batches = bars.add_task("publication (batches)", total=0, rate="")

    def discovered(self, batches: int) -> None:
        with self._lock:
            self._bars.advance(self._sites)
            self._bars.update(self._batches, total=self._total(self._batches) + batches)

    def files_found(self, n: int) -> None:
        with self._lock:
            self._bars.update(self._files, total=self._total(self._files) + n)

    def files_done(self, n: int) -> None:
        with self._lock:
            self._bars.advance(self._files, n)
            task = self._bars.tasks[self._files]
            if task.elapsed:
                self._bars.update(self._files, rate=f"{task.completed / task.elapsed:.0f} files/s")

    def published(self) -> None:
        with self._lock:
            self._bars.advance(self._batches)

    def _total(self, task_id) -> float:
        return self._bars.tasks[task_id].total or 0


def current() -> RunProgress | None:
    """The bars of the run in progress, if the CLI opened any."""
    return _CURRENT.get()


@contextmanager
def progress_bars(console: Console, sites: int) -> Iterator[None]:
    """Bars on ``console`` for the duration of the block, if it is a terminal."""
    if not console.is_terminal:
        yield
        return
    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                  TaskProgressColumn(), TextColumn("{task.fields[rate]}"), TimeElapsedColumn(),
                  console=console, transient=True) as bars:
        token = _CURRENT.set(RunProgress(bars, sites))
        try:
            yield
        finally:
            _CURRENT.reset(token)
