"""Pure-PyTorch dequantization of GGUF / GGML tensors.

Block-swapped layers keep their weights in the compact form the GGUF file stores them in and
expand them only right before the layer's forward.  Doing that expansion with plain tensor
ops means it runs wherever the bytes already are (the GPU, in production) without a custom
kernel, a numpy round trip or a host synchronisation.

Every decoder below works on a ``(n_blocks, type_size)`` uint8 view of the raw bytes and is
fully vectorised: bit fields are unpacked with uint8 shifts and masks (no int64
intermediates), scales are combined in float32, and the result is cast to the requested
dtype once at the end.  Byte layouts follow ggml's ``block_*`` structs (little endian), as
mirrored by the numpy reference in ``gguf.quants``, which the tests compare against.

The ``gguf`` package is used only for the :class:`~gguf.GGMLQuantizationType` enum and the
``GGML_QUANT_SIZES`` table.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence

import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

__all__ = [
    "SUPPORTED_TYPES",
    "UnsupportedQuantTypeError",
    "dequantize",
    "quantized_nbytes",
]

_QK_K = 256  # values per K-quant / IQ4_XS super-block

# Non-linear 4-bit codebook shared by IQ4_NL and IQ4_XS (ggml's ``kvalues_iq4nl``).
_IQ4_CODEBOOK = (-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113)

# Types whose bytes are just an array of one scalar dtype.
_PLAIN_DTYPES: dict[GGMLQuantizationType, torch.dtype] = {
    GGMLQuantizationType.F32: torch.float32,
    GGMLQuantizationType.F16: torch.float16,
    GGMLQuantizationType.BF16: torch.bfloat16,
}


class UnsupportedQuantTypeError(ValueError):
    """Raised when a tensor uses a GGML type this module cannot dequantize.

    It subclasses ``ValueError`` so that generic loaders can treat it like any other bad
    input, while callers that want to fall back (e.g. keep such a tensor on the CPU path)
    can catch it specifically.  ``qtype`` is the enum member, or the raw integer when the
    id is not even known to the installed ``gguf`` package.
    """

    def __init__(self, qtype: GGMLQuantizationType | int, tensor_name: str) -> None:
        self.qtype = qtype
        self.tensor_name = tensor_name
        if isinstance(qtype, GGMLQuantizationType):
            label = f"GGML quantization type {qtype.name} (id {int(qtype)})"
        else:
            label = f"unknown GGML quantization type id {qtype!r}"
        supported = ", ".join(t.name for t in _sorted_supported())
        super().__init__(
            f"Tensor {tensor_name!r} uses {label}, which cannot be dequantized here. "
            f"Supported types: {supported}."
        )


# ---------------------------------------------------------------------------------------------
# Small helpers
# ---------------------------------------------------------------------------------------------


def _unpack_bits(packed: torch.Tensor, bits: int, count: int) -> torch.Tensor:
    """Split every byte of ``packed`` into ``count`` fields of ``bits`` bits, low bits first.

    Returns uint8 of shape ``(..., count, L)`` for input ``(..., L)``: field ``k`` of byte
    ``l`` lands at ``[..., k, l]``.  That "field-major" order is exactly how ggml lays out
    nibbles, crumbs and bit planes (all low fields of a run of bytes first, then the next
    field), so callers only need a reshape afterwards.  Staying in uint8 keeps the
    intermediate the size of the output instead of 8x larger with int64.
    """
    shifts = torch.arange(0, bits * count, bits, dtype=torch.uint8, device=packed.device)
    fields = packed.unsqueeze(-2) >> shifts.view(count, 1)
    return fields & ((1 << bits) - 1)


def _f16_field(blocks: torch.Tensor, offset: int) -> torch.Tensor:
    """Read the little-endian float16 at byte ``offset`` of every block as ``(n, 1)`` float32.

    The two-byte column is made contiguous first because a strided column cannot be
    reinterpreted as a wider dtype in place; the copy is only ``2 * n_blocks`` bytes.
    """
    raw = blocks[:, offset : offset + 2].contiguous()
    return raw.view(torch.float16).to(torch.float32)


@functools.lru_cache(maxsize=None)
def _iq4_codebook(device: torch.device) -> torch.Tensor:
    """The IQ4 codebook as float32 on ``device``, created once per device.

    Building it per call would copy from pageable host memory every time, which on CUDA
    stalls the host until the stream drains and would serialise block-swap prefetching.
    It is created outside inference mode so it stays usable in every autograd mode.
    """
    with torch.inference_mode(False):
        return torch.tensor(_IQ4_CODEBOOK, dtype=torch.float32, device=device)


def _codebook_lookup(indices: torch.Tensor) -> torch.Tensor:
    """Map uint8 4-bit indices through the IQ4 codebook, keeping the input's shape.

    ``index_select`` accepts int32 indices, which avoids materialising an int64 copy.
    """
    table = _iq4_codebook(indices.device)
    flat = torch.index_select(table, 0, indices.reshape(-1).to(torch.int32))
    return flat.view(indices.shape)


def _k_scales_mins(packed: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Decode the 12-byte field of 8 six-bit scales and 8 six-bit mins (Q4_K, Q5_K).

    Bytes 0-3 hold scales 0-3 in their low 6 bits, bytes 4-7 mins 0-3; scales/mins 4-7
    keep their low nibbles in bytes 8-11 (scale low, min high) and borrow their top two
    bits from the otherwise unused top bits of bytes 0-3 (scales) and 4-7 (mins).
    Returns float32 ``(n, 8)`` tensors.
    """
    n = packed.shape[0]
    grouped = packed.reshape(n, 3, 4)
    sc_lo, mn_lo, extra = grouped[:, 0], grouped[:, 1], grouped[:, 2]
    scales = torch.cat([sc_lo & 0x3F, (extra & 0x0F) | ((sc_lo >> 6) << 4)], dim=-1)
    mins = torch.cat([mn_lo & 0x3F, (extra >> 4) | ((mn_lo >> 6) << 4)], dim=-1)
    return scales.to(torch.float32), mins.to(torch.float32)


