"""Apply the profile to a dataset's bytes, element by element, without building a pydicom tree.

Input is explicit VR little endian (other encodings are normalized first, see ``study.py``).
Each element is read straight from the buffer by its encoded length (before and after Pixel
Data alike); what the profile keeps is copied as a byte slice (runs of kept elements, pixel
data included, become one slice), and only what changes is decoded and encoded again.
Sequences are rewritten recursively with defined lengths.

A VR UN element whose tag the dictionary knows is handled as that element, decoded with its
dictionary VR (a UN Study Description is cleaned like any other); a UN element the dictionary
does not know is removed, and so is any public (even group) element it does not know, such as
one a vendor put after the pixels at (8000,0010): the profile has no row for it, so nothing
says what it holds, and copying it unexamined would let any value through.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import lru_cache
from struct import pack, unpack_from

from pydicom.charset import convert_encodings, decode_bytes, encode_string
from pydicom.datadict import dictionary_VR
from pydicom.uid import UID_dictionary

from tasks.deidentify.dataset import (
    CLEANED_VRS,
    DUMMY_BY_VR,
    SCANNED_VRS,
    TEXT_VRS,
    PatientContext,
    shift_da,
    shift_dt,
)
from tasks.deidentify.profile import Profile
from tasks.deidentify.text import clean_free_text, remove_identifiers

LONG_VRS = frozenset({b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"SV", b"UC", b"UN",
                      b"UR", b"UT", b"UV"})
UNDEFINED = 0xFFFFFFFF
ITEM, ITEM_END, SEQUENCE_END = 0xFFFEE000, 0xFFFEE00D, 0xFFFEE0DD
PIXEL_DATA = 0x7FE00010
NAME_DELIMITERS = {"^", "="}
# top-level source values the de-identification reads (pseudonym, age, date shift)
TOP_VALUE_TAGS = frozenset({0x00100020, 0x00100030, 0x00080020, 0x00080021, 0x00080023,
                            0x00101010})
Chunk = bytes | memoryview


class MalformedDataset(ValueError):
    """The bytes do not parse as explicit VR little endian (message quotes no value)."""


class TruncatedDataset(MalformedDataset):
    """The file ends inside an element: it was cut short."""


@dataclass(frozen=True)
class Raw:
    """One element as found in the buffer."""

    tag: int
    vr: bytes
    start: int
    value_start: int
    value_end: int
    end: int


def elements(buf: memoryview, pos: int, end: int) -> tuple[list[Raw], int]:
    """The elements of one dataset level from ``pos`` up to ``end`` or an item delimiter,
    in file order, and the position where the level stopped."""
    out = []
    while pos < end:
        if end - pos < 8:
            raise TruncatedDataset("dataset ends inside an element header")
        group, elem = unpack_from("<HH", buf, pos)
        tag = (group << 16) | elem
        if tag == ITEM_END:
            break
        vr = bytes(buf[pos + 4:pos + 6])
        if vr in LONG_VRS:
            length = unpack_from("<I", buf, pos + 8)[0]
            value_start = pos + 12
        else:
            if not vr.isalpha():
                raise MalformedDataset(f"element ({group:04X},{elem:04X}) has no explicit VR")
            length = unpack_from("<H", buf, pos + 6)[0]
            value_start = pos + 8
        if length == UNDEFINED:
            value_end = _undefined_end(buf, value_start, end)
            next_pos = value_end + 8  # the sequence delimitation item
        else:
            value_end = next_pos = value_start + length
        if value_end > end:
            raise TruncatedDataset(f"element ({group:04X},{elem:04X}) runs past the end")
        out.append(Raw(tag, vr, pos, value_start, value_end, next_pos))
        pos = next_pos
    return out, pos


def _item_header(buf: memoryview, pos: int) -> tuple[int, int]:
    group, elem, length = unpack_from("<HHI", buf, pos)
    return (group << 16) | elem, length


def _undefined_end(buf: memoryview, pos: int, end: int) -> int:
    """Where an undefined-length value (items until a sequence delimiter) ends."""
    while pos + 8 <= end:
        tag, length = _item_header(buf, pos)
        if tag == SEQUENCE_END:
            return pos
        if tag != ITEM:
            raise MalformedDataset("undefined-length value holds a non-item")
        pos = _item_end(buf, pos, length, end)
    raise MalformedDataset("undefined-length value without a sequence delimiter")


def _item_end(buf: memoryview, pos: int, length: int, end: int) -> int:
    """The position after the item whose header is at ``pos``."""
    if length != UNDEFINED:
        return pos + 8 + length
    _, stop = elements(buf, pos + 8, end)
    if stop + 8 > end or _item_header(buf, stop)[0] != ITEM_END:
        raise MalformedDataset("item without a delimiter")
    return stop + 8


def items_of(buf: memoryview, raw: Raw) -> list[tuple[int, int]]:
    """(start, end) of each item's dataset inside a sequence value."""
    out = []
    pos = raw.value_start
    while pos + 8 <= raw.value_end:
        tag, length = _item_header(buf, pos)
        if tag == SEQUENCE_END:
            break
        if tag != ITEM:
            raise MalformedDataset("sequence holds a non-item")
        after = _item_end(buf, pos, length, raw.value_end)
        out.append((pos + 8, after - 8 if length == UNDEFINED else after))
        pos = after
    return out


