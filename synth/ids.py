"""Identifiers of a synthetic run: UIDs and digit strings unique across all its sites."""

from __future__ import annotations

import hashlib
import random


def digest(text: str) -> int:
    """128-bit integer from the SHA-256 of `text`."""
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:16], "big")


class Ids:
    """Run-wide unique UIDs (hash of seed and counter) and unique random digit strings."""

    def __init__(self, seed: int) -> None:
        self.seed = seed
        self.counter = 0
        self.used: set[str] = set()

    def uid(self) -> str:
        self.counter += 1
        return f"2.25.{digest(f'radrepo-synth:{self.seed}:{self.counter}')}"

    def number(self, rng: random.Random, digits: int) -> str:
        while True:
            value = str(rng.randrange(10 ** (digits - 1), 10**digits))
            if value not in self.used:
                self.used.add(value)
                return value
