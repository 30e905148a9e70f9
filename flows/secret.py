"""Where the HMAC secret comes from: an environment variable named by the configuration."""

from __future__ import annotations

import os

from tasks.deidentify.keys import PseudonymKeys

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
