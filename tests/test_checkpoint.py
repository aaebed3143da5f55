"""Tests for callbacks.checkpoint: real files written by the reference writers read back
byte-exactly, and every refusal names the file and the problem.

safetensors files come from ``safetensors.torch.save_file`` and are compared with its own
``load_file``; GGUF files come from ``gguf.GGUFWriter`` and are compared with
``gguf.GGUFReader``'s numpy views.  Hand-built malformed headers live in the corpus
(``tests/data/bad_checkpoints``, checked by test_checkpoint_fuzz.py); here the API-level
refusals (pickle, missing paths, folders, sharded indexes, changed files) are covered.
"""

from __future__ import annotations

import json
import logging
import os
import struct
import sys
import threading
import time

import gguf
import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as T
from gguf.quants import quantize
from safetensors.torch import load_file, save_file

from comfyui_wan_blockswap.callbacks.checkpoint import (
    Checkpoint,
    CheckpointError,
    CheckpointNotFoundError,
    TensorRecord,
    open_checkpoint,
)
from comfyui_wan_blockswap.callbacks.gguf_dequant import (
    SUPPORTED_TYPES,
    dequantize,
    quantized_nbytes,
)

try:
    import resource
except ImportError:  # Windows
    resource = None

sparse_files = pytest.mark.skipif(
    resource is None or sys.platform == "win32", reason="needs sparse files and getrusage"
)


def _raw(tensor: torch.Tensor) -> bytes:
    """The bytes a tensor occupies in a safetensors file (C order, little endian)."""
    flat = tensor.contiguous().reshape(-1)
    return flat.view(torch.uint8).numpy().tobytes() if flat.numel() else b""


def _sample_tensors() -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    base = torch.randn(3, 5, generator=gen)
    return {
        "blocks.0.weight": base.to(torch.bfloat16),
        "blocks.0.bias": torch.randn(7, generator=gen),
        "half": base.to(torch.float16),
        "double": base.to(torch.float64),
        "fp8_e4m3": base.to(torch.float8_e4m3fn),
        "fp8_e5m2": base.to(torch.float8_e5m2),
        "ids": torch.arange(-4, 8, dtype=torch.int64).reshape(3, 4),
        "i32": torch.arange(5, dtype=torch.int32),
        "i16": torch.arange(5, dtype=torch.int16),
        "i8": torch.arange(-3, 3, dtype=torch.int8),
        "u8": torch.arange(9, dtype=torch.uint8).reshape(3, 3),
        "mask": torch.tensor([True, False, True]),
        "empty": torch.empty(0, 4),
        "empty_bf16": torch.empty(2, 0, 3, dtype=torch.bfloat16),
        "scalar": torch.tensor(3.5),
        "scalar_i64": torch.tensor(-7, dtype=torch.int64),
    }


@pytest.fixture()
def st_file(tmp_path):
    tensors = _sample_tensors()
    path = tmp_path / "model.safetensors"
    save_file(tensors, str(path), metadata={"format": "pt", "note": "héllo"})
    return path, tensors


def test_safetensors_records_and_bytes(st_file):
    path, tensors = st_file
    reference = load_file(str(path))
    with open_checkpoint(path) as ckpt:
        assert isinstance(ckpt, Checkpoint)
        assert ckpt.format == "safetensors"
        assert ckpt.paths == (str(path),)
        assert ckpt.metadata == {"format": "pt", "note": "héllo"}
        assert set(ckpt.records) == set(tensors)
        offsets = [r.offset for r in ckpt.records.values()]
        assert offsets == sorted(offsets), "records must follow the file's data order"
        for name, tensor in tensors.items():
            record = ckpt.records[name]
            assert isinstance(record, TensorRecord)
            assert record.name == name
            assert record.shape == tuple(tensor.shape)
            assert record.dtype == tensor.dtype
            assert record.qtype is None
            assert record.nbytes == tensor.numel() * tensor.element_size()
            assert record.path == str(path)
            out = torch.full((record.nbytes,), 0xAB, dtype=torch.uint8)
            ckpt.read_into(name, out)
            assert out.numpy().tobytes() == _raw(reference[name])
            assert ckpt.read(name).numpy().tobytes() == _raw(reference[name])
            # The bytes reinterpret to the very tensor safetensors loads.
            if record.nbytes:
                decoded = out.view(record.dtype).reshape(record.shape)
                assert decoded.shape == reference[name].shape
                assert decoded.dtype == reference[name].dtype
                assert _raw(decoded) == _raw(reference[name])


