"""Property tests: malformed checkpoints fail cleanly with CheckpointError, nothing else.

For every generated file -- truncations and byte flips of valid safetensors and GGUF files,
random safetensors headers (absurd lengths, shapes, offsets, dtypes, non-object JSON,
invalid UTF-8), random GGUF headers (bad magic/versions, absurd tensor and KV counts,
unknown value and tensor types, nested arrays) -- ``open_checkpoint`` followed by reading
every record either succeeds with sizes that fit the file and bytes that match it, or
raises :class:`CheckpointError` naming the file.  Each example runs under a watchdog (no
hang) and ``tracemalloc`` (no allocation sized from header numbers: a few-KB file may not
cost more than a few MB).  A differential check against the ``safetensors`` package makes
sure nothing it accepts is refused here.  The hand-made corpus in
``tests/data/bad_checkpoints`` is checked file by file against ``expected.json``.

Budget: well under a minute on two cores (set CHECKPOINT_FUZZ_EXAMPLES for a longer run);
hypothesis' database is off so nothing is written into the repository.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import signal
import struct
import tracemalloc

import gguf
import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as T
from gguf.quants import quantize
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from safetensors.torch import load, save

import comfyui_wan_blockswap.callbacks.gguf_reader  # noqa: F401  (imported up front: keep import cost out of traces)
from comfyui_wan_blockswap.callbacks.checkpoint import (
    SAFETENSORS_DTYPES,
    CheckpointError,
    open_checkpoint,
)
from comfyui_wan_blockswap.callbacks.gguf_dequant import quantized_nbytes

HERE = os.path.dirname(os.path.abspath(__file__))
_spec = importlib.util.spec_from_file_location(
    "make_bad_checkpoints", os.path.join(HERE, "data", "make_bad_checkpoints.py")
)
corpus = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(corpus)

FUZZ = settings(
    max_examples=int(os.environ.get("CHECKPOINT_FUZZ_EXAMPLES", "150")),
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
MAX_TRACED_BYTES = 16 * 1024 * 1024  # for files of at most a few KB
WATCHDOG_S = 10


# ---------------------------------------------------------------------------------------------
# The property
# ---------------------------------------------------------------------------------------------


@contextlib.contextmanager
def _watchdog(seconds: int, what: str = "open/read"):
    """Fail instead of hanging (POSIX main thread only; elsewhere a no-op)."""
    if not hasattr(signal, "SIGALRM"):
        yield
        return

    def on_alarm(signum, frame):
        raise TimeoutError(f"{what} took over {seconds} s")

    previous = signal.signal(signal.SIGALRM, on_alarm)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def _open_and_read_all(path: str, blob: bytes) -> dict[str, bytes] | None:
    """The property.  Returns {name: bytes} on success, None on a clean CheckpointError."""
    with open(path, "wb") as f:
        f.write(blob)
    tracemalloc.start()
    try:
        with _watchdog(WATCHDOG_S):
            try:
                ckpt = open_checkpoint(path)
            except CheckpointError as exc:
                assert os.path.basename(path) in str(exc), str(exc)
                return None
            with ckpt:
                result = {}
                for record in ckpt.records.values():
                    assert record.offset >= 0 and record.offset + record.nbytes <= len(blob)
                    if record.dtype is not None:
                        numel = int(np.prod(record.shape, dtype=object))
                        assert record.nbytes == numel * record.dtype.itemsize
                    else:
                        assert record.nbytes == quantized_nbytes(record.qtype, record.shape)
                    data = ckpt.read(record.name).numpy().tobytes()
                    assert data == blob[record.offset : record.offset + record.nbytes]
                    result[record.name] = data
                return result
    finally:
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        if len(blob) <= 64 * 1024:
            assert peak < MAX_TRACED_BYTES, f"{peak} bytes traced for a {len(blob)}-byte file"


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    return tmp_path_factory.mktemp("fuzz")


def _valid_safetensors() -> bytes:
    gen = torch.Generator().manual_seed(1)
    tensors = {
        "a.weight": torch.randn(3, 4, generator=gen).to(torch.bfloat16),
        "a.bias": torch.randn(4, generator=gen),
        "mask": torch.tensor([True, False]),
        "ids": torch.arange(3, dtype=torch.int64),
        "fp8": torch.randn(2, 2, generator=gen).to(torch.float8_e4m3fn),
        "empty": torch.empty(0, 2),
        "scalar": torch.tensor(1.5, dtype=torch.float16),
    }
    return save(tensors, metadata={"format": "pt"})


def _valid_gguf(workdir) -> bytes:
    path = os.path.join(workdir, "base.gguf")
    rng = np.random.default_rng(1)
    weight = rng.standard_normal((2, 32)).astype(np.float32)
    writer = gguf.GGUFWriter(path, "wan")
    writer.add_string("general.name", "fuzz")
    writer.add_array("test.values", [1, 2, 3])
    writer.add_tensor("norm", weight[0])
    writer.add_tensor("q8", quantize(weight, T.Q8_0), raw_dtype=T.Q8_0)
    writer.add_tensor("q4", quantize(weight, T.Q4_0), raw_dtype=T.Q4_0)
    writer.add_tensor("half", weight.astype(np.float16))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with open(path, "rb") as f:
        return f.read()


@pytest.fixture(scope="module")
def st_blob() -> bytes:
    return _valid_safetensors()


@pytest.fixture(scope="module")
def gguf_blob(workdir) -> bytes:
    return _valid_gguf(workdir)


def test_valid_files_pass_the_property(workdir, st_blob, gguf_blob):
    assert len(_open_and_read_all(os.path.join(workdir, "ok.safetensors"), st_blob)) == 7
    assert len(_open_and_read_all(os.path.join(workdir, "ok.gguf"), gguf_blob)) == 4


# ---------------------------------------------------------------------------------------------
# Mutations of valid files
# ---------------------------------------------------------------------------------------------


@FUZZ
@given(data=st.data())
def test_truncated_safetensors(workdir, st_blob, data):
    cut = data.draw(st.integers(0, len(st_blob) - 1))
    # save() packs tensors back to back up to the end, so any cut loses tensor bytes.
    assert _open_and_read_all(os.path.join(workdir, "cut.safetensors"), st_blob[:cut]) is None


@FUZZ
@given(data=st.data())
def test_truncated_gguf(workdir, gguf_blob, data):
    cut = data.draw(st.integers(0, len(gguf_blob) - 1))
    reader = gguf.GGUFReader(os.path.join(workdir, "base.gguf"))
    data_end = max(t.data_offset + t.n_bytes for t in reader.tensors)
    result = _open_and_read_all(os.path.join(workdir, "cut.gguf"), gguf_blob[:cut])
    assert (result is not None) == (cut >= data_end)  # only trailing padding may go


_flips = st.lists(st.tuples(st.integers(0, 10**6), st.integers(0, 255)), min_size=1, max_size=8)


def _flip(blob: bytes, flips) -> bytes:
    mutable = bytearray(blob)
    for position, value in flips:
        mutable[position % len(blob)] = value
    return bytes(mutable)


@FUZZ
@given(flips=_flips)
def test_byte_flips_safetensors(workdir, st_blob, flips):
    _open_and_read_all(os.path.join(workdir, "flip.safetensors"), _flip(st_blob, flips))


@FUZZ
@given(flips=_flips)
def test_byte_flips_gguf(workdir, gguf_blob, flips):
    _open_and_read_all(os.path.join(workdir, "flip.gguf"), _flip(gguf_blob, flips))


@FUZZ
@given(flips=_flips)
def test_byte_flips_in_gguf_header(workdir, gguf_blob, flips):
    """Flips concentrated on the header, where they change structure rather than data."""
    header_end = gguf.GGUFReader(os.path.join(workdir, "base.gguf")).data_offset
    flips = [(position % header_end, value) for position, value in flips]
    _open_and_read_all(os.path.join(workdir, "hflip.gguf"), _flip(gguf_blob, flips))


# ---------------------------------------------------------------------------------------------
# Random safetensors headers
# ---------------------------------------------------------------------------------------------

_small = st.integers(0, 64)
_any_int = st.one_of(_small, st.integers(-(2**70), 2**70), st.sampled_from([2**63, 2**64 - 1]))
_json_scalar = st.one_of(
    st.none(), st.booleans(), st.floats(allow_nan=True), st.text(max_size=8), _any_int
)
_json = st.recursive(
    _json_scalar,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner),
    max_leaves=12,
)
_dtype = st.one_of(
    st.sampled_from(sorted(SAFETENSORS_DTYPES)), st.sampled_from(["F4", "Q4", "f32", ""]), _json
)
_shape = st.one_of(st.lists(st.one_of(_small, _small, _any_int), max_size=4), _json)
_offsets = st.one_of(st.lists(st.one_of(_small, _small, _any_int), max_size=3), _json)
_entry = st.one_of(
    st.fixed_dictionaries({"dtype": _dtype, "shape": _shape, "data_offsets": _offsets}),
    st.fixed_dictionaries(
        {"dtype": st.sampled_from(["F32", "U8", "BF16"]), "shape": st.lists(_small, max_size=2)}
    ),
    _json,
)
_metadata = st.one_of(st.dictionaries(st.text(), st.text(), max_size=3), _json)
_header = st.tuples(
    st.dictionaries(st.text(max_size=10), _entry, max_size=5),
    st.one_of(st.none(), st.none(), _metadata),
).map(lambda pair: pair[0] if pair[1] is None else {"__metadata__": pair[1], **pair[0]})


def _st_file(header: bytes, data: bytes, length: int | None = None) -> bytes:
    return struct.pack("<Q", len(header) if length is None else length) + header + data


def _reference_accepts(blob: bytes) -> dict[str, torch.Tensor] | None:
    """What the ``safetensors`` package itself makes of ``blob`` (None: it refuses it)."""
    try:
        return load(blob)
    except Exception:
        return None
    except BaseException as exc:  # a Rust panic surfaces as pyo3's PanicException
        if type(exc).__name__ == "PanicException":
            return None
        raise


@FUZZ
@given(header=_header, data=st.binary(max_size=96))
def test_random_safetensors_headers(workdir, header, data):
    blob = _st_file(json.dumps(header).encode(), data)
    ours = _open_and_read_all(os.path.join(workdir, "hdr.safetensors"), blob)
    reference = _reference_accepts(blob)
    supported = set(SAFETENSORS_DTYPES.values())
    if reference is not None and all(t.dtype in supported for t in reference.values()):
        assert ours is not None, "the safetensors package accepts this file"
        assert set(ours) == set(reference)


def _plausible_header(draw) -> tuple[bytes, bytes]:
    """A header that is mostly right: valid entries laid out back to back, then one tweak."""
    names = draw(st.lists(st.text(min_size=1, max_size=6), min_size=1, max_size=4, unique=True))
    header, offset = {}, 0
    for name in names:
        dtype = draw(st.sampled_from(sorted(SAFETENSORS_DTYPES)))
        shape = draw(st.lists(st.integers(0, 4), max_size=3))
        size = int(np.prod(shape, dtype=np.int64)) * SAFETENSORS_DTYPES[dtype].itemsize
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + size]}
        offset += size
    victim = header[draw(st.sampled_from(names))]
    field = draw(st.sampled_from(["dtype", "shape", "data_offsets", None]))
    if field is not None:
        victim[field] = draw({"dtype": _dtype, "shape": _shape, "data_offsets": _offsets}[field])
    if draw(st.booleans()):
        header["__metadata__"] = draw(_metadata)
    data = draw(st.binary(min_size=offset, max_size=offset + 8))
    return json.dumps(header).encode(), data


@FUZZ
@given(data=st.data())
def test_plausible_safetensors_headers(workdir, data):
    header, payload = _plausible_header(data.draw)
    blob = _st_file(header, payload)
    ours = _open_and_read_all(os.path.join(workdir, "plausible.safetensors"), blob)
    reference = _reference_accepts(blob)
    if reference is not None:
        assert ours is not None, "the safetensors package accepts this file"
        for name, tensor in reference.items():
            assert ours[name] == (tensor.reshape(-1).view(torch.uint8).numpy().tobytes())


@FUZZ
@given(value=_json, data=st.binary(max_size=32))
def test_arbitrary_json_as_header(workdir, value, data):
    _open_and_read_all(
        os.path.join(workdir, "json.safetensors"), _st_file(json.dumps(value).encode(), data)
    )


@FUZZ
@given(
    raw=st.binary(min_size=1, max_size=256),
    length=st.one_of(st.none(), st.integers(0, 2**64 - 1), st.integers(0, 300)),
)
def test_random_header_bytes_and_lengths(workdir, raw, length):
    """Invalid UTF-8, garbage JSON and absurd header lengths."""
    blob = _st_file(raw, b"", length)
    assert (
        _open_and_read_all(os.path.join(workdir, "raw.safetensors"), blob) is None
        or raw.strip()[:1] == b"{"
    )


# ---------------------------------------------------------------------------------------------
# Random GGUF headers
# ---------------------------------------------------------------------------------------------

_VALUE_TYPES = [int(t) for t in gguf.GGUFValueType]
_SCALAR_FMT = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q"}
_SCALAR_FMT.update({11: "<q", 12: "<d"})


def _mostly(common: st.SearchStrategy, rare: st.SearchStrategy) -> st.SearchStrategy:
    """``common`` four times out of five: keeps most examples past the first check."""
    return st.integers(0, 4).flatmap(lambda pick: rare if pick == 0 else common)


_huge = st.sampled_from([2**31, 2**32 - 1, 2**40, 2**63, 2**64 - 1])
_count = st.one_of(st.integers(0, 4), st.integers(0, 4), _huge)


@st.composite
def _gguf_value(draw, vtype: int, depth: int = 0) -> bytes:
    if vtype in _SCALAR_FMT:
        size = struct.calcsize(_SCALAR_FMT[vtype])
        return draw(st.binary(min_size=size, max_size=size))
    if vtype == corpus.STRING:
        text = draw(st.binary(max_size=8))
        return corpus.u64(draw(st.one_of(st.just(len(text)), _huge))) + text
    if vtype == corpus.ARRAY and depth < 3:
        itype = draw(st.one_of(st.sampled_from(_VALUE_TYPES), st.integers(0, 2**32 - 1)))
        count = draw(_count)
        items = [draw(_gguf_value(itype, depth + 1)) for _ in range(min(count, 4))]
        return corpus.u32(itype) + corpus.u64(count) + b"".join(items)
    return draw(st.binary(max_size=8))


@st.composite
def _gguf_kv(draw) -> bytes:
    key = draw(_mostly(st.text(max_size=12), st.just("general.alignment") | st.binary(max_size=6)))
    vtype = draw(st.one_of(st.sampled_from(_VALUE_TYPES), st.integers(0, 2**32 - 1)))
    return corpus.kv(key, vtype, draw(_gguf_value(vtype)))


_TENSOR_TYPES = [int(t) for t in T]


@st.composite
def _gguf_tensor(draw) -> bytes:
    name = draw(st.one_of(st.sampled_from(["w", "b", "blk.0.attn_q.weight"]), st.text(max_size=6)))
    dims = draw(st.lists(st.one_of(st.integers(0, 64), st.just(32), _huge), max_size=5))
    ttype = draw(
        st.one_of(
            st.sampled_from([0, 1, 2, 8, 30, 24]),
            st.sampled_from(_TENSOR_TYPES),
            st.integers(0, 2**32 - 1),
        )
    )
    offset = draw(st.one_of(st.integers(0, 8).map(lambda k: 32 * k), st.integers(0, 512), _huge))
    return corpus.tensor_info(name, dims, ttype, offset)


@FUZZ
@given(
    version=_mostly(st.just(3), st.sampled_from([2, 1, 0x03000000]) | st.integers(0, 2**32 - 1)),
    kvs=st.lists(_gguf_kv(), max_size=4),
    tensors=st.lists(_gguf_tensor(), max_size=4),
    n_tensors=_mostly(st.none(), _count),
    n_kv=_mostly(st.none(), _count),
    data=st.binary(max_size=512),
)
def test_random_gguf_headers(workdir, version, kvs, tensors, n_tensors, n_kv, data):
    blob = corpus.gguf_bytes(kvs, tensors, data, version=version, n_tensors=n_tensors, n_kv=n_kv)
    _open_and_read_all(os.path.join(workdir, "random.gguf"), blob)


@FUZZ
@given(
    dims=st.lists(
        st.one_of(st.sampled_from([1, 2, 32, 64, 256]), st.integers(0, 96), _huge),
        min_size=1,
        max_size=3,
    ),
    ttype=_mostly(st.sampled_from(_TENSOR_TYPES), st.integers(0, 2**32 - 1)),
    offset=st.one_of(st.just(0), st.integers(0, 4).map(lambda k: 32 * k), _huge),
    size=st.one_of(st.integers(0, 600), st.just(4096)),
)
def test_gguf_tensor_types_and_sizes(workdir, dims, ttype, offset, size):
    """Unknown types are refused, known ones (even without a dequantizer) sized exactly."""
    arch = corpus.kv("general.architecture", corpus.STRING, corpus.gstr("wan"))
    blob = corpus.gguf_bytes([arch], [corpus.tensor_info("w", dims, ttype, offset)], bytes(size))
    result = _open_and_read_all(os.path.join(workdir, "types.gguf"), blob)
    if ttype not in _TENSOR_TYPES:
        assert result is None


@FUZZ
@given(magic=st.binary(min_size=4, max_size=4))
def test_gguf_bad_magic(workdir, gguf_blob, magic):
    assume(magic != b"GGUF")
    with pytest.raises(CheckpointError, match="GGUF magic"):
        path = os.path.join(workdir, "magic.gguf")
        with open(path, "wb") as f:
            f.write(magic + gguf_blob[4:])
        open_checkpoint(path)


@FUZZ
@given(n_tensors=st.integers(0, 2**64 - 1), n_kv=st.integers(0, 2**64 - 1))
def test_gguf_absurd_counts(workdir, gguf_blob, n_tensors, n_kv):
    blob = gguf_blob[:8] + struct.pack("<QQ", n_tensors, n_kv) + gguf_blob[24:]
    result = _open_and_read_all(os.path.join(workdir, "counts.gguf"), blob)
    if (n_tensors, n_kv) != struct.unpack("<QQ", gguf_blob[8:24]):
        assert result is None or len(result) < 4


# ---------------------------------------------------------------------------------------------
# Hand-made corpus
# ---------------------------------------------------------------------------------------------


def _corpus_files() -> list[str]:
    if not os.path.isdir(corpus.CORPUS_DIR):
        return []
    return sorted(n for n in os.listdir(corpus.CORPUS_DIR) if n != corpus.EXPECTED_FILE)


def test_corpus_is_not_empty():
    assert len(_corpus_files()) >= 40
    assert all(os.path.getsize(os.path.join(corpus.CORPUS_DIR, n)) <= 1024 for n in _corpus_files())


def test_corpus_matches_its_generator():
    """The committed files are exactly what make_bad_checkpoints.py writes."""
    assert _corpus_files() == sorted(corpus.CORPUS)
    for name, (blob, _) in corpus.CORPUS.items():
        with open(os.path.join(corpus.CORPUS_DIR, name), "rb") as f:
            assert f.read() == blob, name


@pytest.mark.parametrize("name", _corpus_files())
def test_corpus_file_is_refused(name):
    with open(os.path.join(corpus.CORPUS_DIR, corpus.EXPECTED_FILE), encoding="utf-8") as f:
        fragment = json.load(f)[name]
    with _watchdog(WATCHDOG_S), pytest.raises(CheckpointError) as info:
        open_checkpoint(os.path.join(corpus.CORPUS_DIR, name))
    assert name in str(info.value) and fragment in str(info.value), str(info.value)
