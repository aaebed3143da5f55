"""Recreate the corpus of small malformed checkpoints in ``tests/data/bad_checkpoints``.

Every file is built byte by byte (no torch, no gguf package), so the corpus is deterministic
and each file shows exactly one problem.  ``CORPUS`` maps a file name to its bytes and to a
fragment the :class:`callbacks.checkpoint.CheckpointError` message must contain; the same
builders (:func:`safetensors_bytes`, :func:`gguf_bytes`) are reused by the fuzz tests.

Run ``python tests/data/make_bad_checkpoints.py`` to rewrite the folder (and
``expected.json``, the name -> fragment table the corpus test reads).
"""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Iterable, Sequence

HERE = os.path.dirname(os.path.abspath(__file__))
CORPUS_DIR = os.path.join(HERE, "bad_checkpoints")
EXPECTED_FILE = "expected.json"

# GGUF value type ids (gguf.GGUFValueType) and GGML tensor type ids used below.
UINT8, UINT32, INT32, FLOAT32, BOOL, STRING, ARRAY, UINT64 = 0, 4, 5, 6, 7, 8, 9, 10
F32, F16, Q8_0 = 0, 1, 8


def u32(value: int) -> bytes:
    return struct.pack("<I", value)


def u64(value: int) -> bytes:
    return struct.pack("<Q", value)


def gstr(text: str | bytes) -> bytes:
    """A GGUF string: u64 length then the bytes."""
    raw = text.encode("utf-8") if isinstance(text, str) else text
    return u64(len(raw)) + raw


def kv(key: str | bytes, vtype: int, payload: bytes) -> bytes:
    """One GGUF metadata entry: key, value type, already-encoded value."""
    return gstr(key) + u32(vtype) + payload


def tensor_info(name: str | bytes, dims: Sequence[int], ttype: int, offset: int) -> bytes:
    """One GGUF tensor info; ``dims`` in GGUF order (innermost first)."""
    return gstr(name) + u32(len(dims)) + b"".join(u64(d) for d in dims) + u32(ttype) + u64(offset)


def gguf_bytes(
    kvs: Iterable[bytes] = (),
    tensors: Iterable[bytes] = (),
    data: bytes = b"",
    *,
    version: int = 3,
    n_tensors: int | None = None,
    n_kv: int | None = None,
    magic: bytes = b"GGUF",
    alignment: int = 32,
) -> bytes:
    """A GGUF file from parts; counts default to the number of parts given."""
    kvs, tensors = list(kvs), list(tensors)
    head = magic + u32(version)
    head += u64(len(tensors) if n_tensors is None else n_tensors)
    head += u64(len(kvs) if n_kv is None else n_kv)
    head += b"".join(kvs) + b"".join(tensors)
    if data:
        head += b"\0" * (-len(head) % alignment)
    return head + data


def safetensors_bytes(header: object, data: bytes = b"", *, length: int | None = None) -> bytes:
    """A safetensors file: u64 header length, header (JSON-encoded unless bytes), data."""
    raw = header if isinstance(header, bytes) else json.dumps(header).encode("utf-8")
    return u64(len(raw) if length is None else length) + raw + data


def _st(dtype: str = "F32", shape: list = [2], offsets: list = [0, 8]) -> dict:  # noqa: B006
    return {"dtype": dtype, "shape": shape, "data_offsets": offsets}


def _one_f32_tensor(**kwargs: object) -> bytes:
    return gguf_bytes(
        [kv("general.architecture", STRING, gstr("wan"))],
        [tensor_info("w", [4], F32, 0)],
        bytes(16),
        **kwargs,
    )


_ARCH = kv("general.architecture", STRING, gstr("wan"))
_NESTED = u32(ARRAY) + u64(1)  # an array whose single element is another array