def test_offsets_are_absolute(st_file):
    path, tensors = st_file
    blob = path.read_bytes()
    with open_checkpoint(path) as ckpt:
        for name, record in ckpt.records.items():
            assert blob[record.offset : record.offset + record.nbytes] == _raw(tensors[name])


def test_read_into_slice_of_larger_buffer(st_file):
    """Destinations are often slices of one staging buffer: honour their storage offset."""
    path, tensors = st_file
    with open_checkpoint(path) as ckpt:
        nbytes = ckpt.records["blocks.0.bias"].nbytes
        buffer = torch.zeros(nbytes + 13, dtype=torch.uint8)
        ckpt.read_into("blocks.0.bias", buffer[5 : 5 + nbytes])
        assert buffer[:5].eq(0).all() and buffer[5 + nbytes :].eq(0).all()
        assert buffer[5 : 5 + nbytes].numpy().tobytes() == _raw(tensors["blocks.0.bias"])


def test_read_into_typed_destination_view(st_file):
    """The loader reads straight into a parameter through a uint8 view of it."""
    path, tensors = st_file
    with open_checkpoint(path) as ckpt:
        dest = torch.empty(3, 5, dtype=torch.bfloat16)
        ckpt.read_into("blocks.0.weight", dest.reshape(-1).view(torch.uint8))
        assert torch.equal(dest, tensors["blocks.0.weight"])


