"""Lossless 1.5-bytes-per-weight form of bf16 weights, for shorter host-to-device copies.

A bf16 weight is a low byte (7 mantissa bits and the exponent's last bit: incompressible)
and a high byte (sign and the exponent's top 7 bits). The weights of one layer span few
binades, so within a chunk the high byte is the sign plus one of 8 consecutive exponent
values almost always: a 4-bit code. Weights outside that window (zeros, outliers) are
exceptions, sent as (index, high byte). A chunk of ``n`` weights then travels as

    low bytes [n] | codes, two per byte [ceil(n / 2)] | pad to 8 | indices int64 [e] | highs [e]

and decodes on the GPU with a table lookup and two strided copies, bit for bit. Copies
dominate a forward when few tokens run (H100, Wan-14B shapes, 1,560 tokens), and there this
cuts the bytes over the link by a quarter (``benchmarks/transfer_compression_probe.py``).
"""

from __future__ import annotations

import threading
from dataclasses import dataclass

import torch

WINDOW = 8  # exponent values a 3-bit code covers
# A chunk with more exceptions than this travels raw: 9 bytes per exception would eat the
# gain, and the bound keeps the staging buffers small.
MAX_EXCEPTION_FRACTION = 1 / 64
# Indices are int64, what index_copy_ takes: decoding then launches no conversion kernel
# (per-chunk launches, not bytes, are what a decode costs the host).
INDEX_BYTES = 8


def _align8(value: int) -> int:
    return (value + 7) // 8 * 8


@dataclass(frozen=True)
class EncodedChunk:
    """One chunk's packed parts, on the CPU."""

    window: int  # the smallest exponent (top 7 bits) of the window
    low: torch.Tensor  # uint8 [n]
    codes: torch.Tensor  # uint8 [ceil(n / 2)]
    exception_index: torch.Tensor  # int64 [e]
    exception_high: torch.Tensor  # uint8 [e]

    @property
    def elements(self) -> int:
        return self.low.numel()

    @property
    def nbytes(self) -> int:
        return packed_nbytes(self.elements, self.exception_index.numel())

    def write(self, out: torch.Tensor) -> None:
        """Lay the parts out in ``out`` (uint8, at least :attr:`nbytes`)."""
        n, e = self.elements, self.exception_index.numel()
        codes_end = n + self.codes.numel()
        out[:n].copy_(self.low)
        out[n:codes_end].copy_(self.codes)
        start = _align8(codes_end)
        highs = start + INDEX_BYTES * e
        out[start:highs].copy_(self.exception_index.view(torch.uint8))
        out[highs : highs + e].copy_(self.exception_high)


def packed_nbytes(elements: int, exceptions: int) -> int:
    """Bytes of a packed chunk of ``elements`` weights with ``exceptions`` exceptions."""
    return _align8(elements + (elements + 1) // 2) + (INDEX_BYTES + 1) * exceptions


def max_packed_nbytes(elements: int) -> int:
    """The most bytes a chunk of ``elements`` weights can pack to (more travel raw)."""
    return packed_nbytes(elements, int(elements * MAX_EXCEPTION_FRACTION))


def encode_chunk(weights: torch.Tensor) -> EncodedChunk | None:
    """Pack a 1-D contiguous bf16 tensor (any device); None when too many weights fall outside
    every window (the chunk should travel raw)."""
    pairs = weights.view(torch.uint8).view(-1, 2)  # little-endian: (low, high)
    low, high = pairs[:, 0], pairs[:, 1]
    exponent = high & 127
    counts = torch.bincount(exponent, minlength=128)
    window = int(counts.unfold(0, WINDOW, 1).sum(1).argmax())  # the most weights covered
    offset = exponent - window  # uint8: below the window wraps to >= 136, above is > 7
    outside = offset > WINDOW - 1
    where = outside.nonzero().flatten()
    n = low.numel()
    if where.numel() > n * MAX_EXCEPTION_FRACTION:
        return None
    code = ((high >> 7) << 3) | (offset & (WINDOW - 1))
    if n % 2:
        code = torch.cat([code, code.new_zeros(1)])
    codes = code[0::2] | (code[1::2] << 4)
    return EncodedChunk(
        window=window,
        low=low.contiguous().cpu(),
        codes=codes.cpu(),
        exception_index=where.to(torch.int64).cpu(),
        exception_high=high[where].cpu(),
    )


_tables: dict[torch.device, torch.Tensor] = {}
_tables_lock = threading.Lock()


def _decode_tables(device: torch.device) -> torch.Tensor:
    """``[window, code byte]`` -> the two high bytes it stands for, as one int16 (even weight
    in the low byte). 128 x 256 entries, 64 KiB per device."""
    with _tables_lock:
        table = _tables.get(device)
        if table is None:
            window = torch.arange(128, dtype=torch.int32)[:, None]
            byte = torch.arange(256, dtype=torch.int32)[None, :]

            def high(code: torch.Tensor) -> torch.Tensor:
                return ((code & 8) << 4) | ((code & 7) + window)

            both = high(byte & 15) | (high(byte >> 4) << 8)
            # int16 holds the 16 bits; values >= 2**15 wrap, which is the bit pattern we want
            table = (both - ((both >> 15) << 16)).to(torch.int16).to(device)
            _tables[device] = table
        return table


def decode_chunk(
    packed: torch.Tensor, elements: int, window: int, exceptions: int, out: torch.Tensor
) -> None:
    """Unpack a chunk (uint8 ``packed``, as :meth:`EncodedChunk.write` laid it out) into
    ``out`` (uint8, ``2 * elements`` bytes), on ``out``'s device and the current stream."""
    n = elements
    codes_end = n + (n + 1) // 2
    table = _decode_tables(out.device)[window]
    highs = table.index_select(0, packed[n:codes_end].to(torch.int32)).view(torch.uint8)
    pairs = out.view(-1, 2)
    torch.stack((packed[:n], highs[:n]), dim=1, out=pairs)  # one interleaving kernel
    if exceptions:
        start = _align8(codes_end)
        highs_at = start + INDEX_BYTES * exceptions
        index = packed[start:highs_at].view(torch.int64)
        pairs[:, 1].index_copy_(0, index, packed[highs_at : highs_at + exceptions])
