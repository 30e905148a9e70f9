"""De-identification: the one door PHI may not pass.

``parse_source`` reads a source object's bytes once; ``rewrite_source`` turns them into the
de-identified file and its row, which carry pseudonyms only. The one pass
(``flows/one_pass.py``) reads and writes; nothing here touches a file.
"""

from __future__ import annotations

from tasks.deidentify.clinical import DeidentifiedClinical, deidentify_clinical
from tasks.deidentify.keys import PseudonymKeys
from tasks.deidentify.remap import load_remap
from tasks.deidentify.study import (
    DeidContext,
    ParsedSource,
    Quarantine,
    Rewritten,
    parse_source,
    rewrite_source,
)

__all__ = [
    "DeidContext",
    "DeidentifiedClinical",
    "ParsedSource",
    "PseudonymKeys",
    "Quarantine",
    "Rewritten",
    "deidentify_clinical",
    "load_remap",
    "parse_source",
    "rewrite_source",
]