# ---------------------------------------------------------------------------------------------
# Per-type decoders: (n_blocks, type_size) uint8 -> (n_blocks, block_size) float32
# ---------------------------------------------------------------------------------------------


def _dequant_q8_0(blocks: torch.Tensor) -> torch.Tensor:
    """Q8_0: fp16 scale ``d`` then 32 signed bytes; value = d * q."""
    d = _f16_field(blocks, 0)
    q = blocks[:, 2:].view(torch.int8).to(torch.float32)
    return q * d


def _dequant_q4_0(blocks: torch.Tensor) -> torch.Tensor:
    """Q4_0: fp16 ``d`` then 16 bytes of nibbles (low nibbles = values 0-15); d * (q - 8)."""
    n = blocks.shape[0]
    d = _f16_field(blocks, 0)
    q = _unpack_bits(blocks[:, 2:], 4, 2).reshape(n, 32)
    return (q.to(torch.float32) - 8.0) * d


def _dequant_q4_1(blocks: torch.Tensor) -> torch.Tensor:
    """Q4_1: fp16 ``d``, fp16 ``m``, 16 bytes of nibbles; value = d * q + m."""
    n = blocks.shape[0]
    d = _f16_field(blocks, 0)
    m = _f16_field(blocks, 2)
    q = _unpack_bits(blocks[:, 4:], 4, 2).reshape(n, 32)
    return d * q.to(torch.float32) + m


def _q5_values(qh: torch.Tensor, qs: torch.Tensor) -> torch.Tensor:
    """Combine Q5_0/Q5_1 low nibbles with the fifth bits, giving uint8 ``(n, 32)`` in 0..31.

    ``qh`` is a little-endian uint32 whose bit ``j`` belongs to value ``j``; reading it
    byte by byte (bit ``j % 8`` of byte ``j // 8``) avoids a misaligned 4-byte view.
    """
    n = qs.shape[0]
    low = _unpack_bits(qs, 4, 2).reshape(n, 32)
    high = _unpack_bits(qh.unsqueeze(-1), 1, 8).reshape(n, 32)
    return low | (high << 4)


def _dequant_q5_0(blocks: torch.Tensor) -> torch.Tensor:
    """Q5_0: fp16 ``d``, 4 bytes of fifth bits, 16 bytes of nibbles; d * (q - 16)."""
    d = _f16_field(blocks, 0)
    q = _q5_values(blocks[:, 2:6], blocks[:, 6:])
    return (q.to(torch.float32) - 16.0) * d


def _dequant_q5_1(blocks: torch.Tensor) -> torch.Tensor:
    """Q5_1: fp16 ``d``, fp16 ``m``, 4 bytes of fifth bits, 16 bytes of nibbles; d * q + m."""
    d = _f16_field(blocks, 0)
    m = _f16_field(blocks, 2)
    q = _q5_values(blocks[:, 4:8], blocks[:, 8:])
    return d * q.to(torch.float32) + m


