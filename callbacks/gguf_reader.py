"""GGUF header parsing for :mod:`callbacks.checkpoint`: validated first, then ``GGUFReader``.

``gguf.GGUFReader`` is the reference parser, but it trusts the file: it memory-maps it and
loops over whatever counts the header claims, so a corrupt or hostile file makes it raise
anything from ``KeyError`` to ``RecursionError`` (nested arrays), build one numpy view per
array element (~700 bytes and ~12 us each, so a bogus billion-element array exhausts RAM),
or silently wrap ``np.prod`` of huge dims to a wrong byte count.  Hence a cheap streaming
pre-scan walks the same structure with bounded reads first, checking every count and offset
against the file size and limits, and only then is ``GGUFReader`` asked for the metadata
values; its tensor table is cross-checked against the pre-scan.  Neither touches tensor
data: the pre-scan only reads the header, and the reader's memmap views are never read and
are dropped before returning, so no file pages stay mapped.
"""

from __future__ import annotations

import io
import logging
import os
import struct
from dataclasses import dataclass, field

import torch
from gguf import GGMLQuantizationType, GGUFReader, GGUFValueType

from .checkpoint import TensorRecord, checkpoint_error, sniff
from .gguf_dequant import SUPPORTED_TYPES, quantized_nbytes

__all__ = ["read_gguf_header", "GGUF_PLAIN_DTYPES"]

logger = logging.getLogger(__name__)

MAX_ARRAY_ITEMS = 2_000_000
"""Total metadata array elements accepted: LLM tokenizers hold under 1M; GGUFReader needs
~700 bytes per element, so this bounds it to ~1.4 GB."""
MAX_TENSORS = 1_000_000
"""Tensor infos accepted; real models have a few thousand."""
MAX_NAME_BYTES = 65_535
"""Longest key or tensor name (the GGUF spec caps keys at 65535 bytes)."""
MAX_DIMS = 8
"""ggml itself stops at 4, but GGUFWriter writes any rank (5-D conv weights do occur)."""
MAX_ARRAY_DEPTH = 8
"""Nested arrays deeper than this are refused (GGUFReader recurses once per level)."""
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

_SCALAR_SIZES = {
    GGUFValueType.UINT8: 1,
    GGUFValueType.INT8: 1,
    GGUFValueType.BOOL: 1,
    GGUFValueType.UINT16: 2,
    GGUFValueType.INT16: 2,
    GGUFValueType.UINT32: 4,
    GGUFValueType.INT32: 4,
    GGUFValueType.FLOAT32: 4,
    GGUFValueType.UINT64: 8,
    GGUFValueType.INT64: 8,
    GGUFValueType.FLOAT64: 8,
}
_MIN_KV_BYTES = 8 + 4 + 1  # key length, value type, smallest value
_MIN_TENSOR_INFO_BYTES = 8 + 4 + 4 + 8  # name length, n_dims, type, offset
_FIXED_HEADER_BYTES = 4 + 4 + 8 + 8  # magic, version, tensor count, kv count


@dataclass
class _TensorInfo:
    name: str
    dims: tuple[int, ...]  # GGUF order: innermost first
    qtype: GGMLQuantizationType
    rel_offset: int


@dataclass
class _Scan:
    """What the pre-scan learned: enough to validate every tensor without GGUFReader."""

    keys: list[str] = field(default_factory=list)
    tensors: list[_TensorInfo] = field(default_factory=list)
    alignment: int = 32
    data_start: int = 0
    array_items: int = 0


class _Cursor:
    """Bounded sequential reads: every length is checked against the bytes left first."""

    def __init__(self, f: io.BufferedReader, path: str, size: int) -> None:
        self.f, self.path, self.size, self.pos = f, path, size, 0

    def need(self, n: int, what: str) -> None:
        if n > self.size - self.pos:
            raise checkpoint_error(
                self.path,
                f"{what} at byte {self.pos} needs {n} bytes, but only {self.size - self.pos} "
                "remain in the file",
                _FIX,
            )

    def take(self, n: int, what: str) -> bytes:
        self.need(n, what)
        data = self.f.read(n)
        if len(data) != n:
            raise checkpoint_error(self.path, "the file shrank while being read", _FIX)
        self.pos += n
        return data

    def skip(self, n: int, what: str) -> None:
        self.need(n, what)
        self.f.seek(n, io.SEEK_CUR)
        self.pos += n

    def u32(self, what: str) -> int:
        return struct.unpack("<I", self.take(4, what))[0]

    def u64(self, what: str) -> int:
        return struct.unpack("<Q", self.take(8, what))[0]

    def name(self, what: str) -> str:
        length = self.u64(f"{what} length")
        if length > MAX_NAME_BYTES:
            raise checkpoint_error(self.path, f"{what} is {length} bytes long", _FIX)
        raw = self.take(length, what)
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            raise checkpoint_error(self.path, f"{what} {raw[:64]!r} is not UTF-8", _FIX) from None


def _value_type(cur: _Cursor, raw: int, key: str) -> GGUFValueType:
    try:
        return GGUFValueType(raw)
    except ValueError:
        raise checkpoint_error(cur.path, f"metadata {key!r} has unknown value type {raw}", _FIX)