@lru_cache(maxsize=8192)
def dictionary_vr(tag: int) -> bytes | None:
    """The VR the public dictionary gives a tag (the first of "US or SS"), None if the tag is
    private or unknown."""
    if (tag >> 16) % 2:
        return None
    try:
        return dictionary_VR(tag)[:2].encode()
    except KeyError:
        return None


def encode_element(tag: int, vr: bytes, value: bytes) -> bytes:
    """An explicit VR little endian element, value padded to even length."""
    if len(value) % 2:
        value += b"\0" if vr in (b"UI", b"OB", b"UN") else b" "
    head = pack("<HH", tag >> 16, tag & 0xFFFF) + vr
    if vr in LONG_VRS:
        return head + b"\0\0" + pack("<I", len(value)) + value
    if len(value) > 0xFFFF:
        raise MalformedDataset(f"value too long for VR {vr.decode()}")
    return head + pack("<H", len(value)) + value


def _text(raw_value: bytes) -> str:
    return raw_value.decode("ascii", "replace").rstrip("\0 ")


BINARY_VRS = frozenset({b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"UN"})
SCANNED_BYTES = frozenset(vr.encode() for vr in SCANNED_VRS)
FREE_TEXT_BYTES = frozenset(vr.encode() for vr in TEXT_VRS - {"PN"})
# top-level values the result row and the checks after the rewrite read
ROW_TAGS = frozenset({0x00080008, 0x00080016, 0x00080018, 0x00080020, 0x00080030, 0x00080060,
                      0x00081030, 0x0008103E, 0x00180015, 0x00180050, 0x00185101, 0x0020000D,
                      0x0020000E, 0x00200013, 0x00200032, 0x00201041, 0x00280002, 0x00280008,
                      0x00280010, 0x00280011,
                      0x00280100, 0x00280301})