def _dequant_q2_k(blocks: torch.Tensor) -> torch.Tensor:
    """Q2_K: 16 bytes of (4-bit scale | 4-bit min << 4), 64 bytes of crumbs, fp16 d, dmin.

    Each 16-value group g gets ``d * scale_g * q - dmin * min_g``.  The 2-bit values are
    stored in two 32-byte halves; within a half, bit pair k of byte l is value 32k + l.
    """
    n = blocks.shape[0]
    packed_scales = blocks[:, :16]
    d = _f16_field(blocks, 80)
    dmin = _f16_field(blocks, 82)
    dl = (d * (packed_scales & 0x0F).to(torch.float32)).view(n, 16, 1)
    ml = (dmin * (packed_scales >> 4).to(torch.float32)).view(n, 16, 1)
    q = _unpack_bits(blocks[:, 16:80].reshape(n, 2, 32), 2, 4).reshape(n, 16, 16)
    return (dl * q.to(torch.float32) - ml).reshape(n, _QK_K)


def _dequant_q3_k(blocks: torch.Tensor) -> torch.Tensor:
    """Q3_K: 32-byte high-bit mask, 64 bytes of crumbs, 12 bytes of 6-bit scales, fp16 d.

    Value = d * (scale_g - 32) * (low2 - (0 if high bit set else 4)).  The 16 scales keep
    their low nibbles in bytes 0-7 (scales 8-15 in the high nibbles) and their top two bits
    in bytes 8-11 (bit pair k of byte l is scale 4k + l).  Bit plane k of the mask covers
    values 32k..32k+31.
    """
    n = blocks.shape[0]
    hmask = blocks[:, :32]
    qs = blocks[:, 32:96]
    packed_scales = blocks[:, 96:108]
    d = _f16_field(blocks, 108)

    sc_low = _unpack_bits(packed_scales[:, :8], 4, 2).reshape(n, 16)
    sc_high = _unpack_bits(packed_scales[:, 8:], 2, 4).reshape(n, 16)
    scales = (sc_low | (sc_high << 4)).to(torch.float32) - 32.0
    dl = (d * scales).view(n, 16, 1)

    low = _unpack_bits(qs.reshape(n, 2, 32), 2, 4).reshape(n, 16, 16)
    high = _unpack_bits(hmask, 1, 8).reshape(n, 16, 16)
    # A *cleared* high bit means "subtract 4"; stay in int8 (range -4..3).
    q = low.to(torch.int8) - ((high ^ 1) << 2).to(torch.int8)
    return (dl * q.to(torch.float32)).reshape(n, _QK_K)


def _dequant_q4_k(blocks: torch.Tensor) -> torch.Tensor:
    """Q4_K: fp16 d, fp16 dmin, 12 bytes of scales/mins, 128 bytes of nibbles.

    Eight 32-value groups, value = d * scale_g * q - dmin * min_g.  Each 32-byte chunk
    holds two groups: low nibbles first, then high nibbles.
    """
    n = blocks.shape[0]
    d = _f16_field(blocks, 0)
    dmin = _f16_field(blocks, 2)
    scales, mins = _k_scales_mins(blocks[:, 4:16])
    dl = (d * scales).view(n, 8, 1)
    ml = (dmin * mins).view(n, 8, 1)
    q = _unpack_bits(blocks[:, 16:].reshape(n, 4, 32), 4, 2).reshape(n, 8, 32)
    return (dl * q.to(torch.float32) - ml).reshape(n, _QK_K)


def _dequant_q5_k(blocks: torch.Tensor) -> torch.Tensor:
    """Q5_K: like Q4_K plus a 32-byte fifth-bit field before the nibbles.

    Bit plane k of that field supplies the fifth bit of group k (values 32k..32k+31).
    """
    n = blocks.shape[0]
    d = _f16_field(blocks, 0)
    dmin = _f16_field(blocks, 2)
    scales, mins = _k_scales_mins(blocks[:, 4:16])
    dl = (d * scales).view(n, 8, 1)
    ml = (dmin * mins).view(n, 8, 1)
    low = _unpack_bits(blocks[:, 48:].reshape(n, 4, 32), 4, 2).reshape(n, 8, 32)
    high = _unpack_bits(blocks[:, 16:48], 1, 8).reshape(n, 8, 32)
    q = low | (high << 4)
    return (dl * q.to(torch.float32) - ml).reshape(n, _QK_K)


