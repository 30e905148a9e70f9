"""Failures of a whole site that a run reports in one line and survives at the other sites."""

from __future__ import annotations


class SourceUnavailable(RuntimeError):
    """A site's source or clinical export is missing or unreadable; the message is one line
    naming the site, never a path or a value."""
