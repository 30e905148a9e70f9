"""Every element of a dataset by its encoded length: before and after Pixel Data, nested items
included, VR UN resolved from the dictionary. The cleaner collects a file's identifiers through
it and the gate reads every output value through it; nothing here finds a tag by searching
bytes. ``read_header`` reads a file the same way from a stream, seeking past the pixels.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from functools import lru_cache
from struct import pack, unpack_from
from typing import BinaryIO

from pydicom.datadict import keyword_for_tag
from pydicom.uid import UID, ExplicitVRLittleEndian

from tasks.deidentify.rewrite import (
    ITEM_END,
    LONG_VRS,
    SEQUENCE_END,
    UNDEFINED,
    MalformedDataset,
    Raw,
    TruncatedDataset,
    dataset_start,
    dictionary_vr,
    elements,
    items_of,
    read_charset,
    text_readings,
)
from tasks.deidentify.text import birth_date_forms

PIXEL_TAGS = frozenset({0x7FE00008, 0x7FE00009, 0x7FE00010})
TEXT_VRS = frozenset({b"AE", b"AS", b"CS", b"DA", b"DS", b"DT", b"IS", b"LO", b"LT", b"PN",
                      b"SH", b"ST", b"TM", b"UC", b"UI", b"UR", b"UT"})
OPAQUE_VRS = frozenset({b"OB", b"UN"})  # may hold text a vendor packed in
BIRTH_DATE = 0x00100030
# values that identify a patient, an encounter or a place, wherever they sit (names: every PN)
ID_TAGS = frozenset({
    0x00100020,  # Patient ID
    0x00101000,  # Other Patient IDs
    0x00080050,  # Accession Number
    0x00200010,  # Study ID
    0x00101090,  # Medical Record Locator
    0x00101040,  # Patient's Address
    0x00102154,  # Patient's Telephone Numbers
    0x00080080,  # Institution Name
    0x00080081,  # Institution Address
    0x00401001,  # Requested Procedure ID
    0x00400009,  # Scheduled Procedure Step ID
    0x00380010,  # Admission ID
})
META_AE_TAGS = frozenset({0x00020016, 0x00020017, 0x00020018})  # source, sending, receiving AE


@lru_cache(maxsize=16384)
def name_of(tag: int) -> str:
    """An element's keyword, or its tag when the dictionary has none."""
    return keyword_for_tag(tag) or f"({tag >> 16:04X},{tag & 0xFFFF:04X})"


def walk(buf: memoryview, raws: list[Raw], encodings: list[str], nested: bool = False,
         parsed: dict[int, list[Raw]] | None = None,
         ) -> Iterator[tuple[Raw, bytes, list[str], bool]]:
    """(element, effective VR, character sets, nested) for every element but sequences,
    sequence items walked in place; a known UN element gets its dictionary VR. ``parsed``
    remembers each item's elements by its offset, for the rewrite that follows."""
    for r in raws:
        vr = r.vr
        if vr == b"UN":
            vr = dictionary_vr(r.tag) or b"UN"
        if r.vr == b"SQ":
            for start, end in items_of(buf, r):
                inner = elements(buf, start, end)[0]
                if parsed is not None:
                    parsed[start] = inner
                charset = (read_charset(buf, inner)
                           if any(i.tag == 0x00080005 for i in inner) else encodings)
                yield from walk(buf, inner, charset, True, parsed)
        elif vr == b"SQ":
            yield r, b"UN", encodings, nested  # a sequence hidden in UN stays opaque
        else:
            yield r, vr, encodings, nested


@lru_cache(maxsize=4096)
def _name_parts(name: str) -> frozenset[str]:
    out = {name}
    for part in re.split(r"[\^=]+", name):
        part = part.strip()
        if part:
            out.add(part)
            out.update(w for w in part.split() if w)
    return frozenset(out)


def collect_identifiers(buf: memoryview, raws: list[Raw], encodings: list[str],
                        meta: list[Raw] = (),
                        parsed: dict[int, list[Raw]] | None = None) -> set[str]:
    """Every identifying value a file holds, wherever it sits: names (every PN, nested and
    Other Patient Names included) with their parts, IDs, places, the birth date in the forms
    free text writes it, and the file meta's AE titles."""
    found: set[str] = set()
    for r, vr, charset, _ in walk(buf, raws, encodings, parsed=parsed):
        if r.value_end == r.value_start or not (vr == b"PN" or r.tag in ID_TAGS
                                                 or r.tag == BIRTH_DATE):
            continue
        raw = bytes(buf[r.value_start:r.value_end])
        try:
            readings = text_readings(raw, tuple(charset), vr)
        except (LookupError, ValueError):  # judged as written, as the gate reads it
            readings = (raw.decode("latin-1").rstrip("\0 "),)
        for value in (v for text in readings for v in text.split("\\")):
            value = value.strip()
            if not value:
                continue
            if vr == b"PN":
                found |= _name_parts(value)
            elif r.tag == BIRTH_DATE:
                found.update(_birth_date_forms(value))
            else:
                found.add(value)
    for r in meta:
        if r.tag in META_AE_TAGS and r.value_end > r.value_start:
            value = bytes(buf[r.value_start:r.value_end]).decode("latin-1").strip("\0 ")
            if value:
                found.add(value)
    return found


