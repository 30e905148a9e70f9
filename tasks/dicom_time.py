"""DICOM TM values as times of day, for the catalog and for comparing studies across batches."""

from __future__ import annotations

from datetime import time


def parse_tm(text: str | None) -> time | None:
    """A DICOM TM value (HH, HHMM, HHMMSS or HHMMSS.FFFFFF; old HH:MM:SS too) as a time;
    None when empty or malformed."""
    text = (text or "").strip().replace(":", "")
    whole, _, fraction = text.partition(".")
    if not whole.isdigit() or len(whole) not in (2, 4, 6) or (fraction and not fraction.isdigit()):
        return None
    hour, minute, second = (int(whole[i:i + 2] or 0) for i in (0, 2, 4))
    if hour > 23 or minute > 59 or second > 60:
        return None
    return time(hour, minute, min(second, 59), int((fraction + "000000")[:6]))
