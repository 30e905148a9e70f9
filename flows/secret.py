"""Where the HMAC secret comes from: an environment variable named by the configuration."""

from __future__ import annotations

import os

from tasks.deidentify.keys import PseudonymKeys
from tasks.zones import KEY_CHECK, Release

MIN_SECRET_LENGTH = 16


class SecretError(RuntimeError):
    """The secret is missing or too weak; the message names the variable, never a value."""


def keys_from_env(variable: str) -> PseudonymKeys:
    """Pseudonym keys from the secret in ``variable``; refuses a missing or short secret."""
    value = os.environ.get(variable, "")
    if not value:
        raise SecretError(f"environment variable {variable} is not set: it must hold the "
                          "HMAC secret that keys every pseudonym")
    if len(value) < MIN_SECRET_LENGTH:
        raise SecretError(f"environment variable {variable} holds fewer than "
                          f"{MIN_SECRET_LENGTH} characters: use a long random secret")
    return PseudonymKeys(value.encode("utf-8"))


class KeyMismatch(SecretError):
    """The secret is not the one the release was published with."""


def check_release_key(release: Release, keys: PseudonymKeys, variable: str,
                      rekey: bool = False) -> str:
    """Refuse a secret other than the release's; record its check value on first use, or
    (``rekey``) replace it, which makes every batch under the old key due for republishing.

    Only the check value (an HMAC of a constant) is stored, never the secret."""
    value = keys.check_value()
    recorded = release.read_bytes(KEY_CHECK)
    if recorded is None or rekey:
        release.write_bytes(KEY_CHECK, f"{value}\n".encode(), atomic=True)
        return value
    if recorded.decode("ascii", "replace").strip() != value:
        raise KeyMismatch(f"environment variable {variable} holds another secret than the one "
                          f"release {release.url} was published with: run with that secret, or "
                          "change keys on purpose with --rekey")
    return value
