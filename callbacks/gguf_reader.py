"""GGUF header parsing for :mod:`callbacks.checkpoint`: one bounded pass, decoded here.

``gguf.GGUFReader`` is the reference parser, but it trusts the file: it memory-maps it and
loops over whatever counts the header claims, so a corrupt or hostile file makes it raise
anything from ``KeyError`` to ``RecursionError`` (nested arrays), or silently wrap ``np.prod``
of huge dims to a wrong byte count.  It is also slow on honest files: it builds one numpy
view per array element (~700 bytes and ~12 us each: a 2M-entry tokenizer array costs 44 s
and 1.7 GB) and memmap views per field and per tensor info.  So we parse the header
ourselves, in one streaming pass with bounded reads: every count, length and offset is
checked against the bytes left in the file and the limits below before anything is read or
allocated from it, and values are decoded as they are read (scalars with ``struct``, an array
of scalars with one ``numpy.frombuffer(...).tolist()``, strings as strict UTF-8).  Time is
linear in the header's size and memory a small multiple of it (a Python object per array
element).  The tests keep ``GGUFReader`` as the oracle: on valid files our metadata values
and tensor table must equal its.  Tensor data is never read: the pass stops at the end of the
tensor table, and only the ``gguf`` enums are used at run time.
"""

from __future__ import annotations

import io
import logging
import math
import os
import struct
from dataclasses import dataclass, field
from operator import attrgetter
from typing import NoReturn

import numpy as np
import torch
from gguf import GGMLQuantizationType, GGUFValueType

from .checkpoint import TensorRecord, checkpoint_error, sniff
from .gguf_dequant import SUPPORTED_TYPES, quantized_nbytes

__all__ = ["read_gguf_header", "GGUF_PLAIN_DTYPES"]

logger = logging.getLogger(__name__)

MAX_ARRAY_ITEMS = 2_000_000
"""Total metadata array elements accepted.  LLM tokenizers hold under 1M (a 256k vocabulary
with scores and types is 0.8M).  Each element becomes a Python object of up to ~60 bytes
(an int, a float or a short string, plus its list slot), so this bounds the decoded arrays
to ~120 MB however the file's bytes are spent."""
MAX_HEADER_BYTES = 100 * 1024 * 1024
"""Longest header (metadata plus tensor table) accepted, as for safetensors: real ones, an
embedded tokenizer included, stay well under 20 MB.  It bounds what strings can cost."""
_LIMIT = "the 100 MiB header limit"
MAX_TENSORS = 1_000_000
"""Tensor infos accepted; real models have a few thousand."""
MAX_NAME_BYTES = 65_535
"""Longest key or tensor name (the GGUF spec caps keys at 65535 bytes)."""
MAX_DIMS = 8
"""ggml itself stops at 4, but GGUFWriter writes any rank (5-D conv weights do occur)."""
MAX_ARRAY_DEPTH = 8
"""Nested arrays deeper than this are refused (decoding recurses once per level)."""
SUPPORTED_VERSIONS = (2, 3)
_FIX = "The GGUF file is corrupt or truncated: re-download or re-convert it."

GGUF_PLAIN_DTYPES: dict[GGMLQuantizationType, torch.dtype] = {
    GGMLQuantizationType.F32: torch.float32,
    GGMLQuantizationType.F16: torch.float16,
    GGMLQuantizationType.BF16: torch.bfloat16,
    GGMLQuantizationType.F64: torch.float64,
    GGMLQuantizationType.I8: torch.int8,
    GGMLQuantizationType.I16: torch.int16,
    GGMLQuantizationType.I32: torch.int32,
    GGMLQuantizationType.I64: torch.int64,
}
"""GGML types that are plain arrays of one scalar type: recorded with a torch dtype."""

