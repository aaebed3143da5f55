"""GGUF header parsing is bounded by the file: time linear in its size, memory a small multiple.

Hypothesis builds GGUF files of at most 4 MB that each stress one part of the header (or all
at once): many metadata keys, a huge array of one scalar type, many string arrays, nested
arrays, many tensor infos -- sometimes truncated or with eight bytes overwritten by an absurd
count.  Hand-picked worst cases join them: 100,000 keys in 2.3 MB, one 1,000,000-element
UINT32 array, 150,000 tensor infos.  Every file must be parsed (into exactly the values it
was built from, when intact) or refused with :class:`CheckpointError`, within 5 s of CPU time
and under 256 MB of peak traced allocation.  Time and memory come from two parses of the
same file: ``tracemalloc`` slows each allocation several-fold, so a traced parse would time
the tracer, and CPU time (not wall time) keeps a busy test machine from failing the test.

``gguf.GGUFReader`` stays the oracle, in the tests only: on small valid files our metadata
values (nested arrays flattened, as it returns them) and tensor table must equal its.

Budget: ~30 s on two cores; hypothesis' database is off, so nothing is written to the repo.
"""

from __future__ import annotations

import importlib.util
import itertools
import os
import struct
import time
import tracemalloc

import gguf
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_checkpoint_fuzz import _watchdog

from comfyui_wan_blockswap.callbacks.checkpoint import CheckpointError
from comfyui_wan_blockswap.callbacks.gguf_reader import (
    GGUF_PLAIN_DTYPES,
    MAX_ARRAY_ITEMS,
    read_gguf_header,
)

HERE = os.path.dirname(os.path.abspath(__file__))
_spec = importlib.util.spec_from_file_location(
    "make_bad_checkpoints", os.path.join(HERE, "data", "make_bad_checkpoints.py")
)
corpus = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(corpus)
gstr, kv, tensor_info, u32, u64 = corpus.gstr, corpus.kv, corpus.tensor_info, corpus.u32, corpus.u64

MAX_FILE_BYTES = 4 * 1024 * 1024
MAX_CPU_S = 5.0
MAX_TRACED_BYTES = 256 * 1024 * 1024
WATCHDOG_S = 120  # wall clock, traced parse included: only catches hangs
STRING, ARRAY = int(gguf.GGUFValueType.STRING), int(gguf.GGUFValueType.ARRAY)
I8 = int(gguf.GGMLQuantizationType.I8)
NUMPY_TYPES = {  # GGUF scalar value type -> little-endian numpy dtype
    0: "<u1", 1: "<i1", 2: "<u2", 3: "<i2", 4: "<u4", 5: "<i4",
    6: "<f4", 7: "<?", 10: "<u8", 11: "<i8", 12: "<f8",
}  # fmt: skip
SETTINGS = dict(deadline=None, database=None, suppress_health_check=list(HealthCheck))


# ---------------------------------------------------------------------------------------------
# The property
# ---------------------------------------------------------------------------------------------


def _parse(path: str):
    try:
        return read_gguf_header(path)
    except CheckpointError as exc:
        assert os.path.basename(path) in str(exc), str(exc)
        return None


def _parse_bounded(path: str, blob: bytes):
    """The property: header tuple or None (refused), in bounded CPU time and memory."""
    assert len(blob) <= MAX_FILE_BYTES
    with open(path, "wb") as f:
        f.write(blob)
    with _watchdog(WATCHDOG_S, "parsing"):
        start = time.thread_time()
        result = _parse(path)
        cpu = time.thread_time() - start
        tracemalloc.start()
        try:
            traced = _parse(path)
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
    size = f"{len(blob) / 1e6:.2f} MB file"
    assert cpu < MAX_CPU_S, f"{cpu:.2f} s of CPU for a {size}"
    assert peak < MAX_TRACED_BYTES, f"{peak / 1e6:.0f} MB traced for a {size}"
    assert (traced is None) == (result is None)
    return result


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    return tmp_path_factory.mktemp("bounded")


# ---------------------------------------------------------------------------------------------
# Building files (and the values they hold)
# ---------------------------------------------------------------------------------------------

_NAME_CHARS = [chr(c) for c in range(33, 127)]


def _short_names(n: int) -> list[str]:
    """``n`` distinct names, shortest first: packs the most tensor infos into 4 MB."""
    names = (
        "".join(chars)
        for length in itertools.count(1)
        for chars in itertools.product(_NAME_CHARS, repeat=length)
    )
    return list(itertools.islice(names, n))