@dataclass
class Rewriter:
    """Rewrites one file's dataset; remembers the top-level output values later steps read."""

    buf: memoryview
    profile: Profile
    patient: PatientContext
    uid_map: object
    encodings: list[str]
    top: dict[int, tuple[bytes, bytes]] = field(default_factory=dict)
    pixel: tuple[int, int] | None = None
    tokens_removed: int = 0
    parsed: dict[int, list[Raw]] = field(default_factory=dict)  # item offset -> its elements

    def level(self, raws: list[Raw], nested: bool,
              extra: list[tuple[int, bytes]] = ()) -> list[Chunk]:
        """Chunks of one dataset level (the top, or a sequence item), in tag order; ``extra``
        holds encoded elements to add (the computed ones, at the top)."""
        creators = {
            (r.tag >> 16, r.tag & 0xFF): _text(bytes(self.buf[r.value_start:r.value_end]))
            for r in raws if (r.tag >> 16) % 2 and 0x10 <= (r.tag & 0xFFFF) < 0x100
        }
        pieces: list[tuple[int, Chunk | tuple[int, int]]] = list(extra)
        for r in raws:
            piece = self._element(r, nested, creators)
            if piece is not None:
                pieces.append((r.tag, piece))
        pieces.sort(key=lambda p: p[0])
        if self.profile.private_action == "C":
            pieces = _without_empty_private_blocks(pieces)
        return _chunks(self.buf, pieces)

    def _element(self, r: Raw, nested: bool, creators: dict) -> Chunk | tuple[int, int] | None:
        tag, vr = r.tag, r.vr
        if (tag & 0xFFFF) == 0 and (tag >> 16) > 6:
            return None  # group lengths are retired and would be stale
        private = (tag >> 16) % 2 == 1
        if not private:
            known = dictionary_vr(tag)
            if known is None or (vr == b"UN" and known == b"SQ"):
                return None  # unknown public element, or a sequence hidden in UN: removed
            if vr == b"UN" and known != b"UN":
                r = Raw(tag, known, r.start, r.value_start, r.value_end, r.end)
                return self._relabelled(r, nested, creators)
        action = self.profile.action(tag)
        if action == "computed":
            if not nested:
                return None  # added by the caller, computed
            action = "Z"
        if action == "X":
            return None
        if action == "safe-private":
            if not _safe(tag, creators, self.profile):
                return None
            if (tag & 0xFFFF) < 0x1000:
                return (r.start, r.end)  # a private creator: the safe list names it
            if vr in FREE_TEXT_BYTES or (vr == b"UN" and _printable(self._value(r))):
                return self._new(r, nested, self._clean(vr, self._value(r)))
            return (r.start, r.end)
        if vr == b"SQ":
            return self._sequence(r, action)
        if action == "C" and vr.decode() not in CLEANED_VRS:
            action = "K"
        if action == "K" and vr in BINARY_VRS:
            if tag == PIXEL_DATA and not nested:
                self.pixel = (r.value_start, r.value_end)
            return (r.start, r.end)
        if action == "K" and vr != b"UI" and vr not in SCANNED_BYTES:
            if not nested and tag in ROW_TAGS:
                self.top[tag] = (vr, bytes(self.buf[r.value_start:r.value_end]))
            return (r.start, r.end)
        value = self._value(r)
        if action == "K":
            if vr == b"UI":
                return self._new(r, nested, self._uids(value, keep_standard=True))
            for text in text_readings(value, tuple(self.encodings), vr):
                if self.patient.matcher.in_text(text):
                    return self._new(r, nested, self._without_identifiers(text))
            if not nested and tag in ROW_TAGS:
                self.top[tag] = (vr, value)
            return (r.start, r.end)
        return self._changed(r, nested, action, value)

    def _relabelled(self, r: Raw, nested: bool, creators: dict) -> bytes | None:
        """A UN element with a known tag, handled as that element and written with its VR."""
        if len(self._value(r)) > 0xFFFF and r.vr not in LONG_VRS:
            return None  # too long for its VR: not what the dictionary says it is
        piece = self._element(r, nested, creators)
        if isinstance(piece, tuple):
            return self._new(r, nested, self._value(r))
        return piece

    def _value(self, r: Raw) -> bytes:
        return bytes(self.buf[r.value_start:r.value_end])

    def _changed(self, r: Raw, nested: bool, action: str, value: bytes) -> bytes:
        """The element after a Z, U, D or C action."""
        vr = r.vr
        if action == "Z":
            return self._new(r, nested, b"")
        if action == "U" or (action == "D" and vr == b"UI"):
            return self._new(r, nested, self._uids(value, keep_standard=False))
        if action == "D":
            return self._new(r, nested, _dummy(vr))
        return self._new(r, nested, self._clean(vr, value))  # C

    def _new(self, r: Raw, nested: bool, value: bytes) -> bytes:
        if not nested:
            self.top[r.tag] = (r.vr, value)
        return encode_element(r.tag, r.vr, value)

    def _sequence(self, r: Raw, action: str) -> bytes:
        if action == "Z":
            return encode_element(r.tag, b"SQ", b"")
        body = []
        for start, end in items_of(self.buf, r):
            raws = self.parsed.get(start) or elements(self.buf, start, end)[0]
            item = b"".join(self.level(raws, nested=True))
            body.append(pack("<HHI", 0xFFFE, 0xE000, len(item)) + item)
        return encode_element(r.tag, b"SQ", b"".join(body))

    def _uids(self, value: bytes, keep_standard: bool) -> bytes:
        out = []
        for uid in _text(value).split("\\"):
            uid = uid.strip()
            if not uid or (keep_standard and uid in UID_dictionary):
                out.append(uid)
            else:
                out.append(self.uid_map(uid))
        return "\\".join(out).encode("ascii")

    def _clean(self, vr: bytes, value: bytes) -> bytes:
        """A C action: dates shifted; text kept by the imaging vocabulary (free text) or rid
        of the file's identifiers (names, codes)."""
        if vr == b"DA":
            return "\\".join(shift_da(v, self.patient.offset_days)
                              for v in _text(value).split("\\")).encode("ascii")
        if vr == b"DT":
            return "\\".join(shift_dt(v, self.patient.offset_days)
                              for v in _text(value).split("\\")).encode("ascii")
        if vr not in FREE_TEXT_BYTES and vr != b"UN":
            readings = text_readings(value, tuple(self.encodings), vr)
            return self._without_identifiers(next(
                (t for t in readings if self.patient.matcher.in_text(t)), readings[0]))
        kept = []
        for part in decoded_text(value, tuple(self.encodings), vr).split("\\"):
            cleaned, removed = clean_free_text(part, self.patient.matcher)
            self.tokens_removed += removed
            kept.append(cleaned)
        return self._encoded(kept)

    def _without_identifiers(self, text: str) -> bytes:
        """A kept value (as text) with the words that belong to the file's identifiers
        removed."""
        kept = []
        for part in text.split("\\"):
            cleaned, removed = remove_identifiers(part, self.patient.matcher)
            self.tokens_removed += removed
            kept.append(cleaned)
        return self._encoded(kept)

    def _encoded(self, parts: list[str]) -> bytes:
        joined = "\\".join(parts)
        if not joined.strip("\\ "):
            return b""
        return encode_string(joined, self.encodings)

    def decoded(self, tag: int) -> str | None:
        """An output value at the top level as text (None when absent or empty)."""
        found = self.top.get(tag)
        if not found or not found[1]:
            return None
        vr, value = found
        if vr in (b"US", b"SS"):
            return str(unpack_from("<H" if vr == b"US" else "<h", value)[0])
        return decode_bytes(value, self.encodings, set()).rstrip("\0 ") or None