CORPUS: dict[str, tuple[bytes, str]] = {
    # --- safetensors ----------------------------------------------------------------------
    "st_empty.safetensors": (b"", "too short"),
    "st_five_bytes.safetensors": (b"\x01\x02\x03\x04\x05", "too short"),
    "st_zero_header_length.safetensors": (u64(0) + b"{}", "length field is 0"),
    "st_absurd_header_length.safetensors": (u64(2**63) + b"{}", "100 MiB limit"),
    "st_header_past_eof.safetensors": (safetensors_bytes({}, length=4096), "bytes after it"),
    "st_not_utf8.safetensors": (safetensors_bytes(b'{"a\xff\xfe": 1}'), "not valid UTF-8"),
    "st_not_json.safetensors": (safetensors_bytes(b"{not json"), "not valid JSON"),
    "st_json_list.safetensors": (safetensors_bytes([1, 2]), "not object"),
    "st_json_string.safetensors": (safetensors_bytes("tensor"), "not object"),
    "st_entry_not_object.safetensors": (safetensors_bytes({"w": [1]}), "not an object"),
    "st_entry_missing_fields.safetensors": (
        safetensors_bytes({"w": {"dtype": "F32"}}),
        "lacks shape, data_offsets",
    ),
    "st_unknown_dtype.safetensors": (
        safetensors_bytes({"w": _st(dtype="Q4")}, bytes(8)),
        "unknown dtype 'Q4'",
    ),
    "st_negative_shape.safetensors": (
        safetensors_bytes({"w": _st(shape=[-2])}, bytes(8)),
        "non-negative ints",
    ),
    "st_bool_shape.safetensors": (
        safetensors_bytes({"w": _st(shape=[True, 2])}, bytes(8)),
        "non-negative ints",
    ),
    "st_float_shape.safetensors": (
        safetensors_bytes({"w": _st(shape=[2.0])}, bytes(8)),
        "non-negative ints",
    ),
    "st_shape_not_list.safetensors": (
        safetensors_bytes({"w": _st(shape=2)}, bytes(8)),
        "shape must be a list",
    ),
    "st_too_many_dims.safetensors": (
        safetensors_bytes({"w": _st(shape=[1] * 65, offsets=[0, 4])}, bytes(4)),
        "at most 64",
    ),
    "st_huge_shape.safetensors": (
        safetensors_bytes({"w": _st(shape=[2**62, 2**62])}, bytes(8)),
        "needs over 8 bytes",
    ),
    "st_offsets_three_values.safetensors": (
        safetensors_bytes({"w": _st(offsets=[0, 4, 8])}, bytes(8)),
        "must be [begin, end]",
    ),
    "st_offsets_reversed.safetensors": (
        safetensors_bytes({"w": _st(offsets=[8, 0])}, bytes(8)),
        "fall outside",
    ),
    "st_offsets_negative.safetensors": (
        safetensors_bytes({"w": _st(offsets=[-8, 0])}, bytes(8)),
        "fall outside",
    ),
    "st_offsets_past_data.safetensors": (
        safetensors_bytes({"w": _st(offsets=[0, 8])}, bytes(4)),
        "fall outside",
    ),
    "st_size_mismatch.safetensors": (
        safetensors_bytes({"w": _st(shape=[3])}, bytes(8)),
        "shape [3] needs 12 bytes, data_offsets span 8",
    ),
    "st_overlap.safetensors": (
        safetensors_bytes({"a": _st(offsets=[0, 8]), "b": _st(offsets=[4, 12])}, bytes(12)),
        "overlap",
    ),
    "st_duplicate_key.safetensors": (
        safetensors_bytes(
            b'{"w": {"dtype": "F32", "shape": [0], "data_offsets": [0, 0]}, '
            b'"w": {"dtype": "F32", "shape": [0], "data_offsets": [0, 0]}}'
        ),
        "lists key 'w' twice",
    ),
    "st_metadata_not_strings.safetensors": (
        safetensors_bytes({"__metadata__": {"epochs": 3}}),
        "__metadata__ must map strings",
    ),
    "st_huge_int.safetensors": (
        safetensors_bytes(
            b'{"w": {"dtype": "F32", "shape": [' + b"9" * 300 + b'], "data_offsets": [0, 8]}}',
            bytes(8),
        ),
        "needs over 8 bytes",
    ),
    "st_lfs_pointer.safetensors": (
        b"version https://git-lfs.github.com/spec/v1\n"
        b"oid sha256:4d7a214614ab2935c943f9e0ff69d22eadbb8f32b1258daaa5e2ca24d17e2393\n"
        b"size 12345\n",
        "Git LFS pointer",
    ),
    "st_html_page.safetensors": (
        b"<!DOCTYPE html><html><head><title>Sign in</title></head><body>401</body></html>\n",
        "HTML page",
    ),
    "st_is_gguf.safetensors": (_one_f32_tensor(), "GGUF file"),
    "st_is_torch_zip.safetensors": (b"PK\x03\x04" + bytes(60), "zip archive"),
    # --- GGUF -----------------------------------------------------------------------------
    "gguf_empty.gguf": (b"", "GGUF magic"),
    "gguf_bad_magic.gguf": (_one_f32_tensor(magic=b"GGML"), "GGUF magic"),
    "gguf_is_safetensors.gguf": (safetensors_bytes({"w": _st()}, bytes(8)), "GGUF magic"),
    "gguf_lfs_pointer.gguf": (b"version https://git-lfs.github.com/spec/v1\n", "Git LFS"),
    "gguf_version_1.gguf": (_one_f32_tensor(version=1), "version 1 is not supported"),
    "gguf_version_99.gguf": (_one_f32_tensor(version=99), "version 99 is not supported"),
    "gguf_big_endian.gguf": (b"GGUF" + struct.pack(">IQQ", 3, 0, 0), "big-endian"),
    "gguf_absurd_tensor_count.gguf": (
        _one_f32_tensor(n_tensors=2**63),
        "claims 9223372036854775808 tensors",
    ),
    "gguf_absurd_kv_count.gguf": (_one_f32_tensor(n_kv=2**64 - 1), "metadata entries"),
    "gguf_kv_count_too_high.gguf": (
        gguf_bytes([_ARCH, kv("x", UINT32, u32(1))], n_kv=3),
        "remain in the file",
    ),
    "gguf_huge_string.gguf": (gguf_bytes([kv("s", STRING, u64(2**40) + b"abc")]), "remain"),
    "gguf_huge_key.gguf": (gguf_bytes([u64(2**20) + b"key" + bytes(16)]), "bytes long"),
    "gguf_key_not_utf8.gguf": (gguf_bytes([kv(b"bad\xff", UINT8, b"\1")]), "not UTF-8"),
    "gguf_duplicate_key.gguf": (gguf_bytes([_ARCH, _ARCH]), "appears twice"),
    "gguf_unknown_value_type.gguf": (gguf_bytes([kv("x", 13, u32(0))]), "unknown value type 13"),
    "gguf_array_absurd_length.gguf": (
        gguf_bytes([kv("a", ARRAY, u32(UINT8) + u64(2**40) + bytes(8))]),
        "more than 2000000 elements",
    ),
    "gguf_array_past_eof.gguf": (
        gguf_bytes([kv("a", ARRAY, u32(UINT32) + u64(1000) + bytes(8))]),
        "remain in the file",
    ),
    "gguf_string_array_past_eof.gguf": (
        gguf_bytes([kv("a", ARRAY, u32(STRING) + u64(100_000) + gstr("x"))]),
        "remain in the file",
    ),
    "gguf_arrays_too_deep.gguf": (
        gguf_bytes([kv("deep", ARRAY, _NESTED * 9 + u32(UINT8) + u64(0))]),
        "nests arrays too deeply",
    ),
    "gguf_array_unknown_type.gguf": (
        gguf_bytes([kv("a", ARRAY, u32(42) + u64(0))]),
        "unknown value type 42",
    ),
    "gguf_alignment_not_power_of_two.gguf": (
        gguf_bytes([kv("general.alignment", UINT32, u32(24))]),
        "power-of-two",
    ),
    "gguf_alignment_wrong_type.gguf": (
        gguf_bytes([kv("general.alignment", STRING, gstr("32"))]),
        "power-of-two",
    ),
    "gguf_unknown_tensor_type.gguf": (
        gguf_bytes([_ARCH], [tensor_info("w", [4], 4, 0)], bytes(16)),
        "GGML type id 4 is unknown",
    ),
    "gguf_too_many_dims.gguf": (
        gguf_bytes([_ARCH], [tensor_info("w", [1] * 9, F32, 0)], bytes(16)),
        "9 dimensions",
    ),
    "gguf_tensor_past_eof.gguf": (
        gguf_bytes([_ARCH], [tensor_info("w", [64], F32, 0)], bytes(16)),
        "runs past the end",
    ),
    "gguf_tensor_offset_absurd.gguf": (
        gguf_bytes([_ARCH], [tensor_info("w", [4], F32, 2**63)], bytes(16)),
        "runs past the end",
    ),
    "gguf_huge_dims.gguf": (
        gguf_bytes([_ARCH], [tensor_info("w", [2**40, 2**40], F32, 0)], bytes(16)),
        "runs past the end",
    ),
    "gguf_dims_wrap_uint64.gguf": (  # numpy's uint64 product wraps to 0 here
        gguf_bytes([_ARCH], [tensor_info("w", [2**32, 2**32], F16, 0)], bytes(16)),
        "runs past the end",
    ),
    "gguf_q8_row_not_block_multiple.gguf": (
        gguf_bytes([_ARCH], [tensor_info("w", [33, 1], Q8_0, 0)], bytes(64)),
        "multiple of the Q8_0 block size",
    ),
    "gguf_duplicate_tensor.gguf": (
        gguf_bytes([_ARCH], [tensor_info("w", [4], F32, 0)] * 2, bytes(16)),
        "appears twice",
    ),
    "gguf_overlapping_tensors.gguf": (
        gguf_bytes(
            [_ARCH], [tensor_info("a", [4], F32, 0), tensor_info("b", [4], F32, 8)], bytes(32)
        ),
        "overlap",
    ),
    "gguf_tensor_name_not_utf8.gguf": (
        gguf_bytes([_ARCH], [tensor_info(b"w\xc3", [4], F32, 0)], bytes(16)),
        "not UTF-8",
    ),
    "gguf_truncated_tensor_info.gguf": (
        gguf_bytes([_ARCH], [tensor_info("w", [4], F32, 0)])[:-10],
        "tensor type at byte",
    ),
    # --- sharded index, folders and other file types ----------------------------------------
    "index_missing_shard.safetensors.index.json": (
        json.dumps({"weight_map": {"w": "model-00001-of-00002.safetensors"}}).encode(),
        "missing: model-00001-of-00002.safetensors",
    ),
    "index_escapes_folder.safetensors.index.json": (
        json.dumps({"weight_map": {"w": "../model.safetensors"}}).encode(),
        "not in the index's folder",
    ),
    "index_no_weight_map.safetensors.index.json": (
        json.dumps({"metadata": {"total_size": 8}}).encode(),
        '"weight_map"',
    ),
    "index_pickle_shard.safetensors.index.json": (
        json.dumps({"weight_map": {"w": "pytorch_model.bin"}}).encode(),
        "is no .safetensors",
    ),
    "index_not_json.safetensors.index.json": (b"weight_map: w", "not valid JSON"),
    "pickle_checkpoint.ckpt": (b"\x80\x02}q\x00.", "can run arbitrary code"),
    "pickle_checkpoint.pt": (b"PK\x03\x04" + bytes(26), "can run arbitrary code"),
    "pytorch_model.bin": (b"\x80\x04\x95\x00.", "can run arbitrary code"),
    "model.onnx": (b"\x08\x07\x12\x04onnx", "unrecognised checkpoint type"),
}


def write_corpus(folder: str = CORPUS_DIR) -> None:
    """Write every corpus file and the name -> expected-fragment table into ``folder``."""
    os.makedirs(folder, exist_ok=True)
    for name, (data, _) in CORPUS.items():
        with open(os.path.join(folder, name), "wb") as f:
            f.write(data)
    expected = {name: fragment for name, (_, fragment) in CORPUS.items()}
    with open(os.path.join(folder, EXPECTED_FILE), "w", encoding="utf-8") as f:
        json.dump(expected, f, indent=1, sort_keys=True)
        f.write("\n")


if __name__ == "__main__":
    write_corpus()
    print(f"wrote {len(CORPUS)} files to {CORPUS_DIR}")
