"""A swap unit's weights in the form they travel in when transfer compression is on.

The unit's slot layout (:class:`~wan_blockswap.storage.PackedLayout`) does not change: the
GPU still gets the real weights. Only the host-side copy source does. Each large bf16 tensor
is cut into chunks of :data:`CHUNK_ELEMENTS` weights packed by :mod:`bf16_codec`; everything
else (other dtypes, small tensors, chunks that do not pack) travels raw, adjacent raw tensors
as one copy. The pieces sit back to back in one pinned host buffer.

Chunks keep the GPU staging small: a packed chunk lands in one of a few staging buffers of
:func:`staging_buffer_bytes` and is decoded from there into the slot, so staging costs a few
MiB of VRAM instead of a second slot (see [Note: compressed copies] in ``scheduler.py``).
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass, replace
from typing import Sequence

import torch

from . import bf16_codec
from .storage import ALIGNMENT, HostBuffer, PackedLayout, _align

# 16 Mi weights, 24 MiB packed. Each chunk costs the host ~0.2 ms of launches and events
# (H100 machine): 4 Mi-weight chunks made a Wan-14B forward at 1,560 tokens host-bound
# (159 ms of host time for a 99 ms raw forward); 16 Mi cuts that fourfold for 33 MiB more
# staging VRAM.
CHUNK_ELEMENTS = 1 << 24
# Below this a bf16 tensor travels raw: its decode launch would cost more than it saves.
MIN_PACKED_ELEMENTS = 1 << 16
# Pinned host bytes of a packed copy per raw bf16 byte: 1.5 bytes per weight plus exceptions
# came to ~0.77x on Wan 14B's weights. The RAM check bounds it generously (PACKED_SHARE in
# memory.py); docs and tooltips quote this figure.
TYPICAL_PACKED_SHARE = 0.77
# One chunk being copied while the previous one is decoded: a decode takes a fraction of a
# copy, so the copy engine never waits for a staging buffer.
STAGING_BUFFERS = 2

logger = logging.getLogger("wan_blockswap")
# One GPU encode at a time: a chunk's temporaries take ~150 MiB of VRAM, and the lazy loader
# encodes from up to 8 threads at once, beside the model it is loading.
_gpu_encode_lock = threading.Lock()


def is_packable(tensor: torch.Tensor) -> bool:
    """Whether ``tensor`` travels packed (bf16 and large enough)."""
    return tensor.dtype == torch.bfloat16 and tensor.numel() >= MIN_PACKED_ELEMENTS


def staging_buffer_bytes() -> int:
    """VRAM of one staging buffer: the largest packed chunk."""
    return _align(bf16_codec.max_packed_nbytes(CHUNK_ELEMENTS))


def staging_bytes() -> int:
    """VRAM of all staging buffers of one set of fixed slots."""
    return STAGING_BUFFERS * staging_buffer_bytes()


@dataclass(frozen=True)
class Piece:
    """One copy: ``host_nbytes`` at ``host_offset`` become ``slot_nbytes`` at ``slot_offset``.

    ``window`` is None for raw pieces (copied straight into the slot)."""

    host_offset: int
    host_nbytes: int
    slot_offset: int
    slot_nbytes: int
    window: int | None = None
    exceptions: int = 0

    @property
    def packed(self) -> bool:
        return self.window is not None


class CompressedTransfer:
    """The pinned host bytes one unit sends, and how they map onto its slot."""

    def __init__(self, pieces: Sequence[Piece], host: HostBuffer) -> None:
        self.pieces = tuple(pieces)
        self.host = host
        assert host.tensor is not None
        # Sliced once: slicing per copy is host time on the hot path.
        self.sources = [
            host.tensor[p.host_offset : p.host_offset + p.host_nbytes] for p in self.pieces
        ]

    def targets(self, slot: torch.Tensor) -> list[torch.Tensor]:
        """Each piece's destination inside ``slot`` (a uint8 device buffer)."""
        return [slot[p.slot_offset : p.slot_offset + p.slot_nbytes] for p in self.pieces]

    @property
    def nbytes(self) -> int:
        """Bytes that cross the link per copy of the unit."""
        return sum(p.host_nbytes for p in self.pieces)

    @property
    def staging_nbytes(self) -> int:
        """GPU bytes that hold every packed chunk of one copy at once (a streamed plan)."""
        return sum(_align(p.host_nbytes) for p in self.pieces if p.packed)

    @property
    def packed_pieces(self) -> int:
        return sum(p.packed for p in self.pieces)

    def free(self) -> None:
        self.sources = []
        self.host.free()

    @classmethod
    def encode(
        cls,
        layout: PackedLayout,
        weights: Sequence[torch.Tensor],
        pin: bool,
        work_device: torch.device,
    ) -> "CompressedTransfer":
        """Pack ``weights`` (the unit's tensors in ``layout`` order, on the CPU) into pinned
        host memory. Chunks are encoded on ``work_device`` (the GPU encodes in milliseconds
        what takes the CPU seconds) and brought back one at a time."""
        planned: list[tuple[Piece, object]] = []  # (piece with host_offset unset, its source)
        raw_run: list[int] = []  # indices of adjacent tensors travelling raw together

        def flush_raw() -> None:
            if raw_run:
                first, last = layout.slots[raw_run[0]], layout.slots[raw_run[-1]]
                span = last.offset + last.nbytes - first.offset
                planned.append((Piece(0, span, first.offset, span), list(raw_run)))
                raw_run.clear()

        for index, (slot, weight) in enumerate(zip(layout.slots, weights)):
            if not is_packable(weight):
                raw_run.append(index)
                continue
            flat = weight.reshape(-1)
            for start in range(0, flat.numel(), CHUNK_ELEMENTS):
                chunk = flat[start : start + CHUNK_ELEMENTS]
                encoded = _encode(chunk, work_device)
                offset = slot.offset + 2 * start
                if encoded is None:  # packs badly: one raw copy of this chunk
                    flush_raw()
                    planned.append((Piece(0, 2 * chunk.numel(), offset, 2 * chunk.numel()), chunk))
                    continue
                flush_raw()
                piece = Piece(
                    0,
                    encoded.nbytes,
                    offset,
                    2 * chunk.numel(),
                    encoded.window,
                    encoded.exception_index.numel(),
                )
                planned.append((piece, encoded))
            flush_raw()
        flush_raw()

        pieces, cursor = [], 0
        for piece, _ in planned:
            pieces.append(replace(piece, host_offset=cursor))
            cursor = _align(cursor + piece.host_nbytes)
        host = HostBuffer(max(cursor, ALIGNMENT), pin)
        for piece, source in zip(pieces, (s for _, s in planned)):
            target = host.tensor[piece.host_offset : piece.host_offset + piece.host_nbytes]
            if isinstance(source, bf16_codec.EncodedChunk):
                source.write(target)
            elif isinstance(source, list):  # a raw run: each tensor at its place in the span
                for index in source:
                    slot = layout.slots[index]
                    begin = slot.offset - piece.slot_offset
                    target[begin : begin + slot.nbytes].copy_(
                        weights[index].reshape(-1).view(torch.uint8)
                    )
            else:  # a raw chunk
                target.copy_(source.view(torch.uint8))
        return cls(pieces, host)


def _encode(chunk: torch.Tensor, work_device: torch.device) -> bf16_codec.EncodedChunk | None:
    """Encode on ``work_device``; on the CPU (slowly) if the GPU has no room for it."""
    if work_device.type != "cuda":
        return bf16_codec.encode_chunk(chunk.contiguous())
    try:
        with _gpu_encode_lock:
            return bf16_codec.encode_chunk(chunk.to(work_device).contiguous())
    except torch.cuda.OutOfMemoryError:
        logger.warning(
            "transfer_compression: no VRAM to encode on %s; encoding on the CPU", work_device
        )
        return bf16_codec.encode_chunk(chunk.cpu().contiguous())