@lru_cache(maxsize=16384)
def decoded_text(value: bytes, encodings: tuple[str, ...], vr: bytes) -> str:
    """A text value decoded with the file's character sets (PN components kept apart)."""
    delimiters = NAME_DELIMITERS if vr == b"PN" else set()
    return decode_bytes(value, list(encodings), delimiters).rstrip("\0 ")


@lru_cache(maxsize=16384)
def text_readings(value: bytes, encodings: tuple[str, ...], vr: bytes) -> tuple[str, ...]:
    """A text value as the file's character sets decode it and, when that fails, also as
    Latin-1: writers put accented names in CS and other default-repertoire values, or ignore
    Specific Character Set altogether, and such a value must be judged as they wrote it."""
    text = decoded_text(value, encodings, vr)
    if "\ufffd" in text:
        return text, value.decode("latin-1").rstrip("\0 ")
    return (text,)


def _printable(value: bytes) -> bool:
    """Whether an opaque value reads as text (so it is cleaned as text)."""
    text = value.rstrip(b"\0 ")
    return bool(text) and all(32 <= b < 127 or b >= 0xA0 for b in text)


def _chunks(buf: memoryview, pieces: list) -> list[Chunk]:
    """Encoded pieces as they are; consecutive source spans merged into one slice."""
    chunks: list[Chunk] = []
    run: list[int] = []
    for _, piece in pieces:
        if isinstance(piece, tuple):
            if run and run[1] == piece[0]:
                run[1] = piece[1]
                continue
            if run:
                chunks.append(buf[run[0]:run[1]])
            run = list(piece)
        else:
            if run:
                chunks.append(buf[run[0]:run[1]])
                run = []
            chunks.append(piece)
    if run:
        chunks.append(buf[run[0]:run[1]])
    return chunks


def _dummy(vr: bytes) -> bytes:
    value = DUMMY_BY_VR.get(vr.decode())
    if value is None:
        return b""
    if isinstance(value, bytes):
        return value
    if isinstance(value, str):
        return value.encode("ascii")
    fmt = {b"AT": "<HH", b"FD": "<d", b"FL": "<f", b"SL": "<l", b"SS": "<h", b"SV": "<q",
           b"UL": "<L", b"US": "<H", b"UV": "<Q"}[vr]
    return pack(fmt, 0, 0) if vr == b"AT" else pack(fmt, value)