def _dequant_q6_k(blocks: torch.Tensor) -> torch.Tensor:
    """Q6_K: 128 bytes low nibbles, 64 bytes high crumbs, 16 int8 scales, fp16 d.

    Two 128-value halves.  In a half, the 64 nibble bytes give values 0-63 (low nibbles)
    and 64-127 (high nibbles); the 32 crumb bytes give bit pair k to values 32k..32k+31.
    Value = d * scale_g * (q - 32) with 16-value groups g.
    """
    n = blocks.shape[0]
    low = _unpack_bits(blocks[:, :128].reshape(n, 2, 64), 4, 2).reshape(n, _QK_K)
    high = _unpack_bits(blocks[:, 128:192].reshape(n, 2, 32), 2, 4).reshape(n, _QK_K)
    scales = blocks[:, 192:208].view(torch.int8).to(torch.float32)
    d = _f16_field(blocks, 208)
    dl = (d * scales).view(n, 16, 1)
    q = (low | (high << 4)).to(torch.float32) - 32.0
    return (dl * q.view(n, 16, 16)).reshape(n, _QK_K)


def _dequant_iq4_nl(blocks: torch.Tensor) -> torch.Tensor:
    """IQ4_NL: Q4_0's layout, but nibbles index a non-linear codebook; d * codebook[q]."""
    n = blocks.shape[0]
    d = _f16_field(blocks, 0)
    q = _unpack_bits(blocks[:, 2:], 4, 2).reshape(n, 32)
    return d * _codebook_lookup(q)


def _dequant_iq4_xs(blocks: torch.Tensor) -> torch.Tensor:
    """IQ4_XS: fp16 d, 2 bytes of scale high bits, 4 bytes of scale low nibbles, 128 nibbles.

    Eight 32-value groups with 6-bit scales: low nibble ``g % 2`` of byte ``g // 2`` plus
    bit pair ``g`` of the little-endian uint16.  Each group's 16 bytes give values 0-15
    (low nibbles) and 16-31 (high nibbles).  Value = d * (scale_g - 32) * codebook[q].
    """
    n = blocks.shape[0]
    d = _f16_field(blocks, 0)
    sc_high = _unpack_bits(blocks[:, 2:4].unsqueeze(-1), 2, 4).reshape(n, 8)
    sc_low = _unpack_bits(blocks[:, 4:8].unsqueeze(-1), 4, 2).reshape(n, 8)
    scales = (sc_low | (sc_high << 4)).to(torch.float32) - 32.0
    dl = (d * scales).view(n, 8, 1)
    q = _unpack_bits(blocks[:, 8:].reshape(n, 8, 16), 4, 2).reshape(n, 8, 32)
    return (dl * _codebook_lookup(q)).reshape(n, _QK_K)


_DECODERS: dict[GGMLQuantizationType, Callable[[torch.Tensor], torch.Tensor]] = {
    GGMLQuantizationType.Q8_0: _dequant_q8_0,
    GGMLQuantizationType.Q4_0: _dequant_q4_0,
    GGMLQuantizationType.Q4_1: _dequant_q4_1,
    GGMLQuantizationType.Q5_0: _dequant_q5_0,
    GGMLQuantizationType.Q5_1: _dequant_q5_1,
    GGMLQuantizationType.Q2_K: _dequant_q2_k,
    GGMLQuantizationType.Q3_K: _dequant_q3_k,
    GGMLQuantizationType.Q4_K: _dequant_q4_k,
    GGMLQuantizationType.Q5_K: _dequant_q5_k,
    GGMLQuantizationType.Q6_K: _dequant_q6_k,
    GGMLQuantizationType.IQ4_NL: _dequant_iq4_nl,
    GGMLQuantizationType.IQ4_XS: _dequant_iq4_xs,
}

SUPPORTED_TYPES: frozenset[GGMLQuantizationType] = frozenset(_PLAIN_DTYPES) | frozenset(_DECODERS)
"""Every GGML type :func:`dequantize` accepts."""


def _sorted_supported() -> list[GGMLQuantizationType]:
    """Supported types in enum-id order, so error messages are stable and readable."""
    return sorted(SUPPORTED_TYPES, key=int)


# ---------------------------------------------------------------------------------------------
# Public API
# ---------------------------------------------------------------------------------------------


def _as_qtype(qtype: GGMLQuantizationType | int, name: str) -> GGMLQuantizationType:
    """Normalise an enum member or raw id (as read from a GGUF header) to the enum."""
    try:
        return GGMLQuantizationType(qtype)
    except ValueError:
        raise UnsupportedQuantTypeError(qtype, name) from None