_SCALARS = {  # little-endian struct formats, which numpy also reads as dtypes
    GGUFValueType.UINT8: struct.Struct("<B"),
    GGUFValueType.INT8: struct.Struct("<b"),
    GGUFValueType.BOOL: struct.Struct("<?"),
    GGUFValueType.UINT16: struct.Struct("<H"),
    GGUFValueType.INT16: struct.Struct("<h"),
    GGUFValueType.UINT32: struct.Struct("<I"),
    GGUFValueType.INT32: struct.Struct("<i"),
    GGUFValueType.FLOAT32: struct.Struct("<f"),
    GGUFValueType.UINT64: struct.Struct("<Q"),
    GGUFValueType.INT64: struct.Struct("<q"),
    GGUFValueType.FLOAT64: struct.Struct("<d"),
}
# Dict lookups instead of enum calls: these run once per key, array and tensor info.
_VALUE_TYPES = {int(t): t for t in GGUFValueType}
_QTYPES = {int(t): t for t in GGMLQuantizationType}
_U32, _U64 = struct.Struct("<I"), struct.Struct("<Q")
_INFO_TAILS = [struct.Struct(f"<{n}QIQ") for n in range(MAX_DIMS + 1)]  # dims, type, offset
_MIN_KV_BYTES = 8 + 4 + 1  # key length, value type, smallest value
_MIN_TENSOR_INFO_BYTES = 8 + 4 + 4 + 8  # name length, n_dims, type, offset
_FIXED_HEADER_BYTES = 4 + 4 + 8 + 8  # magic, version, tensor count, kv count


@dataclass(slots=True)
class _TensorInfo:
    name: str
    dims: tuple[int, ...]  # GGUF order: innermost first
    qtype: GGMLQuantizationType
    rel_offset: int


@dataclass
class _Scan:
    """What the pass learned: decoded metadata and the tensor table, not yet validated."""

    metadata: dict[str, object] = field(default_factory=dict)
    tensors: list[_TensorInfo] = field(default_factory=list)
    alignment: int = 32
    data_start: int = 0
    array_items: int = 0


class _Cursor:
    """Bounded sequential reads: every length is checked against the bytes left first.

    ``what`` and ``key`` only label errors; they are passed apart so that the hot loops
    (one call per string of a tokenizer array) never format a message that is not raised.
    """

    def __init__(self, f: io.BufferedReader, path: str, size: int) -> None:
        self.f, self.path, self.size, self.pos = f, path, size, 0
        self.limit = min(size, MAX_HEADER_BYTES)

    def need(self, n: int, what: str, key: str | None = None) -> None:
        if n > self.limit - self.pos:
            self.short(n, what, key)

    def short(self, n: int, what: str, key: str | None) -> NoReturn:
        """Raise the error for a read of ``n`` bytes that the file or the limit cannot hold."""
        where = what if key is None else f"{what} of {key!r}"
        if n > self.size - self.pos:
            problem = (
                f"{where} at byte {self.pos} needs {n} bytes, but only "
                f"{self.size - self.pos} remain in the file"
            )
        else:
            problem = f"{where} at byte {self.pos} would take the header past {_LIMIT}"
        raise checkpoint_error(self.path, problem, _FIX)

    def take(self, n: int, what: str, key: str | None = None) -> bytes:
        if n > self.limit - self.pos:  # need(), inlined: this runs once per field
            self.short(n, what, key)
        data = self.f.read(n)
        if len(data) != n:
            raise checkpoint_error(self.path, "the file shrank while being read", _FIX)
        self.pos += n
        return data

    def u32(self, what: str, key: str | None = None) -> int:
        return _U32.unpack(self.take(4, what, key))[0]

    def u64(self, what: str, key: str | None = None) -> int:
        return _U64.unpack(self.take(8, what, key))[0]

    def text(self, what: str, key: str | None = None, max_bytes: int | None = None) -> str:
        """A GGUF string (u64 length, then bytes) decoded as strict UTF-8."""
        length = self.u64(what, key)
        if max_bytes is not None and length > max_bytes:
            raise checkpoint_error(self.path, f"{what} is {length} bytes long", _FIX)
        raw = self.take(length, what, key)
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            where = what if key is None else f"{what} of {key!r}"
            raise checkpoint_error(self.path, f"{where} {raw[:64]!r} is not UTF-8", _FIX) from None

    def name(self, what: str) -> str:
        return self.text(what, max_bytes=MAX_NAME_BYTES)


def _value_type(cur: _Cursor, raw: int, key: str) -> GGUFValueType:
    vtype = _VALUE_TYPES.get(raw)
    if vtype is None:
        raise checkpoint_error(cur.path, f"metadata {key!r} has unknown value type {raw}", _FIX)
    return vtype


