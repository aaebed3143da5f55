"""Tests for callbacks.gguf_dequant against the numpy reference in the ``gguf`` package.

Types the ``gguf`` package can quantize are round-tripped from random float32 data.  For the
K and IQ4 types (no numpy quantizer) and, for extra bit-pattern coverage, the simple block
types too, random raw blocks are built with sane float16 scale fields, because a random
float16 scale can be inf/NaN and would only test NaN propagation.
"""

from __future__ import annotations

import re

import gguf
import numpy as np
import pytest
import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType as T
from gguf.quants import quant_shape_to_byte_shape

from comfyui_wan_blockswap.callbacks.gguf_dequant import (
    SUPPORTED_TYPES,
    UnsupportedQuantTypeError,
    dequantize,
    quantized_nbytes,
)

PLAIN = [T.F32, T.F16, T.BF16]
QUANTIZABLE = PLAIN + [T.Q8_0, T.Q4_0, T.Q4_1, T.Q5_0, T.Q5_1]
EXACT = set(PLAIN) | {T.Q8_0}

# Byte offsets of the float16 scale / min fields inside one block, per ggml's block structs.
F16_FIELDS: dict[T, tuple[int, ...]] = {
    T.Q8_0: (0,),
    T.Q4_0: (0,),
    T.Q4_1: (0, 2),
    T.Q5_0: (0,),
    T.Q5_1: (0, 2),
    T.Q2_K: (80, 82),
    T.Q3_K: (108,),
    T.Q4_K: (0, 2),
    T.Q5_K: (0, 2),
    T.Q6_K: (208,),
    T.IQ4_NL: (0,),
    T.IQ4_XS: (0,),
}
BLOCK_TYPES = list(F16_FIELDS)

SHAPES = [(64, 256), (3, 512), (512,), (2, 3, 256)]
TOLERANCE = dict(rtol=1e-6, atol=1e-6)

# Rough upper bounds on relative RMS error of a round trip, to catch a decoder that merely
# agrees with a broken reference.
ROUND_TRIP_RMS = {
    T.F32: 0.0,
    T.F16: 1e-3,
    T.BF16: 1e-2,
    T.Q8_0: 1e-2,
    T.Q5_0: 6e-2,
    T.Q5_1: 6e-2,
    T.Q4_0: 0.12,
    T.Q4_1: 0.12,
}


def _id(value: object) -> str:
    return getattr(value, "name", str(value))