def _safe(tag: int, creators: dict, profile: Profile) -> bool:
    group, elem = tag >> 16, tag & 0xFFFF
    if elem < 0x1000:
        return elem >= 0x10  # a private creator: kept until its block turns out empty
    creator = creators.get((group, elem >> 8), "")
    return (creator, group, elem & 0xFF) in profile.safe_private


def _without_empty_private_blocks(pieces: list) -> list:
    used = {(t >> 16, (t & 0xFFFF) >> 8) for t, _ in pieces if (t >> 16) % 2 and t & 0xFF00}
    return [(t, p) for t, p in pieces
            if not ((t >> 16) % 2 and 0x10 <= (t & 0xFFFF) < 0x100)
            or (t >> 16, t & 0xFF) in used]


def read_charset(buf: memoryview, raws: list[Raw]) -> list[str]:
    """Python codecs for the top level's Specific Character Set (default: ASCII/Latin-1)."""
    for r in raws:
        if r.tag == 0x00080005:
            terms = [t.strip() for t in _text(bytes(buf[r.value_start:r.value_end])).split("\\")]
            return convert_encodings(terms)
        if r.tag > 0x00080005:
            break
    return convert_encodings(None)


def top_values(buf: memoryview, raws: list[Raw], encodings: list[str]) -> dict[int, str]:
    """The top-level source values the de-identification reads (Patient ID, dates), as text."""
    out = {}
    for r in raws:
        if r.tag in TOP_VALUE_TAGS and r.value_end > r.value_start:
            out[r.tag] = decode_bytes(bytes(buf[r.value_start:r.value_end]), encodings,
                                      set()).rstrip("\0 ")
    return out


def computed_elements(profile: Profile, patient: PatientContext,
                      age: str | None) -> list[tuple[int, bytes]]:
    """The top-level elements radrepo fills in: pseudonyms, SITEID, the method, a filled age."""
    values = {"pseudonym": patient.pseudonym, "siteid": patient.siteid}
    out = []
    for tag, what in profile.computed.items():
        vr = dictionary_VR(tag).encode()
        out.append((tag, encode_element(tag, vr, values.get(what, what).encode("ascii"))))
    out.append((0x00120063, encode_element(0x00120063, b"LO",
                                           profile.method_description.encode("ascii"))))
    items = []
    for value, meaning in profile.method_codes:
        item = (encode_element(0x00080100, b"SH", value.encode("ascii"))
                + encode_element(0x00080102, b"SH", b"DCM")
                + encode_element(0x00080104, b"LO", meaning.encode("ascii")))
        items.append(pack("<HHI", 0xFFFE, 0xE000, len(item)) + item)
    out.append((0x00120064, encode_element(0x00120064, b"SQ", b"".join(items))))
    if age:
        out.append((0x00101010, encode_element(0x00101010, b"AS", age.encode("ascii"))))
    return out


def encode_file_meta(sop_class: str, sop_uid: str, transfer_syntax: str,
                     implementation_uid: str, implementation_version: str) -> bytes:
    """Preamble, DICM and a fresh file meta group (nothing copied from the source's)."""
    body = (encode_element(0x00020001, b"OB", b"\0\1")
            + encode_element(0x00020002, b"UI", sop_class.encode("ascii"))
            + encode_element(0x00020003, b"UI", sop_uid.encode("ascii"))
            + encode_element(0x00020010, b"UI", transfer_syntax.encode("ascii"))
            + encode_element(0x00020012, b"UI", implementation_uid.encode("ascii"))
            + encode_element(0x00020013, b"SH", implementation_version.encode("ascii")))
    return (b"\0" * 128 + b"DICM" + encode_element(0x00020000, b"UL", pack("<I", len(body)))
            + body)


def dataset_start(buf: memoryview) -> tuple[int, str] | None:
    """(offset of the dataset, transfer syntax) of a Part 10 file; None without a preamble."""
    if len(buf) < 144 or bytes(buf[128:132]) != b"DICM":
        return None
    group_length = unpack_from("<I", buf, 140)[0] if bytes(buf[132:136]) == b"\2\0\0\0" else None
    if group_length is None:
        return None
    end = 144 + group_length
    if end > len(buf):
        raise TruncatedDataset("file ends inside the file meta group")
    for r in elements(buf, 132, end)[0]:
        if r.tag == 0x00020010:
            return end, _text(bytes(buf[r.value_start:r.value_end]))
    return end, ""