def _skip_value(cur: _Cursor, scan: _Scan, vtype: GGUFValueType, key: str, depth: int) -> None:
    """Step over one metadata value, bounding array lengths by the bytes left and limits."""
    if vtype in _SCALAR_SIZES:
        cur.skip(_SCALAR_SIZES[vtype], f"value of {key!r}")
    elif vtype == GGUFValueType.STRING:
        cur.skip(cur.u64(f"string length of {key!r}"), f"string value of {key!r}")
    else:  # ARRAY: GGUFValueType() only knows these three kinds
        if depth >= MAX_ARRAY_DEPTH:
            raise checkpoint_error(cur.path, f"metadata {key!r} nests arrays too deeply", _FIX)
        itype = _value_type(cur, cur.u32(f"array type of {key!r}"), key)
        count = cur.u64(f"array length of {key!r}")
        scan.array_items += count
        if scan.array_items > MAX_ARRAY_ITEMS:
            raise checkpoint_error(
                cur.path,
                f"metadata arrays hold more than {MAX_ARRAY_ITEMS} elements (at {key!r})",
                "Such a file is either corrupt or not a model checkpoint.",
            )
        if itype in _SCALAR_SIZES:
            cur.skip(count * _SCALAR_SIZES[itype], f"array {key!r} of {count} {itype.name}")
            return
        min_item = 8 if itype == GGUFValueType.STRING else 12
        cur.need(count * min_item, f"array {key!r} of {count} {itype.name}")
        for _ in range(count):
            _skip_value(cur, scan, itype, key, depth + 1)


def _scan_header(path: str, f: io.BufferedReader, size: int) -> _Scan:
    """Walk the whole GGUF header with bounded reads, validating structure and counts."""
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
    for _ in range(n_kv):
        key = cur.name("metadata key")
        if key in scan.keys:
            raise checkpoint_error(path, f"metadata key {key!r} appears twice", _FIX)
        vtype = _value_type(cur, cur.u32(f"value type of {key!r}"), key)
        if key == "general.alignment":
            align = cur.u32("general.alignment") if vtype == GGUFValueType.UINT32 else 0
            if align == 0 or align & (align - 1):
                raise checkpoint_error(path, "general.alignment is not a power-of-two UINT32", _FIX)
            scan.alignment = align
        else:
            _skip_value(cur, scan, vtype, key, 0)
        scan.keys.append(key)
    names: set[str] = set()
    for _ in range(n_tensors):
        name = cur.name("tensor name")
        if name in names:
            raise checkpoint_error(path, "tensor name appears twice", _FIX, tensor=name)
        names.add(name)
        n_dims = cur.u32("tensor n_dims")
        if n_dims > MAX_DIMS:
            raise checkpoint_error(path, f"{n_dims} dimensions (max {MAX_DIMS})", _FIX, tensor=name)
        dims = struct.unpack(f"<{n_dims}Q", cur.take(8 * n_dims, "tensor dims"))
        if any(dim >= 1 << 63 for dim in dims):  # no int64 shape could hold it
            raise checkpoint_error(path, f"dimension in {dims} is absurd", _FIX, tensor=name)
        raw_type = cur.u32("tensor type")
        try:
            qtype = GGMLQuantizationType(raw_type)
        except ValueError:
            raise checkpoint_error(
                path,
                f"GGML type id {raw_type} is unknown to the installed gguf package, so its "
                "size cannot be computed",
                "Upgrade gguf (pip install -U gguf) or re-quantize to a known type.",
                tensor=name,
            ) from None
        scan.tensors.append(_TensorInfo(name, dims, qtype, cur.u64("tensor offset")))
    scan.data_start = -(-cur.pos // scan.alignment) * scan.alignment
    return scan


def _record(path: str, size: int, scan: _Scan, info: _TensorInfo) -> TensorRecord:
    """Validate one tensor's size and extent against the file; return its record."""
    shape = tuple(reversed(info.dims))
    numel = 1
    for dim in shape:
        numel *= dim
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


def _reader_metadata(path: str, scan: _Scan, records: dict[str, TensorRecord]) -> dict[str, object]:
    """Let ``GGUFReader`` decode the metadata values, turning whatever it raises into ours.

    Its tensor table must agree with the pre-scan (names, types, absolute offsets, sizes);
    ``ReaderTensor.data_offset`` is absolute in the file, like ``TensorRecord.offset``.
    Nested arrays come back flattened: that is what ``ReaderField.contents`` returns.
    """
    failure = ""
    try:
        reader = GGUFReader(path, "r")
        values = {key: reader.fields[key].contents() for key in scan.keys}
        table = [(t.name, int(t.tensor_type), t.data_offset, t.n_bytes) for t in reader.tensors]
        reader_start = reader.data_offset
    except Exception as exc:  # untrusted input into a third-party parser: anything can escape
        failure = f"{type(exc).__name__}: {str(exc)[:200]}"
    reader = None  # drop the memmap and every view into it now, not at some later GC
    if failure:  # raised out here so no exception context pins the reader's frames
        raise checkpoint_error(path, f"the gguf package cannot parse it ({failure})", _FIX)
    expected = [
        (r.name, int(r.qtype if r.qtype is not None else info.qtype), r.offset, r.nbytes)
        for r, info in zip(records.values(), scan.tensors)
    ]
    if reader_start != scan.data_start or table != expected:
        raise checkpoint_error(
            path, "the gguf package reads the tensor table differently from the header", _FIX
        )
    return values


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
    metadata = _reader_metadata(path, scan, records)
    records = dict(sorted(records.items(), key=lambda item: item[1].offset))  # data order
    unsupported = {
        r.qtype.name
        for r in records.values()
        if r.qtype is not None and r.qtype not in SUPPORTED_TYPES
    }
    if unsupported:
        logger.info("%s: quant types without a dequantizer: %s", path, sorted(unsupported))
    return records, metadata, size
