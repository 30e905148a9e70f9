"""Where a run's full story goes: a log file in the work folder's private zone, never the console.

The console gets one ``radrepo: ...`` line for a failure; tracebacks (which may quote what an
exception carried) go to ``<work_dir>/logs/radrepo-<UTC time>-<pid>.log``, readable by the
operator alone, with every log line of the run.
"""

from __future__ import annotations

import logging
import os
import traceback
from datetime import UTC, datetime
from pathlib import Path

LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


class _WithoutTraceback(logging.Formatter):
    """Formats as the wrapped formatter does, leaving out exception and stack text."""

    def __init__(self, inner: logging.Formatter | None):
        super().__init__()
        self.inner = inner or logging.Formatter()

    def format(self, record: logging.LogRecord) -> str:
        saved = record.exc_info, record.exc_text, record.stack_info
        record.exc_info = record.exc_text = record.stack_info = None
        try:
            return self.inner.format(record)
        finally:
            record.exc_info, record.exc_text, record.stack_info = saved


def _console_handlers() -> list[logging.Handler]:
    loggers = [logging.getLogger(), *(logging.getLogger(name) for name in list(
        logging.root.manager.loggerDict))]
    return [h for lg in loggers for h in getattr(lg, "handlers", [])
            if isinstance(h, logging.StreamHandler) and not isinstance(h, logging.FileHandler)]


def quiet_console_tracebacks() -> None:
    """Log lines on the console keep their text but lose tracebacks (the log file has them)."""
    for handler in _console_handlers():
        if not isinstance(handler.formatter, _WithoutTraceback):
            handler.setFormatter(_WithoutTraceback(handler.formatter))


class RunLog:
    """The run's log file: every log record of the run, and the traceback of a failure."""

    def __init__(self, work_dir: str):
        # Prefect installs no console logging when the root logger already has a handler:
        # have it set up before adding ours
        from prefect.logging.configuration import ensure_logging_setup

        ensure_logging_setup()

        folder = Path(work_dir) / "logs"
        folder.mkdir(parents=True, exist_ok=True, mode=0o700)
        stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
        self.path = folder / f"radrepo-{stamp}-{os.getpid()}.log"
        self.path.touch(mode=0o600)
        self.handler = logging.FileHandler(self.path, encoding="utf-8")
        self.handler.setFormatter(logging.Formatter(LOG_FORMAT))
        self.handler.setLevel(logging.INFO)
        logging.getLogger().addHandler(self.handler)
        for name in ("prefect", "distributed"):  # their loggers may not reach the root's level
            logger = logging.getLogger(name)
            if not logger.propagate:
                logger.addHandler(self.handler)
        quiet_console_tracebacks()

    def failure(self, err: BaseException, message: str) -> str:
        """Write ``err``'s traceback to the file; the one console line, saying where it is."""
        with self.path.open("a", encoding="utf-8") as fh:
            fh.write(f"radrepo: {message}\n")
            fh.write("".join(traceback.format_exception(err)))
        return f"{message} (details: {self.path})"

    def close(self) -> None:
        for logger in (logging.getLogger(), logging.getLogger("prefect"),
                       logging.getLogger("distributed")):
            logger.removeHandler(self.handler)
        self.handler.close()