@lru_cache(maxsize=4096)
def _birth_date_forms(value: str) -> tuple[str, ...]:
    return tuple(birth_date_forms(value))


def meta_elements(buf: memoryview) -> list[Raw]:
    """The file meta elements of a Part 10 file (none without a preamble)."""
    found = dataset_start(buf)
    return elements(buf, 132, found[0])[0] if found else []


class NotExplicitLittleEndian(MalformedDataset):
    """The file is implicit VR, big endian or deflated: it cannot be walked as it is."""


def read_header(fh: BinaryIO) -> bytes:
    """A Part 10 explicit VR little endian file's bytes with the top-level pixel values left
    out (their elements kept with length 0): every element is read by its length and the
    pixels are skipped by seeking, so a remote file's pixel data is never fetched."""
    out = bytearray(fh.read(144))
    if len(out) < 144 or bytes(out[128:132]) != b"DICM" or bytes(out[132:136]) != b"\2\0\0\0":
        raise NotExplicitLittleEndian("no preamble with a file meta group length")
    out += _read(fh, unpack_from("<I", out, 140)[0])
    ts = next((bytes(out[r.value_start:r.value_end]).decode("ascii", "replace").strip("\0 ")
               for r in elements(memoryview(out), 144, len(out))[0] if r.tag == 0x00020010), "")
    uid = UID(ts or ExplicitVRLittleEndian)
    if not (uid == ExplicitVRLittleEndian
            or (uid.is_compressed and uid.is_little_endian and not uid.is_deflated)):
        raise NotExplicitLittleEndian("transfer syntax is not explicit VR little endian")
    _copy_level(fh, out, top=True)
    return bytes(out)


def _read(fh: BinaryIO, n: int) -> bytes:
    data = fh.read(n)
    if len(data) < n:
        raise TruncatedDataset("file ends inside an element")
    return data


def _copy_level(fh: BinaryIO, out: bytearray, top: bool) -> None:
    """Copy one dataset level (up to an item delimiter when nested) from ``fh`` to ``out``."""
    while True:
        head = fh.read(8)
        if not head and top:
            return
        if len(head) < 8:
            raise TruncatedDataset("file ends inside an element header")
        group, elem = unpack_from("<HH", head)
        tag = (group << 16) | elem
        if tag == ITEM_END:
            out += head
            return
        vr = head[4:6]
        if vr in LONG_VRS:
            ext = _read(fh, 4)
            length = unpack_from("<I", ext)[0]
        elif vr.isalpha():
            ext, length = b"", unpack_from("<H", head, 6)[0]
        else:
            raise MalformedDataset(f"element ({group:04X},{elem:04X}) has no explicit VR")
        if top and tag in PIXEL_TAGS:
            if not ext:
                raise MalformedDataset("pixel data without a long VR")
            out += head + pack("<I", 0)
            _skip_value(fh, length)
            continue
        out += head + ext
        if length != UNDEFINED:
            out += _read(fh, length)
            continue
        while True:  # items up to the sequence delimiter
            item = _read(fh, 8)
            out += item
            item_tag = (unpack_from("<H", item)[0] << 16) | unpack_from("<H", item, 2)[0]
            if item_tag == SEQUENCE_END:
                break
            item_length = unpack_from("<I", item, 4)[0]
            if item_length == UNDEFINED:
                _copy_level(fh, out, top=False)
            else:
                out += _read(fh, item_length)


def _skip_value(fh: BinaryIO, length: int) -> None:
    """Seek past a pixel value: its length, or its fragments up to the sequence delimiter."""
    if length != UNDEFINED:
        fh.seek(length, 1)
        return
    while True:
        item = _read(fh, 8)
        item_tag = (unpack_from("<H", item)[0] << 16) | unpack_from("<H", item, 2)[0]
        if item_tag == SEQUENCE_END:
            return
        fh.seek(unpack_from("<I", item, 4)[0], 1)