def _as_shape(shape: Sequence[int] | torch.Size) -> tuple[int, ...]:
    """Accept tuples, lists or ``torch.Size`` and reject negative dimensions early."""
    dims = tuple(int(dim) for dim in shape)
    if any(dim < 0 for dim in dims):
        raise ValueError(f"Shape {dims} has a negative dimension")
    return dims


def quantized_nbytes(
    qtype: GGMLQuantizationType | int,
    shape: tuple[int, ...] | torch.Size,
    *,
    name: str = "<tensor>",
) -> int:
    """Bytes a GGUF file stores for a tensor of logical (PyTorch-order) ``shape`` and ``qtype``.

    Works for every type the installed ``gguf`` package knows, including ones
    :func:`dequantize` does not support, so loaders can size or skip such tensors.  GGML
    quantizes along the innermost (last PyTorch) dimension in whole blocks, hence that
    dimension must be a multiple of the type's block size; a 0-d shape counts as one value.
    ``name`` only labels error messages.
    """
    qt = _as_qtype(qtype, name)
    if qt not in GGML_QUANT_SIZES:
        raise UnsupportedQuantTypeError(qt, name)
    block_size, type_size = GGML_QUANT_SIZES[qt]
    dims = _as_shape(shape)
    row = dims[-1] if dims else 1
    if row % block_size != 0:
        raise ValueError(
            f"Tensor {name!r} of type {qt.name} has shape {dims}: its last dimension ({row}) "
            f"must be a multiple of the {qt.name} block size ({block_size})"
        )
    numel = 1
    for dim in dims:
        numel *= dim
    return numel // block_size * type_size


def dequantize(
    data: torch.Tensor,
    qtype: GGMLQuantizationType | int,
    shape: tuple[int, ...] | torch.Size,
    dtype: torch.dtype = torch.float16,
    name: str = "<tensor>",
) -> torch.Tensor:
    """Expand a GGUF tensor's raw bytes into a dense tensor on the same device.

    Args:
        data: uint8 tensor holding the tensor's bytes exactly as stored in the GGUF file.
            Any shape and memory layout; it is flattened (copied only if it has to be).
        qtype: GGML type, as the enum or the raw integer id from the file.
        shape: logical PyTorch-order shape of the result (the reverse of GGUF's ``ne``).
        dtype: floating dtype of the result.  Decoding happens in float32, then one cast.
        name: tensor name, used only to make error messages actionable.

    Returns:
        A tensor of ``shape`` and ``dtype`` on ``data.device``.  For F32/F16/BF16 input
        whose dtype already equals ``dtype`` this is a zero-copy view of ``data`` (the
        bytes are only reinterpreted), so writes to one are visible in the other.

    Raises:
        UnsupportedQuantTypeError: ``qtype`` is not in :data:`SUPPORTED_TYPES`.
        TypeError: ``data`` is not uint8 or ``dtype`` is not a floating dtype.
        ValueError: ``shape`` does not fit the type's block size, or the byte count of
            ``data`` differs from what ``shape`` and ``qtype`` require.
    """
    qt = _as_qtype(qtype, name)
    if qt not in SUPPORTED_TYPES:
        raise UnsupportedQuantTypeError(qt, name)
    if data.dtype != torch.uint8:
        raise TypeError(
            f"Tensor {name!r}: expected the raw GGUF bytes as a torch.uint8 tensor, "
            f"got {data.dtype}"
        )
    if not dtype.is_floating_point:
        raise TypeError(f"Tensor {name!r}: output dtype must be floating point, got {dtype}")

    dims = _as_shape(shape)
    expected = quantized_nbytes(qt, dims, name=name)
    actual = data.numel()
    if actual != expected:
        raise ValueError(
            f"Tensor {name!r} of type {qt.name} and shape {dims} needs {expected} bytes, "
            f"but {actual} bytes were given"
        )
    if expected == 0:
        return torch.empty(dims, dtype=dtype, device=data.device)

    flat = data.reshape(-1).contiguous()
    # Reinterpreting bytes as a wider dtype needs an aligned start; slices of a larger
    # buffer (e.g. a whole mapped file) may not have one.
    if flat.storage_offset() % 4 != 0:
        flat = flat.clone()

    plain = _PLAIN_DTYPES.get(qt)
    if plain is not None:
        return flat.view(plain).view(dims).to(dtype)

    _, type_size = GGML_QUANT_SIZES[qt]
    blocks = flat.view(-1, type_size)
    return _DECODERS[qt](blocks).view(dims).to(dtype)
