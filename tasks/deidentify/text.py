"""Text as radrepo judges it, in the cleaner and in the gate alike: one normalizer, one
tokenizer, the imaging vocabulary free text is kept by (``schemas/vocabulary.yaml``), and the
matching of identifying values as whole tokens.

Text is compared after Unicode NFKC normalization and case folding. A *word* is a run of
letters and digits (a dotted number such as a UID or 2.5 is one word; a run of a script written
without spaces, Chinese, Japanese or Korean, is one word). For matching, a word of such a
script is cut into single characters, so a name written in it is found inside a longer run,
and the digits of a word that glues letters to digits ("PA" + an ID) are tokens too.
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Iterable
from dataclasses import dataclass
from functools import cache, cached_property, lru_cache
from importlib import resources

import yaml

_UNSPACED = ("\u1100-\u11ff\u3040-\u30ff\u3100-\u312f\u3130-\u318f\u3400-\u4dbf"
             "\u4e00-\u9fff\uac00-\ud7af\uf900-\ufaff\uff66-\uff9f")
_WORD = re.compile(rf"[{_UNSPACED}]+|\d+(?:\.\d+)*[^\W_{_UNSPACED}]*|[^\W_{_UNSPACED}]+")
_UNSPACED_RUN = re.compile(rf"[{_UNSPACED}]")
_NUMBER = re.compile(r"\d+(?:\.\d+)*")
_MONTH = (r"(?:jan(?:uary)?|feb(?:ruary)?|mar(?:ch)?|apr(?:il)?|may|june?|july?|aug(?:ust)?"
          r"|sep(?:t(?:ember)?)?|oct(?:ober)?|nov(?:ember)?|dec(?:ember)?)")
# a date in any of the ways descriptions write one: 23/11/1957, 1957-11-23, 23.11.57,
# 23 NOV 1957, Nov 23rd, 1957, 19571123
_DATE = re.compile(
    r"(?<![^\W_])(?:\d{1,4}[-/.]\d{1,2}[-/.]\d{1,4}"
    rf"|\d{{1,2}}[\s./-]*{_MONTH}\.?[\s.,/-]*\d{{2,4}}"
    rf"|{_MONTH}\.?[\s./-]*\d{{1,2}}(?:st|nd|rd|th)?,?[\s./-]*\d{{2,4}}"
    r"|(?:19|20)\d\d(?:0[1-9]|1[0-2])(?:0[1-9]|[12]\d|3[01]))(?![^\W_])",
    re.IGNORECASE)
MONTHS = ("JAN", "FEB", "MAR", "APR", "MAY", "JUN", "JUL", "AUG", "SEP", "OCT", "NOV", "DEC")
MONTH_NAMES = ("JANUARY", "FEBRUARY", "MARCH", "APRIL", "MAY", "JUNE", "JULY", "AUGUST",
               "SEPTEMBER", "OCTOBER", "NOVEMBER", "DECEMBER")
# a number-only identifier shorter than this is not searched for by the gate: it would match
# every count and measurement in a header (the cleaner still removes it from free text)
MIN_NUMBER = 5
MIN_OPAQUE_TOKEN = 3


def normalize(text: str) -> str:
    """The form text is judged in: NFKC normalized and case folded."""
    return unicodedata.normalize("NFKC", text).casefold()


def words(text: str) -> list[tuple[str, str]]:
    """(separator before, word) pairs of NFKC-normalized ``text``, in order (case kept)."""
    text = unicodedata.normalize("NFKC", text)
    out, pos = [], 0
    for m in _WORD.finditer(text):
        out.append((text[pos:m.start()], m.group()))
        pos = m.end()
    return out


def _word_tokens(word: str) -> tuple[list[str], list[str]]:
    """A normalized word's tokens for matching, and the digit runs of a word that glues
    letters to digits."""
    if _UNSPACED_RUN.match(word):
        return list(word), []
    if word.isalpha() or _NUMBER.fullmatch(word):
        return [word], []
    return [word], _NUMBER.findall(word)


def _tokens(text: str) -> tuple[tuple[str, ...], frozenset[str]]:
    out: list[str] = []
    glued: set[str] = set()
    for _, word in words(text):
        toks, digits = _word_tokens(word.casefold())
        out += toks
        glued.update(digits)
    return tuple(out), frozenset(glued)


@lru_cache(maxsize=65536)
def tokens(text: str) -> tuple[tuple[str, ...], frozenset[str]]:
    """``text``'s tokens in order, and the digit runs glued to letters inside its words
    (header values repeat from file to file: remembered)."""
    return _tokens(text)


@dataclass(frozen=True)
class Vocabulary:
    """The words and token patterns free text may keep (``schemas/vocabulary.yaml``)."""

    words: frozenset[str]
    patterns: re.Pattern[str]

    def allows(self, word: str) -> bool:
        """Whether a case-folded word may stay in cleaned free text."""
        return word in self.words or self.patterns.fullmatch(word) is not None

    def is_word(self, token: str) -> bool:
        """Whether a token is a vocabulary word (too common to identify on its own)."""
        return token in self.words


@cache
def vocabulary() -> Vocabulary:
    """The imaging vocabulary shipped in ``schemas/vocabulary.yaml``."""
    data = yaml.safe_load(resources.files("schemas").joinpath("vocabulary.yaml").read_text())
    found: set[str] = set()
    for entries in data["words"].values():
        for entry in entries:
            if not isinstance(entry, str):
                raise ValueError(f"vocabulary.yaml: {entry!r} is not a string (quote it)")
            found.update(w.casefold() for _, w in words(entry))
    pattern = "|".join(f"(?:{p})" for p in data["patterns"])
    return Vocabulary(frozenset(found), re.compile(pattern))


class IdentifierMatcher:
    """Finds identifying values in text as whole tokens, after normalization.

    A one-token identifier matches that token (and the digits of a word gluing letters to
    them, so "PA" + an ID is found). A one-token identifier that is also a vocabulary word
    (UNKNOWN, CLEAN, POSITIVE) is not searched on its own: it names nobody, and radrepo's
    own words (a COVID status, a QC outcome) are such words; the name it belongs to is still
    searched in full. An identifier of several tokens (a full name, an address, a date)
    matches those tokens in a row, whatever separates them. Name parts of any length are
    searched; numbers under ``min_number`` digits are not.
    """

    def __init__(self, values: Iterable[str], min_number: int = MIN_NUMBER):
        vocab = vocabulary()
        self.singles: set[str] = set()
        self.phrases: dict[int, set[tuple[str, ...]]] = {}
        for value in values:
            toks, _ = tokens(value)
            if not toks:
                continue
            if len(toks) > 1:
                self.phrases.setdefault(len(toks), set()).add(toks)
                continue
            [tok] = toks
            if _NUMBER.fullmatch(tok) and len(tok.replace(".", "")) < min_number:
                continue
            if not vocab.is_word(tok):
                self.singles.add(tok)
        self.lengths = sorted(self.phrases)
        self.empty = not (self.singles or self.phrases)

    def in_text(self, text: str) -> bool:
        """Whether ``text`` holds one of the identifiers."""
        if self.empty or not text:
            return False
        toks, glued = tokens(text)
        return self._found(toks, glued, self.singles)

    def _found(self, toks: tuple[str, ...], glued: frozenset[str], singles: set[str]) -> bool:
        if not singles.isdisjoint(toks) or (glued and not singles.isdisjoint(glued)):
            return True
        return any(toks[i:i + n] in self.phrases[n]
                   for n in self.lengths for i in range(len(toks) - n + 1))

    @cached_property
    def _long_singles(self) -> set[str]:
        return {s for s in self.singles if len(s) >= MIN_OPAQUE_TOKEN}

    def in_bytes(self, data: bytes) -> bool:
        """Whether an opaque value holds an identifier, read as UTF-8 and as Latin-1. Binary
        data is full of chance one- and two-letter words: single tokens shorter than
        MIN_OPAQUE_TOKEN are not searched for in it."""
        if self.empty or not data:
            return False
        texts = ([data.decode("ascii")] if data.isascii()
                 else [data.decode("utf-8", "replace"), data.decode("latin-1")])
        return any(self._found(*_tokens(text), self._long_singles) for text in texts)

    def hit_words(self, pairs: list[tuple[str, str]]) -> set[int]:
        """Indexes of the words (from ``words``) that belong to an identifier."""
        if self.empty or not pairs:
            return set()
        flat: list[str] = []
        owner: list[int] = []
        hits: set[int] = set()
        for i, (_, word) in enumerate(pairs):
            toks, digits = _word_tokens(word.casefold())
            flat += toks
            owner += [i] * len(toks)
            if not self.singles.isdisjoint(toks) or not self.singles.isdisjoint(digits):
                hits.add(i)
        for n in self.lengths:
            for i in range(len(flat) - n + 1):
                if tuple(flat[i:i + n]) in self.phrases[n]:
                    hits.update(owner[i:i + n])
        return hits


def _rebuild(pairs: list[tuple[str, str]], drop: set[int]) -> str:
    """The kept words joined by their separators (one space where words were dropped)."""
    out: list[str] = []
    gap = False
    for i, (sep, word) in enumerate(pairs):
        if i in drop:
            gap = True
            continue
        if out:
            out.append(" " if gap else sep)
        out.append(word)
        gap = False
    return "".join(out)


@lru_cache(maxsize=16384)
def _allowed(text: str) -> tuple[tuple[tuple[str, str], ...], int]:
    """The words of free text the vocabulary keeps (dates removed first), with their
    separators, and how many tokens were removed."""
    vocab = vocabulary()
    removed = len(_DATE.findall(text))
    text = _DATE.sub(" ", text)
    pairs = words(text)
    keep: list[tuple[str, str]] = []
    gap = False
    for sep, word in pairs:
        if not vocab.allows(word.casefold()):
            gap = True
            removed += 1
            continue
        keep.append((" " if gap else sep, word))
        gap = False
    return tuple(keep), removed


@lru_cache(maxsize=16384)
def clean_free_text(text: str, matcher: IdentifierMatcher | None) -> tuple[str, int]:
    """Free text reduced to vocabulary words, without dates and without the identifiers
    ``matcher`` knows, and how many tokens were removed."""
    kept, removed = _allowed(text)
    pairs = list(kept)
    drop = matcher.hit_words(pairs) if matcher is not None else set()
    return _rebuild(pairs, drop).strip(), removed + len(drop)


@lru_cache(maxsize=16384)
def remove_identifiers(text: str, matcher: IdentifierMatcher) -> tuple[str, int]:
    """Text without the words that belong to an identifier (kept values that are not free
    text: the rest stays as it was), and how many words were removed."""
    pairs = words(text)
    drop = matcher.hit_words(pairs)
    return _rebuild(pairs, drop).strip(), len(drop)


def birth_date_forms(value: str) -> list[str]:
    """A DA birth date (YYYYMMDD) as free text writes it: 19571123, 1957-11-23, 23/11/1957,
    11/23/1957, 23.11.1957, 23 NOV 1957, NOV 23 1957, 23 NOVEMBER 1957 (empty if not a DA)."""
    value = value.strip()
    if not re.fullmatch(r"\d{8}", value):
        return []
    y, m, d = value[:4], int(value[4:6]), int(value[6:8])
    if not (1 <= m <= 12 and 1 <= d <= 31):
        return []
    out = {value, f"{y}.{m:02d}.{d:02d}", f"{d:02d}.{m:02d}.{y}", f"{d}.{m}.{y}"}
    for mm, dd in {(f"{m:02d}", f"{d:02d}"), (str(m), str(d))}:
        out |= {f"{y}-{mm}-{dd}", f"{dd}/{mm}/{y}", f"{mm}/{dd}/{y}"}
    for month in (MONTHS[m - 1], MONTH_NAMES[m - 1]):
        out |= {f"{d} {month} {y}", f"{month} {d} {y}", f"{d:02d} {month} {y}",
                f"{month} {d:02d} {y}"}
    return sorted(out)