def _quantized(qtype: T, shape: tuple[int, ...], seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Random float32 data and its raw GGUF bytes (uint8, byte-shaped like in a file)."""
    rng = np.random.default_rng(seed)
    values = rng.standard_normal(shape, dtype=np.float32)
    raw = np.ascontiguousarray(gguf.quants.quantize(values, qtype)).view(np.uint8)
    return values, raw


def _random_blocks(qtype: T, shape: tuple[int, ...], seed: int = 0) -> np.ndarray:
    """Random raw bytes for ``shape`` with finite, moderately sized float16 scale fields."""
    rng = np.random.default_rng(seed)
    raw = rng.integers(0, 256, size=quant_shape_to_byte_shape(shape, qtype), dtype=np.uint8)
    _, type_size = GGML_QUANT_SIZES[qtype]
    blocks = raw.reshape(-1, type_size)
    for offset in F16_FIELDS[qtype]:
        magnitude = rng.uniform(1e-3, 1e-1, size=blocks.shape[0])
        sign = rng.choice([-1.0, 1.0], size=blocks.shape[0])
        scale = (magnitude * sign).astype(np.float16)
        blocks[:, offset : offset + 2] = scale.view(np.uint8).reshape(-1, 2)
    return raw


def _reference(raw: np.ndarray, qtype: T, shape: tuple[int, ...]) -> torch.Tensor:
    return torch.from_numpy(np.asarray(gguf.quants.dequantize(raw, qtype)).reshape(shape).copy())


def _check_against_reference(raw: np.ndarray, qtype: T, shape: tuple[int, ...]) -> None:
    expected = _reference(raw, qtype, shape)
    data = torch.from_numpy(raw.reshape(-1).copy())

    out = dequantize(data, qtype, shape, dtype=torch.float32, name="blk.0.attn_q.weight")
    assert out.shape == torch.Size(shape)
    assert out.dtype == torch.float32
    assert out.device == data.device
    if qtype in EXACT:
        torch.testing.assert_close(out, expected, rtol=0, atol=0)
    else:
        torch.testing.assert_close(out, expected, **TOLERANCE)

    half = dequantize(data, qtype, shape, name="blk.0.attn_q.weight")
    assert half.dtype == torch.float16
    assert half.shape == torch.Size(shape)
    torch.testing.assert_close(half, expected.to(torch.float16))


def test_supported_types_are_all_covered() -> None:
    assert SUPPORTED_TYPES == frozenset(PLAIN) | frozenset(BLOCK_TYPES)
    assert isinstance(SUPPORTED_TYPES, frozenset)


@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("qtype", QUANTIZABLE, ids=_id)
def test_quantized_round_trip_matches_reference(qtype: T, shape: tuple[int, ...]) -> None:
    values, raw = _quantized(qtype, shape)
    _check_against_reference(raw, qtype, shape)

    out = dequantize(torch.from_numpy(raw), qtype, shape, dtype=torch.float32)
    original = torch.from_numpy(values)
    rel_rms = (out - original).pow(2).mean().sqrt() / original.pow(2).mean().sqrt()
    assert rel_rms <= ROUND_TRIP_RMS[qtype]


@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("qtype", BLOCK_TYPES, ids=_id)
def test_random_blocks_match_reference(qtype: T, shape: tuple[int, ...]) -> None:
    raw = _random_blocks(qtype, shape, seed=len(shape) * 1000 + shape[-1])
    _check_against_reference(raw, qtype, shape)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("qtype", [T.BF16, T.Q4_K, T.Q8_0], ids=_id)
def test_output_dtype_and_device(qtype: T, dtype: torch.dtype) -> None:
    shape = (4, 256)
    raw = _quantized(qtype, shape)[1] if qtype in QUANTIZABLE else _random_blocks(qtype, shape)
    data = torch.from_numpy(raw)
    out = dequantize(data, qtype, shape, dtype=dtype)
    assert out.dtype == dtype
    assert out.device == data.device
    torch.testing.assert_close(out, _reference(raw, qtype, shape).to(dtype))


def test_input_layouts_and_argument_forms_agree() -> None:
    """Byte tensors of any shape, strided or misaligned, and int/list/Size args all work."""
    qtype, shape = T.Q5_K, (6, 256)
    raw = _random_blocks(qtype, shape)
    expected = _reference(raw, qtype, shape)
    flat = torch.from_numpy(raw.reshape(-1).copy())

    padded = torch.zeros(flat.numel() + 1, dtype=torch.uint8)
    padded[1:] = flat
    misaligned = padded[1:]
    assert misaligned.storage_offset() % 2 == 1

    strided = torch.zeros((flat.numel(), 2), dtype=torch.uint8)
    strided[:, 1] = flat
    strided = strided[:, 1]
    assert not strided.is_contiguous()

    variants = {
        "flat": (flat, qtype, shape),
        "byte_shaped": (torch.from_numpy(raw), qtype, shape),
        "odd_shape": (flat.view(2, 3, -1), qtype, shape),
        "misaligned": (misaligned, qtype, shape),
        "strided": (strided, qtype, shape),
        "int_qtype": (flat, int(qtype), shape),
        "size_shape": (flat, qtype, torch.Size(shape)),
        "list_shape": (flat, qtype, list(shape)),
    }
    for label, (data, qt, shp) in variants.items():
        out = dequantize(data, qt, shp, dtype=torch.float32)
        torch.testing.assert_close(out, expected, **TOLERANCE, msg=lambda m: f"{label}: {m}")


def test_misaligned_plain_type() -> None:
    values = torch.randn(3, 8)
    padded = torch.zeros(values.numel() * 4 + 1, dtype=torch.uint8)
    padded[1:] = values.view(-1).view(torch.uint8)
    out = dequantize(padded[1:], T.F32, (3, 8), dtype=torch.float32)
    assert torch.equal(out, values)


def test_plain_type_with_matching_dtype_is_zero_copy() -> None:
    values = torch.randn(4, 16, dtype=torch.float16)
    data = values.view(-1).view(torch.uint8)
    out = dequantize(data, T.F16, (4, 16), dtype=torch.float16)
    assert torch.equal(out, values)
    assert out.data_ptr() == data.data_ptr()


def test_empty_tensor() -> None:
    out = dequantize(torch.empty(0, dtype=torch.uint8), T.Q4_K, (0, 256), dtype=torch.bfloat16)
    assert out.shape == (0, 256)
    assert out.dtype == torch.bfloat16


@pytest.mark.parametrize("qtype", [T.TQ1_0, T.IQ1_S, T.IQ2_XXS], ids=_id)
def test_unsupported_type_names_type_and_tensor(qtype: T) -> None:
    shape = (2, 256)
    data = torch.zeros(quantized_nbytes(qtype, shape), dtype=torch.uint8)
    with pytest.raises(UnsupportedQuantTypeError) as excinfo:
        dequantize(data, qtype, shape, name="blocks.7.ffn.0.weight")
    message = str(excinfo.value)
    assert qtype.name in message
    assert "blocks.7.ffn.0.weight" in message
    for supported in ("Q4_K", "Q8_0", "IQ4_XS", "BF16"):
        assert supported in message
    assert isinstance(excinfo.value, ValueError)
    assert excinfo.value.qtype == qtype
    assert excinfo.value.tensor_name == "blocks.7.ffn.0.weight"


def test_unknown_type_id() -> None:
    with pytest.raises(UnsupportedQuantTypeError, match=r"'mystery'.*9999"):
        dequantize(torch.zeros(4, dtype=torch.uint8), 9999, (1,), name="mystery")


@pytest.mark.parametrize("delta", [-1, 1, -144])
def test_wrong_byte_count(delta: int) -> None:
    shape = (3, 512)
    expected = quantized_nbytes(T.Q4_K, shape)
    data = torch.zeros(expected + delta, dtype=torch.uint8)
    with pytest.raises(ValueError) as excinfo:
        dequantize(data, T.Q4_K, shape, name="head.weight")
    assert not isinstance(excinfo.value, UnsupportedQuantTypeError)
    message = str(excinfo.value)
    assert "head.weight" in message
    assert "Q4_K" in message
    assert re.search(rf"\b{expected}\b", message)
    assert re.search(rf"\b{expected + delta}\b", message)


def test_last_dim_not_multiple_of_block_size() -> None:
    with pytest.raises(ValueError, match=r"'w'.*Q6_K.*block size \(256\)"):
        dequantize(torch.zeros(210, dtype=torch.uint8), T.Q6_K, (2, 128), name="w")
    with pytest.raises(ValueError, match="block size"):
        quantized_nbytes(T.Q4_0, (4, 48))


def test_bad_input_and_output_dtypes() -> None:
    with pytest.raises(TypeError, match="uint8"):
        dequantize(torch.zeros(34, dtype=torch.int8), T.Q8_0, (32,))
    with pytest.raises(TypeError, match="floating"):
        dequantize(torch.zeros(34, dtype=torch.uint8), T.Q8_0, (32,), dtype=torch.int32)


@pytest.mark.parametrize("shape", [(64, 256), (3, 512), (512,), (0, 256)], ids=str)
@pytest.mark.parametrize("qtype", sorted(SUPPORTED_TYPES | {T.TQ1_0}, key=int), ids=_id)
def test_quantized_nbytes_matches_gguf(qtype: T, shape: tuple[int, ...]) -> None:
    expected = int(np.prod(quant_shape_to_byte_shape(shape, qtype)))
    assert quantized_nbytes(qtype, shape) == expected
    assert quantized_nbytes(int(qtype), torch.Size(shape)) == expected


@pytest.mark.parametrize("qtype", PLAIN, ids=_id)
def test_scalar_plain_tensor(qtype: T) -> None:
    _, type_size = GGML_QUANT_SIZES[qtype]
    assert quantized_nbytes(qtype, ()) == type_size
    data = torch.tensor([1.5]).to(
        {T.F32: torch.float32, T.F16: torch.float16, T.BF16: torch.bfloat16}[qtype]
    )
    out = dequantize(data.view(torch.uint8), qtype, (), dtype=torch.float32)
    assert out.shape == ()
    assert out.item() == 1.5


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("qtype", sorted(SUPPORTED_TYPES, key=int), ids=_id)
def test_cuda_matches_cpu(qtype: T) -> None:
    shape = (64, 512)
    raw = _quantized(qtype, shape)[1] if qtype in PLAIN else _random_blocks(qtype, shape)
    data = torch.from_numpy(raw)
    cpu = dequantize(data, qtype, shape, dtype=torch.float32)
    gpu = dequantize(data.cuda(), qtype, shape, dtype=torch.float32)
    assert gpu.device.type == "cuda"
    torch.testing.assert_close(gpu.cpu(), cpu, **TOLERANCE)