def _scalars(vtype: int, count: int, rng: np.random.Generator) -> np.ndarray:
    dtype = np.dtype(NUMPY_TYPES[vtype])
    if dtype.kind == "f":
        return rng.standard_normal(count).astype(dtype)  # no NaN: keeps == comparisons
    if dtype.kind == "b":
        return rng.integers(0, 2, count).astype(dtype)
    info = np.iinfo(dtype)
    return rng.integers(info.min, info.max, count, dtype=dtype, endpoint=True)


def _scalar_array(vtype: int, values: np.ndarray) -> bytes:
    return u32(vtype) + u64(len(values)) + values.tobytes()


def _string_array(strings: list[str]) -> bytes:
    return u32(STRING) + u64(len(strings)) + b"".join(gstr(s) for s in strings)


_WORDS_CHARS = list("abcxyz019 .-_éß字😀")


def _string_pool(rng: np.random.Generator) -> list[str]:
    """Strings of 0..12 characters, ASCII and not, to pick from (drawing each is slow)."""
    return ["".join(rng.choice(_WORDS_CHARS, rng.integers(0, 13))) for _ in range(512)]


def _nested(depth: int, width: int, leaf_len: int) -> tuple[bytes, list]:
    """Arrays ``depth`` levels deep, ``width`` wide, UINT16 leaf arrays of ``leaf_len``."""
    if depth == 1:
        values = np.arange(leaf_len, dtype="<u2")
        return _scalar_array(2, values), values.tolist()
    inner, value = _nested(depth - 1, width, leaf_len)
    return u32(ARRAY) + u64(width) + inner * width, [value] * width