def test_read_into_rejects_bad_destinations(st_file):
    path, _ = st_file
    with open_checkpoint(path) as ckpt:
        nbytes = ckpt.records["blocks.0.bias"].nbytes
        with pytest.raises(TypeError, match="uint8"):
            ckpt.read_into("blocks.0.bias", torch.empty(nbytes // 4, dtype=torch.float32))
        with pytest.raises(ValueError, match=f"exactly {nbytes}"):
            ckpt.read_into("blocks.0.bias", torch.empty(nbytes + 1, dtype=torch.uint8))
        with pytest.raises(ValueError, match="contiguous"):
            ckpt.read_into("blocks.0.bias", torch.empty(nbytes * 2, dtype=torch.uint8)[::2])
        with pytest.raises(KeyError, match="nope"):
            ckpt.read_into("nope", torch.empty(0, dtype=torch.uint8))
        with pytest.raises(KeyError, match="nope"):
            ckpt.read("nope")


def test_close_is_idempotent_and_final(st_file):
    path, _ = st_file
    ckpt = open_checkpoint(path)
    ckpt.read("half")
    ckpt.close()
    ckpt.close()
    with pytest.raises(ValueError, match="closed"):
        ckpt.read("half")
    with open_checkpoint(path) as again:
        pass
    again.close()


def test_opening_reads_no_data_and_holds_no_file(st_file):
    """Metadata only: the file is not kept open until a tensor is read."""
    path, _ = st_file
    before = len(os.listdir("/proc/self/fd")) if os.path.isdir("/proc/self/fd") else None
    ckpt = open_checkpoint(path)
    if before is not None:
        assert len(os.listdir("/proc/self/fd")) == before
    ckpt.read("half")
    ckpt.close()
    if before is not None:
        assert len(os.listdir("/proc/self/fd")) == before


def test_file_truncated_after_open(st_file):
    path, _ = st_file
    with open_checkpoint(path) as ckpt:
        ckpt.read("blocks.0.bias")  # the handle is open now
        last = max(ckpt.records.values(), key=lambda r: r.offset + r.nbytes)
        os.truncate(path, last.offset + 1)
        with pytest.raises(CheckpointError, match="short read") as info:
            ckpt.read(last.name)
        assert str(path) in str(info.value) and last.name in str(info.value)
        assert info.value.tensor == last.name


def test_file_changed_before_first_read(st_file):
    path, _ = st_file
    ckpt = open_checkpoint(path)
    with open(path, "ab") as f:
        f.write(b"\0" * 16)
    with pytest.raises(CheckpointError, match="changed since it was opened") as info:
        ckpt.read("half")
    assert str(path) in str(info.value)
    ckpt.close()


def test_concurrent_reads(st_file):
    path, _ = st_file
    reference = load_file(str(path))
    errors: list[BaseException] = []
    with open_checkpoint(path) as ckpt:

        def worker() -> None:
            try:
                for _ in range(20):
                    for name in ckpt.records:
                        assert ckpt.read(name).numpy().tobytes() == _raw(reference[name])
            except BaseException as exc:  # surfaced below
                errors.append(exc)

        threads = [threading.Thread(target=worker) for _ in range(4)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    assert not errors, errors


def test_read_without_pread_falls_back_to_seek_and_readinto(st_file, monkeypatch):
    """Windows has no os.preadv: the locked seek+readinto path must give the same bytes."""
    path, _ = st_file
    reference = load_file(str(path))
    monkeypatch.delattr(os, "preadv")
    with open_checkpoint(path) as ckpt:
        for name in ckpt.records:
            assert ckpt.read(name).numpy().tobytes() == _raw(reference[name])


@pytest.mark.cuda
def test_read_into_pinned_memory_then_gpu(st_file):
    path, tensors = st_file
    with open_checkpoint(path) as ckpt:
        record = ckpt.records["blocks.0.weight"]
        pinned = torch.empty(record.nbytes + 64, dtype=torch.uint8, pin_memory=True)
        ckpt.read_into(record.name, pinned[64 : 64 + record.nbytes])
        gpu = pinned[64 : 64 + record.nbytes].to("cuda", non_blocking=True)
        decoded = gpu.view(record.dtype).view(record.shape).cpu()
        assert torch.equal(decoded, tensors["blocks.0.weight"])
        with pytest.raises(TypeError, match="CPU"):
            ckpt.read_into(
                record.name, torch.empty(record.nbytes, dtype=torch.uint8, device="cuda")
            )


@sparse_files
def test_large_sparse_file_opens_without_reading_data(tmp_path):
    """A 4 GiB tensor (sparse on disk) opens instantly and with no memory growth."""
    size = 4 << 30
    header = json.dumps({"big": {"dtype": "U8", "shape": [size], "data_offsets": [0, size]}})
    path = tmp_path / "big.safetensors"
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(header)) + header.encode())
        f.truncate(8 + len(header) + size)
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    start = time.perf_counter()
    with open_checkpoint(path) as ckpt:
        assert ckpt.records["big"].nbytes == size
    assert time.perf_counter() - start < 2
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss < 64 * 1024  # KiB


def test_data_gap_is_accepted_with_warning(tmp_path, caplog):
    header = json.dumps({"w": {"dtype": "F32", "shape": [1], "data_offsets": [4, 8]}})
    path = tmp_path / "gap.safetensors"
    path.write_bytes(struct.pack("<Q", len(header)) + header.encode() + bytes(4) + b"\1\0\0\0")
    with caplog.at_level(logging.WARNING, logger="comfyui_wan_blockswap.callbacks.checkpoint"):
        with open_checkpoint(path) as ckpt:
            assert ckpt.read("w").tolist() == [1, 0, 0, 0]
    assert "belong to no tensor" in caplog.text


def test_deeply_nested_json_header(tmp_path):
    header = b"[" * 100_000 + b"]" * 100_000
    path = tmp_path / "deep.safetensors"
    path.write_bytes(struct.pack("<Q", len(header)) + header)
    with pytest.raises(CheckpointError, match="not valid JSON") as info:
        open_checkpoint(path)
    assert "deep.safetensors" in str(info.value)


# ---------------------------------------------------------------------------------------------
# Paths, folders, pickle and unknown formats
# ---------------------------------------------------------------------------------------------


def test_missing_path(tmp_path):
    missing = tmp_path / "nowhere" / "model.safetensors"
    with pytest.raises(CheckpointNotFoundError) as info:
        open_checkpoint(missing)
    assert isinstance(info.value, FileNotFoundError) and isinstance(info.value, CheckpointError)
    assert str(missing) in str(info.value) and "no such file" in str(info.value)


@pytest.mark.parametrize("suffix", [".ckpt", ".pt", ".pth", ".bin", ".pkl", ".bin.index.json"])
def test_pickle_formats_are_refused(tmp_path, suffix):
    path = tmp_path / f"model{suffix}"
    path.write_bytes(b"\x80\x02}q\x00.")  # a real (empty-dict) pickle: must never be loaded
    with pytest.raises(CheckpointError) as info:
        open_checkpoint(path)
    message = str(info.value)
    assert path.name in message and "arbitrary code" in message and "safetensors" in message


def test_unknown_extension_lists_supported_formats(tmp_path):
    path = tmp_path / "model.onnx"
    path.write_bytes(b"\0" * 16)
    with pytest.raises(CheckpointError) as info:
        open_checkpoint(path)
    message = str(info.value)
    assert "model.onnx" in message and "unrecognised" in message
    for fmt in (".safetensors", ".safetensors.index.json", ".gguf", "folder"):
        assert fmt in message


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs FIFOs")
def test_fifo_is_refused_without_blocking(tmp_path):
    path = tmp_path / "pipe.safetensors"
    os.mkfifo(path)
    with pytest.raises(CheckpointError, match="not a regular file"):
        open_checkpoint(path)


def test_folder_with_single_safetensors(tmp_path, st_file):
    path, tensors = st_file
    with open_checkpoint(tmp_path) as ckpt:
        assert ckpt.paths == (str(path),) and set(ckpt.records) == set(tensors)


def test_folder_with_several_candidates(tmp_path):
    for name in ("a.safetensors", "b.safetensors"):
        save_file({"w": torch.zeros(2)}, str(tmp_path / name))
    with pytest.raises(CheckpointError) as info:
        open_checkpoint(tmp_path)
    message = str(info.value)
    assert str(tmp_path) in message and "a.safetensors" in message and "b.safetensors" in message
    assert "several" in message


def test_folder_without_checkpoint(tmp_path):
    (tmp_path / "pytorch_model.bin").write_bytes(b"\x80\x02.")
    (tmp_path / "transformer").mkdir()
    with pytest.raises(CheckpointError) as info:
        open_checkpoint(tmp_path)
    message = str(info.value)
    assert str(tmp_path) in message and "no *.safetensors" in message
    assert "pytorch_model.bin" in message and "transformer" in message


# ---------------------------------------------------------------------------------------------
# Sharded diffusers folders
# ---------------------------------------------------------------------------------------------

INDEX = "diffusion_pytorch_model.safetensors.index.json"


def _sharded(folder, weight_map_edit=None, extra_shard_tensors=None):
    """Two shards plus an index, as diffusers' save_pretrained writes them."""
    shards = {
        "diffusion_pytorch_model-00001-of-00002.safetensors": {
            "blocks.0.weight": torch.randn(4, 4).to(torch.bfloat16),
            "blocks.0.bias": torch.randn(4),
        },
        "diffusion_pytorch_model-00002-of-00002.safetensors": {
            "blocks.1.weight": torch.randn(4, 4).to(torch.bfloat16),
            "head.scale": torch.tensor(2.0),
        },
    }
    weight_map = {key: shard for shard, tensors in shards.items() for key in tensors}
    for shard, tensors in shards.items():
        extra = (extra_shard_tensors or {}).get(shard, {})
        save_file({**tensors, **extra}, str(folder / shard), metadata={"format": "pt"})
    if weight_map_edit:
        weight_map_edit(weight_map)
    index = {"metadata": {"total_size": 84}, "weight_map": dict(sorted(weight_map.items()))}
    (folder / INDEX).write_text(json.dumps(index))
    return shards


def test_sharded_index_and_folder(tmp_path):
    shards = _sharded(tmp_path)
    for target in (tmp_path / INDEX, tmp_path):
        with open_checkpoint(target) as ckpt:
            assert ckpt.format == "safetensors"
            assert ckpt.paths == tuple(str(tmp_path / shard) for shard in sorted(shards))
            assert ckpt.metadata["total_size"] == 84 and ckpt.metadata["format"] == "pt"
            first = shards["diffusion_pytorch_model-00001-of-00002.safetensors"]
            assert set(list(ckpt.records)[:2]) == set(first)  # shard by shard
            for shard, tensors in shards.items():
                for name, tensor in tensors.items():
                    record = ckpt.records[name]
                    assert record.path == str(tmp_path / shard)
                    assert record.shape == tuple(tensor.shape) and record.dtype == tensor.dtype
                    assert ckpt.read(name).numpy().tobytes() == _raw(tensor)


def test_sharded_missing_shard(tmp_path):
    _sharded(tmp_path)
    os.remove(tmp_path / "diffusion_pytorch_model-00002-of-00002.safetensors")
    with pytest.raises(CheckpointError) as info:
        open_checkpoint(tmp_path)
    message = str(info.value)
    assert INDEX in message and "missing" in message
    assert "diffusion_pytorch_model-00002-of-00002.safetensors" in message


def test_sharded_key_not_in_its_shard(tmp_path):
    def add_ghost(weight_map):
        weight_map["ghost.weight"] = "diffusion_pytorch_model-00001-of-00002.safetensors"

    _sharded(tmp_path, add_ghost)
    with pytest.raises(CheckpointError) as info:
        open_checkpoint(tmp_path / INDEX)
    assert INDEX in str(info.value) and "'ghost.weight'" in str(info.value)
    assert "not in the shard it names" in str(info.value)


def test_sharded_key_in_wrong_shard(tmp_path):
    def move(weight_map):
        weight_map["head.scale"] = "diffusion_pytorch_model-00001-of-00002.safetensors"

    _sharded(tmp_path, move)
    with pytest.raises(CheckpointError, match="'head.scale'"):
        open_checkpoint(tmp_path)


def test_sharded_duplicate_across_shards(tmp_path):
    extra = {"diffusion_pytorch_model-00002-of-00002.safetensors": {"blocks.0.bias": torch.ones(4)}}
    _sharded(tmp_path, extra_shard_tensors=extra)
    with pytest.raises(CheckpointError) as info:
        open_checkpoint(tmp_path)
    assert "'blocks.0.bias'" in str(info.value) and "too" in str(info.value)


def test_sharded_unlisted_key_is_kept_with_warning(tmp_path, caplog):
    extra = {"diffusion_pytorch_model-00002-of-00002.safetensors": {"extra": torch.ones(2)}}
    _sharded(tmp_path, extra_shard_tensors=extra)
    with caplog.at_level(logging.WARNING, logger="comfyui_wan_blockswap.callbacks.checkpoint"):
        with open_checkpoint(tmp_path) as ckpt:
            assert "extra" in ckpt.records
    assert "not listed in the index" in caplog.text


def test_sharded_bad_shard_header_names_the_shard(tmp_path):
    _sharded(tmp_path)
    shard = tmp_path / "diffusion_pytorch_model-00002-of-00002.safetensors"
    shard.write_bytes(shard.read_bytes()[:20])
    with pytest.raises(CheckpointError) as info:
        open_checkpoint(tmp_path)
    assert str(shard) in str(info.value)


def test_two_indexes_in_folder(tmp_path):
    _sharded(tmp_path)
    (tmp_path / "other.safetensors.index.json").write_text((tmp_path / INDEX).read_text())
    with pytest.raises(CheckpointError) as info:
        open_checkpoint(tmp_path)
    assert INDEX in str(info.value) and "other.safetensors.index.json" in str(info.value)


# ---------------------------------------------------------------------------------------------
# GGUF
# ---------------------------------------------------------------------------------------------


def _write_gguf(path, tensors: dict[str, tuple[np.ndarray, T | None]], **kv) -> None:
    writer = gguf.GGUFWriter(str(path), "wan")
    for key, value in kv.items():
        writer.add_key_value(key, value[0], value[1])
    for name, (array, raw_dtype) in tensors.items():
        writer.add_tensor(name, array, raw_dtype=raw_dtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


@pytest.fixture()
def gguf_file(tmp_path):
    rng = np.random.default_rng(0)
    weight = rng.standard_normal((3, 64)).astype(np.float32)
    conv = rng.standard_normal((2, 3, 1, 2, 2)).astype(np.float16)  # 5-D, like Wan's patch conv
    tensors = {
        "blocks.0.norm.weight": (rng.standard_normal(64).astype(np.float32), None),
        "blocks.0.q8.weight": (quantize(weight, T.Q8_0), T.Q8_0),
        "blocks.0.q4.weight": (quantize(weight, T.Q4_0), T.Q4_0),
        "blocks.0.f16.weight": (weight.astype(np.float16), None),
        "blocks.0.bf16.weight": (quantize(weight, T.BF16), T.BF16),
        "patch_embedding.weight": (conv, None),
        "ids": (np.arange(6, dtype=np.int32).reshape(2, 3), None),
        "iq2.weight": (rng.integers(0, 255, (2, 66), dtype=np.uint8), T.IQ2_XXS),
    }
    path = tmp_path / "model.gguf"
    _write_gguf(
        path,
        tensors,
        **{
            "test.count": (7, gguf.GGUFValueType.UINT32),
            "test.names": (["a", "bé"], gguf.GGUFValueType.ARRAY),
            "test.scale": (0.5, gguf.GGUFValueType.FLOAT32),
            "test.flag": (True, gguf.GGUFValueType.BOOL),
        },
    )
    return path, weight


EXPECTED_GGUF = {  # name -> (torch shape, dtype, qtype)
    "blocks.0.norm.weight": ((64,), torch.float32, None),
    "blocks.0.q8.weight": ((3, 64), None, T.Q8_0),
    "blocks.0.q4.weight": ((3, 64), None, T.Q4_0),
    "blocks.0.f16.weight": ((3, 64), torch.float16, None),
    "blocks.0.bf16.weight": ((3, 64), torch.bfloat16, None),
    "patch_embedding.weight": ((2, 3, 1, 2, 2), torch.float16, None),
    "ids": ((2, 3), torch.int32, None),
    "iq2.weight": ((2, 256), None, T.IQ2_XXS),
}


def test_gguf_records_and_bytes(gguf_file):
    path, weight = gguf_file
    reader = gguf.GGUFReader(str(path))
    reference = {t.name: t for t in reader.tensors}
    with open_checkpoint(path) as ckpt:
        assert ckpt.format == "gguf" and ckpt.paths == (str(path),)
        by_offset = sorted(reader.tensors, key=lambda t: t.data_offset)
        assert list(ckpt.records) == [t.name for t in by_offset]  # the file's data order
        assert ckpt.metadata == {
            "general.architecture": "wan",
            "test.count": 7,
            "test.names": ["a", "bé"],
            "test.scale": 0.5,
            "test.flag": True,
        }
        for name, (shape, dtype, qtype) in EXPECTED_GGUF.items():
            record, ref = ckpt.records[name], reference[name]
            assert (record.shape, record.dtype, record.qtype) == (shape, dtype, qtype)
            assert record.shape == tuple(reversed(ref.shape.tolist()))
            assert record.nbytes == ref.n_bytes == quantized_nbytes(ref.tensor_type, shape)
            assert record.offset == ref.data_offset  # absolute, like GGUFReader's
            out = torch.empty(record.nbytes, dtype=torch.uint8)
            ckpt.read_into(name, out)
            assert out.numpy().tobytes() == ref.data.tobytes()
        # The raw Q8_0 bytes decode to (nearly) the original weight.
        q8 = ckpt.records["blocks.0.q8.weight"]
        decoded = dequantize(ckpt.read(q8.name), q8.qtype, q8.shape, dtype=torch.float32)
        assert torch.allclose(decoded, torch.from_numpy(weight), atol=0.05)
        plain = ckpt.records["blocks.0.f16.weight"]
        assert torch.equal(
            ckpt.read(plain.name).view(plain.dtype).view(plain.shape),
            torch.from_numpy(weight.astype(np.float16)),
        )


def test_gguf_unsupported_quant_type_is_recorded_not_refused(gguf_file):
    path, _ = gguf_file
    with open_checkpoint(path) as ckpt:
        record = ckpt.records["iq2.weight"]
        assert record.qtype == T.IQ2_XXS and record.qtype not in SUPPORTED_TYPES
        assert record.dtype is None and record.nbytes == 2 * 66


def test_gguf_truncated_tensor_data(gguf_file):
    path, _ = gguf_file
    last = gguf.GGUFReader(str(path)).tensors[-1]
    os.truncate(path, last.data_offset + last.n_bytes - 1)  # the writer pads after it
    with pytest.raises(CheckpointError) as info:
        open_checkpoint(path)
    assert "model.gguf" in str(info.value) and "runs past the end" in str(info.value)
    assert info.value.tensor == "iq2.weight"


def test_gguf_custom_alignment(tmp_path):
    path = tmp_path / "aligned.gguf"
    writer = gguf.GGUFWriter(str(path), "wan")
    writer.add_custom_alignment(64)
    writer.add_tensor("a", np.arange(3, dtype=np.float32))
    writer.add_tensor("b", np.arange(5, dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with open_checkpoint(path) as ckpt:
        assert all(r.offset % 64 == 0 for r in ckpt.records.values())
        assert ckpt.read("b").view(torch.float32).tolist() == [0, 1, 2, 3, 4]


@sparse_files
def test_gguf_large_sparse_tensor_opens_without_reading_data(tmp_path):
    """Neither the pre-scan nor GGUFReader may touch tensor data (4 GiB sparse here)."""
    path = tmp_path / "big.gguf"
    n = 1 << 30  # float32 elements
    info = struct.pack("<Q", 1) + b"w" + struct.pack("<IQIQ", 1, n, 0, 0)
    head = b"GGUF" + struct.pack("<IQQ", 3, 1, 0) + info
    head += b"\0" * (-len(head) % 32)
    with open(path, "wb") as f:
        f.write(head)
        f.truncate(len(head) + 4 * n)
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    start = time.perf_counter()
    with open_checkpoint(path) as ckpt:
        assert ckpt.records["w"].nbytes == 4 * n and ckpt.records["w"].offset == len(head)
    assert time.perf_counter() - start < 2
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss < 64 * 1024  # KiB


def test_gguf_module_is_only_imported_for_gguf(st_file):
    """Opening safetensors must not need (or pay for) the gguf package."""
    path, _ = st_file
    benchmarks = os.path.join(os.path.dirname(os.path.dirname(__file__)), "benchmarks")
    code = (
        f"import sys; sys.path.insert(0, {benchmarks!r}); import _pack\n"
        "from comfyui_wan_blockswap.callbacks.checkpoint import open_checkpoint\n"
        f"open_checkpoint({str(path)!r}).close()\n"
        "assert 'gguf' not in sys.modules\n"
        "assert 'comfyui_wan_blockswap.callbacks.gguf_reader' not in sys.modules\n"
    )
    import subprocess

    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