def _read_value(cur: _Cursor, scan: _Scan, vtype: GGUFValueType, key: str, depth: int) -> object:
    """Decode one metadata value; array lengths are bounded by the bytes left and limits.

    Values come out as GGUFReader's ``contents()`` gives them (int, float, bool, str, list),
    except that nested arrays stay nested lists where GGUFReader flattens them.
    """
    scalar = _SCALARS.get(vtype)
    if scalar is not None:
        return scalar.unpack(cur.take(scalar.size, "value", key))[0]
    if vtype == GGUFValueType.STRING:
        return cur.text("string value", key)
    # ARRAY: _VALUE_TYPES only knows these three kinds
    if depth >= MAX_ARRAY_DEPTH:
        raise checkpoint_error(cur.path, f"metadata {key!r} nests arrays too deeply", _FIX)
    itype = _value_type(cur, cur.u32("array type", key), key)
    count = cur.u64("array length", key)
    scan.array_items += count
    if scan.array_items > MAX_ARRAY_ITEMS:
        raise checkpoint_error(
            cur.path,
            f"metadata arrays hold more than {MAX_ARRAY_ITEMS} elements (at {key!r})",
            "Such a file is either corrupt or not a model checkpoint.",
        )
    scalar = _SCALARS.get(itype)
    if scalar is not None:  # one read and one conversion for the whole array
        raw = cur.take(count * scalar.size, f"array of {count} {itype.name}", key)
        return np.frombuffer(raw, dtype=scalar.format).tolist()
    min_item = 8 if itype == GGUFValueType.STRING else 12  # a length / a type and a length
    cur.need(count * min_item, f"array of {count} {itype.name}", key)
    if itype == GGUFValueType.STRING:
        text = cur.text
        return [text("string in array", key) for _ in range(count)]
    return [_read_value(cur, scan, itype, key, depth + 1) for _ in range(count)]