def _keys(rng: np.random.Generator, budget: int) -> tuple[list[bytes], dict]:
    """Many keys, each with a scalar of a type cycling through all scalar types."""
    kvs, expected = [], {}
    vtypes = list(NUMPY_TYPES)
    for i in range(budget // 26):  # 8 + 10 key bytes + 4 type + ~4 value
        vtype = vtypes[i % len(vtypes)]
        value = _scalars(vtype, 1, rng) if i < 64 else np.zeros(1, NUMPY_TYPES[vtype])
        key = f"key.{i:06d}"
        kvs.append(kv(key, vtype, value.tobytes()))
        expected[key] = value.tolist()[0]
    return kvs, expected


def _tensors(rng: np.random.Generator, n: int) -> tuple[list[bytes], bytes]:
    """``n`` small tensor infos (I8 scalars, F32 vectors, Q8_0 rows) and their data."""
    infos, offset = [], 0
    kinds = rng.integers(0, 8, n)  # mostly 1-byte I8 scalars: the most infos per MB
    for name, kind in zip(_short_names(n), kinds.tolist()):
        dims, ttype, nbytes = {0: ([4], 0, 16), 1: ([32], 8, 34)}.get(kind, ([], I8, 1))
        infos.append(tensor_info(name, dims, ttype, offset))
        offset += nbytes
    return infos, bytes(offset)


def _big_file(
    kind: str, budget: int, seed: int, vtype: int, n_arrays: int, depth: int, leaf_len: int
) -> tuple[bytes, dict | None, int]:
    """(file, metadata it holds or None if it must be refused, tensor count).

    ``kind`` picks the part of the header that takes the ~``budget`` bytes ("mixed": all).
    """
    rng = np.random.default_rng(seed)
    parts = ["keys", "array", "strings", "nested", "tensors"] if kind == "mixed" else [kind]
    budget //= len(parts)
    kvs, expected, tensors, data, refused = [], {}, [], b"", False
    if "keys" in parts:
        kvs, expected = _keys(rng, budget)
    if "array" in parts:
        values = _scalars(vtype, budget // np.dtype(NUMPY_TYPES[vtype]).itemsize, rng)
        kvs.append(kv("big.array", ARRAY, _scalar_array(vtype, values)))
        expected["big.array"] = values.tolist()
        refused |= len(values) > MAX_ARRAY_ITEMS  # 1-byte types can hold more than allowed
    if "strings" in parts:
        pool, per_array = _string_pool(rng), budget // n_arrays // 17  # ~8 + ~9 bytes each
        for i in range(n_arrays):
            strings = [pool[k] for k in rng.integers(0, len(pool), per_array)]
            kvs.append(kv(f"strings.{i}", ARRAY, _string_array(strings)))
            expected[f"strings.{i}"] = strings
    if "nested" in parts:
        # width ** (depth - 1) leaf arrays; the levels above them take at most as many bytes
        leaves = budget / 2 / (12 + 2 * leaf_len)
        width = max(int(leaves ** (1 / max(depth - 1, 1))), 1)
        payload, expected["nested"] = _nested(depth, width, leaf_len)
        kvs.append(kv("nested", ARRAY, payload))
        items = sum(width**level for level in range(1, depth)) + width ** (depth - 1) * leaf_len
        refused |= depth > 8 or items > MAX_ARRAY_ITEMS
    if "tensors" in parts:
        tensors, data = _tensors(rng, budget // 36)  # ~34 bytes each
    blob = corpus.gguf_bytes(kvs, tensors, data)
    return blob, None if refused else expected, len(tensors)


_big_files = st.builds(
    _big_file,
    kind=st.sampled_from(["keys", "array", "strings", "nested", "tensors", "mixed"]),
    budget=st.one_of(st.integers(1_000, 200_000), st.integers(1_000_000, 3_800_000)),
    seed=st.integers(0, 2**32 - 1),
    vtype=st.sampled_from(list(NUMPY_TYPES)),
    n_arrays=st.integers(1, 3000),
    depth=st.integers(1, 9),
    leaf_len=st.integers(0, 64),
)


def _damage(data: st.DataObject, blob: bytes) -> bytes:
    """Cut the file short, or overwrite eight bytes with an absurd (or small) count."""
    how = data.draw(st.sampled_from(["truncate", "overwrite"]))
    at = data.draw(st.integers(0, len(blob) - 8))
    if how == "truncate":
        return blob[:at]
    value = data.draw(st.sampled_from([2**31, 2**32 - 1, 2**40, 2**63, 2**64 - 1, 3, 0]))
    return blob[:at] + u64(value) + blob[at + 8 :]


# ---------------------------------------------------------------------------------------------
# Bounded on big files
# ---------------------------------------------------------------------------------------------


@settings(max_examples=int(os.environ.get("BOUNDED_GGUF_EXAMPLES", "10")), **SETTINGS)
@given(built=_big_files, damaged=st.booleans(), data=st.data())
def test_big_headers_are_parsed_or_refused_within_bounds(workdir, built, damaged, data):
    blob, expected, n_tensors = built
    if damaged:
        _parse_bounded(os.path.join(workdir, "damaged.gguf"), _damage(data, blob))
        return
    result = _parse_bounded(os.path.join(workdir, "big.gguf"), blob)
    if expected is None:
        assert result is None
    else:
        records, metadata, _ = result
        assert metadata == expected and len(records) == n_tensors


def _many_keys() -> bytes:
    kvs = [kv(f"key.{i:06d}", 0, b"\1") for i in range(100_000)]
    return corpus.gguf_bytes(kvs)


def _million_uint32() -> bytes:
    values = np.arange(1_000_000, dtype="<u4")
    return corpus.gguf_bytes([kv("tokenizer.ids", ARRAY, _scalar_array(4, values))])


def _many_tensor_infos() -> bytes:
    infos = [tensor_info(name, [], I8, i) for i, name in enumerate(_short_names(150_000))]
    return corpus.gguf_bytes([], infos, bytes(150_000))


@pytest.mark.parametrize(
    "build, check",
    [
        (_many_keys, lambda records, metadata: len(metadata) == 100_000),
        (_million_uint32, lambda records, metadata: metadata["tokenizer.ids"][-1] == 999_999),
        (_many_tensor_infos, lambda records, metadata: len(records) == 150_000),
    ],
    ids=["100k-keys", "1M-uint32-array", "150k-tensor-infos"],
)
def test_worst_cases_are_parsed_within_bounds(workdir, build, check):
    blob = build()
    records, metadata, size = _parse_bounded(os.path.join(workdir, "worst.gguf"), blob)
    assert size == len(blob) and check(records, metadata)


def test_worst_cases_are_small_files():
    assert 2_200_000 < len(_many_keys()) < 2_400_000
    assert len(_many_tensor_infos()) <= MAX_FILE_BYTES


# ---------------------------------------------------------------------------------------------
# GGUFReader as the oracle on small valid files
# ---------------------------------------------------------------------------------------------

_INT_RANGES = {0: (0, 2**8 - 1), 1: (-(2**7), 2**7 - 1), 2: (0, 2**16 - 1)}
_INT_RANGES.update({3: (-(2**15), 2**15 - 1), 4: (0, 2**32 - 1), 5: (-(2**31), 2**31 - 1)})
_INT_RANGES.update({10: (0, 2**64 - 1), 11: (-(2**63), 2**63 - 1)})
_FORMATS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?"}
_FORMATS.update({10: "<Q", 11: "<q", 12: "<d"})


def _scalar_values(vtype: int) -> st.SearchStrategy:
    if vtype in _INT_RANGES:
        return st.integers(*_INT_RANGES[vtype])
    if vtype == 7:
        return st.booleans()
    return st.floats(allow_nan=False, width=32 if vtype == 6 else 64)


def _encode_array(itype: int, items: list[tuple[bytes, object]]) -> tuple[bytes, list]:
    payload = u32(itype) + u64(len(items)) + b"".join(raw for raw, _ in items)
    return payload, [value for _, value in items]


@st.composite
def _array(draw, itype: int, min_size: int = 0) -> tuple[bytes, list]:
    return _encode_array(itype, draw(st.lists(_value(itype), min_size=min_size, max_size=5)))


@st.composite
def _value(draw, vtype: int) -> tuple[bytes, object]:
    """(encoded value, the value) for one GGUF value of ``vtype``."""
    if vtype in _FORMATS:
        value = draw(_scalar_values(vtype))
        return struct.pack(_FORMATS[vtype], value), value
    if vtype == STRING:
        text = draw(st.text(max_size=8))
        return gstr(text), text
    itype = draw(st.sampled_from([*_FORMATS, STRING, ARRAY]))
    if itype != ARRAY:
        return draw(_array(itype))
    # GGUFReader flattens nested arrays by the type of their first leaf: for it to be a fair
    # oracle, every inner array is non-empty and of one type.
    leaf = draw(st.sampled_from([*_FORMATS, STRING]))
    return _encode_array(ARRAY, draw(st.lists(_array(leaf, 1), min_size=1, max_size=3)))


def _flatten(value: object) -> object:
    """Nested lists as GGUFReader returns them: flattened to their leaves."""
    if not isinstance(value, list) or not value or not isinstance(value[0], list):
        return value
    return [leaf for item in value for leaf in _flatten(item)]


_ORACLE_TYPES = [  # (GGML type, innermost dim, bytes for one row of that many values)
    (gguf.GGMLQuantizationType(t), *gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType(t)])
    for t in (0, 1, 30, 26, 8, 2, 12, 16)  # F32 F16 BF16 I32 Q8_0 Q4_0 Q4_K IQ2_XXS
]


@st.composite
def _small_valid_files(draw) -> tuple[bytes, dict]:
    key = st.text(min_size=1, max_size=10).filter(lambda k: not k.startswith("GGUF."))
    keys = draw(st.lists(key, max_size=8, unique=True))  # GGUF.* names GGUFReader's own
    kvs, expected = [], {}
    for key in keys:
        vtype = draw(st.sampled_from([*_FORMATS, STRING, ARRAY]))
        raw, expected[key] = draw(_value(vtype))
        kvs.append(kv(key, vtype, raw))
    tensors, offset = [], 0
    for name in draw(st.lists(st.text(min_size=1, max_size=6), max_size=4, unique=True)):
        qtype, block, type_size = draw(st.sampled_from(_ORACLE_TYPES))
        rows = draw(st.integers(1, 3))
        tensors.append(tensor_info(name, [block, rows], int(qtype), offset))
        offset += -(-rows * type_size // 32) * 32  # GGUFReader expects aligned offsets
    return corpus.gguf_bytes(kvs, tensors, bytes(offset)), expected


@settings(max_examples=int(os.environ.get("GGUF_ORACLE_EXAMPLES", "150")), **SETTINGS)
@given(built=_small_valid_files())
def test_metadata_and_tensors_equal_gguf_readers(workdir, built):
    blob, expected = built
    path = os.path.join(workdir, "oracle.gguf")
    with open(path, "wb") as f:
        f.write(blob)
    records, metadata, _ = read_gguf_header(path)
    reader = gguf.GGUFReader(path)
    assert metadata == expected
    fields = {k: f for k, f in reader.fields.items() if not k.startswith("GGUF.")}
    assert list(metadata) == list(fields)
    for key, value in metadata.items():
        assert _flatten(value) == fields[key].contents(), key
    table = sorted(reader.tensors, key=lambda t: t.data_offset)
    assert [r.name for r in records.values()] == [t.name for t in table]
    for record, ref in zip(records.values(), table):
        assert record.shape == tuple(reversed(ref.shape.tolist()))
        assert (record.offset, record.nbytes) == (ref.data_offset, ref.n_bytes)
        plain = GGUF_PLAIN_DTYPES.get(ref.tensor_type)
        quantized = ref.tensor_type if plain is None else None
        assert (record.dtype, record.qtype) == (plain, quantized)
