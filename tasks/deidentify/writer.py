"""Write a de-identified dataset without re-encoding what did not change.

pydicom's writer costs tens of microseconds per element even when it copies a raw value.
When the output encoding equals the input's, every run of top-level elements that the
profile left untouched (still raw, as read) is copied from the source bytes as one slice,
pixel data included; only changed elements go through pydicom's encoder.
"""

from __future__ import annotations

from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_data_element, write_file_meta_info

PREAMBLE = b"\0" * 128 + b"DICM"
# explicit VRs whose element header has a 4-byte length after two reserved bytes
LONG_HEADER_VRS = frozenset({"OB", "OD", "OF", "OL", "OV", "OW", "SQ", "SV", "UC", "UN", "UR",
                             "UT", "UV"})
UNDEFINED_LENGTH = 0xFFFFFFFF


def _raw_span(elem: RawDataElement) -> tuple[int, int] | None:
    """(start, end) of a defined-length explicit-VR raw element in the source bytes."""
    if elem.VR is None or elem.length == UNDEFINED_LENGTH:
        return None
    header = 12 if elem.VR in LONG_HEADER_VRS else 8
    return elem.value_tell - header, elem.value_tell + elem.length


def _explicit_le_buffer() -> DicomBytesIO:
    buffer = DicomBytesIO()
    buffer.is_little_endian, buffer.is_implicit_VR = True, False
    return buffer


def encode_file(ds: Dataset, meta: FileMetaDataset, source: bytes | None) -> list[bytes]:
    """The output file as chunks: preamble, file meta, then the dataset as explicit VR little
    endian. With ``source`` (the bytes the dataset was read from, in the same encoding),
    untouched raw elements are copied from it instead of re-encoded."""
    head = _explicit_le_buffer()
    write_file_meta_info(head, meta, enforce_standard=True)
    chunks: list[bytes] = [PREAMBLE, head.getvalue()]

    body = _explicit_le_buffer()
    charset = ds._character_set  # the charset the values were decoded with; no element decode
    view = memoryview(source) if source is not None else None
    run: list[int] = []  # [start, end] of the pending run of untouched source bytes

    def emit_body() -> None:
        nonlocal body
        if body.tell():
            chunks.append(body.getvalue())
            body = _explicit_le_buffer()

    def emit_run() -> None:
        if run:
            chunks.append(view[run[0]:run[1]])
            run.clear()

    for tag in sorted(ds.keys()):
        if tag.element == 0 and tag.group > 6:
            continue  # group lengths are retired and would be stale
        elem = ds.get_item(tag)
        span = _raw_span(elem) if view is not None and isinstance(elem, RawDataElement) else None
        if span is None:
            emit_run()
            write_data_element(body, ds[tag], charset)
        elif run and run[1] == span[0]:
            run[1] = span[1]
        else:
            emit_body()
            emit_run()
            run.extend(span)
    emit_run()
    emit_body()
    return chunks
