"""Host-side storage of swapped weights: one exact-size, page-locked buffer per swap unit.

Why not ``Tensor.pin_memory()``: torch's caching host allocator rounds each request up to a
power of two (pinning one 702 MB block grew RSS by 1.10 GiB on an H100 machine). Plain memory
of the exact size, registered with ``cudaHostRegister``, costs its bytes and nothing more, and
DMA reads it at full pinned bandwidth.

Every tensor of a unit sits at an aligned offset inside the unit's one ``uint8`` buffer, so one
copy moves the whole unit, and the same :class:`PackedLayout` gives typed views into the host
buffer and into any GPU slot.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass
from typing import Iterable

import torch

from .errors import BlockSwapError

logger = logging.getLogger(__name__)

# 256 bytes keeps every view aligned for vectorised kernels and for every dtype's element size.
ALIGNMENT = 256
_CUDA_HOST_REGISTER_PORTABLE = 1

_registered_lock = threading.Lock()
_registered_bytes = 0


def registered_host_bytes() -> int:
    """Bytes of host memory this process has page-locked through :class:`HostBuffer`."""
    return _registered_bytes


def _align(value: int) -> int:
    return (value + ALIGNMENT - 1) // ALIGNMENT * ALIGNMENT


@dataclass(frozen=True)
class TensorSlot:
    """Where one tensor lives inside a packed buffer."""

    offset: int
    nbytes: int
    shape: torch.Size
    dtype: torch.dtype

    def view(self, buffer: torch.Tensor) -> torch.Tensor:
        """A typed view of this tensor inside ``buffer`` (a ``uint8`` tensor)."""
        raw = buffer[self.offset : self.offset + self.nbytes]
        return raw.view(self.dtype).view(self.shape)


@dataclass(frozen=True)
class PackedLayout:
    """Offsets of a unit's tensors inside one contiguous byte buffer."""

    slots: tuple[TensorSlot, ...]
    nbytes: int

    @classmethod
    def of(cls, specs: Iterable[tuple[torch.Size, torch.dtype]]) -> "PackedLayout":
        """Lay out tensors of the given shapes and dtypes back to back, each aligned."""
        slots = []
        offset = 0
        for shape, dtype in specs:
            shape = torch.Size(shape)
            nbytes = shape.numel() * _element_size(dtype)
            slots.append(TensorSlot(offset, nbytes, shape, dtype))
            offset = _align(offset + nbytes)
        return cls(tuple(slots), offset)

    def views(self, buffer: torch.Tensor) -> list[torch.Tensor]:
        """Typed views of every tensor inside ``buffer``, in layout order."""
        if buffer.dtype != torch.uint8 or buffer.numel() < self.nbytes:
            raise BlockSwapError(
                f"buffer of {buffer.numel()} {buffer.dtype} elements cannot hold a "
                f"{self.nbytes}-byte layout"
            )
        return [slot.view(buffer) for slot in self.slots]


def _element_size(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


class HostBuffer:
    """Exact-size host memory for one swap unit, page-locked when ``pin`` is true.

    ``free()`` unregisters before the memory is released; it is idempotent. The caller must
    make sure no copy still reads the buffer (the engine synchronises its copy stream first).
    """

    def __init__(self, nbytes: int, pin: bool) -> None:
        self.nbytes = nbytes
        # max(1, ...) because cudaHostRegister rejects a zero-length range.
        self.tensor: torch.Tensor | None = torch.empty(max(1, nbytes), dtype=torch.uint8)
        self.pinned = False
        if pin:
            self._register()

    def _register(self) -> None:
        global _registered_bytes
        assert self.tensor is not None
        code = int(
            torch.cuda.cudart().cudaHostRegister(
                self.tensor.data_ptr(), self.tensor.numel(), _CUDA_HOST_REGISTER_PORTABLE
            )
        )
        if code != 0:
            self.tensor = None
            raise BlockSwapError(
                f"cudaHostRegister of {self.nbytes / 2**20:.1f} MiB failed with CUDA error "
                f"{code}; the system may limit locked memory (ulimit -l) or be out of RAM"
            )
        self.pinned = True
        with _registered_lock:
            _registered_bytes += self.tensor.numel()

    def free(self) -> None:
        """Unregister (if pinned) and drop the memory."""
        global _registered_bytes
        if self.tensor is None:
            return
        if self.pinned:
            code = int(torch.cuda.cudart().cudaHostUnregister(self.tensor.data_ptr()))
            if code != 0:
                logger.warning("cudaHostUnregister failed with CUDA error %d", code)
            with _registered_lock:
                _registered_bytes -= self.tensor.numel()
            self.pinned = False
        self.tensor = None

    def __del__(self) -> None:  # last resort; the engine frees explicitly
        try:
            self.free()
        except Exception:  # interpreter shutdown: CUDA may already be gone
            pass