def _scan_header(path: str, f: io.BufferedReader, size: int) -> _Scan:
    """Read the whole GGUF header with bounded reads, validating structure and counts."""
    cur = _Cursor(f, path, size)
    head = f.read(_FIXED_HEADER_BYTES)
    if len(head) < _FIXED_HEADER_BYTES or head[:4] != b"GGUF":
        raise checkpoint_error(
            path, f"not a GGUF file: it does not start with the GGUF magic{sniff(head)}", _FIX
        )
    version, n_tensors, n_kv = struct.unpack("<IQQ", head[4:])
    cur.pos = _FIXED_HEADER_BYTES
    if int.from_bytes(head[4:8], "big") in SUPPORTED_VERSIONS:
        raise checkpoint_error(
            path, "big-endian GGUF files are not supported", "Use a little-endian conversion."
        )
    if version not in SUPPORTED_VERSIONS:
        raise checkpoint_error(
            path,
            f"GGUF version {version} is not supported (only {SUPPORTED_VERSIONS})",
            "Re-convert the model with a current llama.cpp / gguf tool.",
        )
    if n_tensors > MAX_TENSORS:
        raise checkpoint_error(path, f"the header claims {n_tensors} tensors", _FIX)
    claimed = n_kv * _MIN_KV_BYTES + n_tensors * _MIN_TENSOR_INFO_BYTES
    if claimed > size - cur.pos:
        raise checkpoint_error(
            path,
            f"the header claims {n_kv} metadata entries and {n_tensors} tensors, which need "
            f"at least {claimed} bytes, but the file has {size - cur.pos} left",
            _FIX,
        )
    scan = _Scan()
    metadata = scan.metadata
    for _ in range(n_kv):
        key = cur.name("metadata key")
        if key in metadata:
            raise checkpoint_error(path, f"metadata key {key!r} appears twice", _FIX)
        vtype = _value_type(cur, cur.u32("value type", key), key)
        if key == "general.alignment":
            align = cur.u32("value", key) if vtype == GGUFValueType.UINT32 else 0
            if align == 0 or align & (align - 1):
                raise checkpoint_error(path, "general.alignment is not a power-of-two UINT32", _FIX)
            scan.alignment = metadata[key] = align
        else:
            metadata[key] = _read_value(cur, scan, vtype, key, 0)
    names: set[str] = set()
    for _ in range(n_tensors):
        name = cur.name("tensor name")
        if name in names:
            raise checkpoint_error(path, "tensor name appears twice", _FIX, tensor=name)
        names.add(name)
        n_dims = cur.u32("tensor n_dims")
        if n_dims > MAX_DIMS:
            raise checkpoint_error(path, f"{n_dims} dimensions (max {MAX_DIMS})", _FIX, tensor=name)
        tail = _INFO_TAILS[n_dims]  # dims, type and offset in one read: a big table is slow
        if tail.size > cur.limit - cur.pos:  # cut short: read field by field to name the field
            cur.take(8 * n_dims, "tensor dims")
            cur.u32("tensor type")
            cur.short(8, "tensor offset", None)
        fields = tail.unpack(cur.take(tail.size, "tensor info"))
        dims, raw_type, rel_offset = fields[:n_dims], fields[-2], fields[-1]
        if dims and max(dims) >= 1 << 63:  # no int64 shape could hold it
            raise checkpoint_error(path, f"dimension in {dims} is absurd", _FIX, tensor=name)
        qtype = _QTYPES.get(raw_type)
        if qtype is None:
            raise checkpoint_error(
                path,
                f"GGML type id {raw_type} is unknown to the installed gguf package, so its "
                "size cannot be computed",
                "Upgrade gguf (pip install -U gguf) or re-quantize to a known type.",
                tensor=name,
            )
        scan.tensors.append(_TensorInfo(name, dims, qtype, rel_offset))
    scan.data_start = -(-cur.pos // scan.alignment) * scan.alignment
    return scan


def _record(path: str, size: int, scan: _Scan, info: _TensorInfo) -> TensorRecord:
    """Validate one tensor's size and extent against the file; return its record."""
    shape = info.dims[::-1]
    numel = math.prod(shape)
    dtype = GGUF_PLAIN_DTYPES.get(info.qtype)
    if dtype is not None:
        nbytes, qtype = numel * dtype.itemsize, None
    else:
        try:
            nbytes = quantized_nbytes(info.qtype, shape, name=info.name)
        except ValueError as exc:
            raise checkpoint_error(path, str(exc), _FIX, tensor=info.name) from None
        qtype = info.qtype
    offset = scan.data_start + info.rel_offset
    if offset + nbytes > size:
        raise checkpoint_error(
            path,
            f"its {info.qtype.name} data [{offset}, {offset + nbytes}) runs past the end of the "
            f"{size}-byte file",
            _FIX,
            tensor=info.name,
        )
    return TensorRecord(info.name, shape, dtype, qtype, nbytes, path, offset)


def _check_overlaps(path: str, records: dict[str, TensorRecord]) -> None:
    """Two tensors sharing bytes means a corrupt tensor table (no writer produces it)."""
    spans = sorted((r.offset, r.offset + r.nbytes, r.name) for r in records.values() if r.nbytes)
    for (_, prev_end, prev_name), (begin, end, name) in zip(spans, spans[1:]):
        if begin < prev_end:
            raise checkpoint_error(
                path,
                f"its bytes [{begin}, {end}) overlap those of {prev_name!r}",
                _FIX,
                tensor=name,
            )


def read_gguf_header(path: str) -> tuple[dict[str, TensorRecord], dict[str, object], int]:
    """Parse a GGUF file's header; returns (records in data order, metadata, file size).

    Quantized tensors of types :mod:`callbacks.gguf_dequant` cannot decode are still
    recorded (with their ``qtype``): whether to refuse them is the loader's decision.
    """
    with open(path, "rb", buffering=1 << 20) as f:
        size = os.fstat(f.fileno()).st_size
        scan = _scan_header(path, f, size)
    records: dict[str, TensorRecord] = {}
    for info in scan.tensors:
        records[info.name] = _record(path, size, scan, info)
    _check_overlaps(path, records)
    in_order = sorted(records.values(), key=attrgetter("offset"))
    records = {record.name: record for record in in_order}  # data order
    unsupported = {
        r.qtype.name
        for r in records.values()
        if r.qtype is not None and r.qtype not in SUPPORTED_TYPES
    }
    if unsupported:
        logger.info("%s: quant types without a dequantizer: %s", path, sorted(unsupported))
    return records, scan.metadata, size
