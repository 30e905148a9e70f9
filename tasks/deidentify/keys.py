"""Keyed, deterministic pseudonyms: patient IDs, UIDs, date offsets and opaque keys.

Every value is an HMAC-SHA256 of the secret and a purpose-tagged message, so the mapping is
stable across runs and machines, computable forward by whoever holds the key, and not
invertible by anyone.
"""

from __future__ import annotations

import hashlib
import hmac
from dataclasses import dataclass, field

# Dates move back by between one and ten years, a whole number of days, one offset per patient.
MIN_OFFSET_DAYS = 365
OFFSET_SPAN_DAYS = 3285


def normalize_patient_id(value: str) -> str:
    """The form a source patient ID is compared and hashed in."""
    return value.strip().upper()


@dataclass(frozen=True)
class PseudonymKeys:
    """The HMAC secret and the pseudonyms derived from it (the secret never shows in a repr)."""

    secret: bytes = field(repr=False)

    def _mac(self, purpose: str, *parts: str) -> bytes:
        message = "\x1f".join((purpose, *parts)).encode("utf-8")
        return hmac.new(self.secret, message, hashlib.sha256).digest()

    def patient_id(self, site_id: str, source_patient_id: str) -> str:
        """The repository patient ID: ``P`` and 16 hex digits, per site and source ID."""
        digest = self._mac("patient", site_id, normalize_patient_id(source_patient_id))
        return "P" + digest[:8].hex().upper()

    def date_offset_days(self, site_id: str, source_patient_id: str) -> int:
        """The patient's date shift in days (negative: dates move into the past)."""
        digest = self._mac("date-offset", site_id, normalize_patient_id(source_patient_id))
        return -(MIN_OFFSET_DAYS + int.from_bytes(digest[:8], "big") % OFFSET_SPAN_DAYS)

    def uid(self, original: str) -> str:
        """A ``2.25`` UID for an original UID: valid, at most 44 characters, deterministic."""
        value = int.from_bytes(self._mac("uid", original.strip().rstrip("\x00"))[:16], "big")
        return f"2.25.{value or 1}"

    def siteid(self, site_id: str) -> str:
        """RICORD's SITEID: a six-digit code that tells sites apart without naming them."""
        return str(100000 + int.from_bytes(self._mac("siteid", site_id)[:8], "big") % 900000)

    def check_value(self) -> str:
        """A key check value: the HMAC of a constant, so two secrets can be told apart
        without either being stored (32 hex digits)."""
        return self._mac("key-check", "radrepo").hex()[:32]

    def opaque(self, purpose: str, *parts: str) -> str:
        """A 16-hex-digit key for a value that must be comparable but not readable."""
        return self._mac(purpose, *parts)[:8].hex()
