"""Host-side storage of swapped weights: one exact-size, page-locked buffer per swap unit.

Why not ``Tensor.pin_memory()``: torch's caching host allocator rounds each request up to a
power of two (pinning one 702 MB block grew RSS by 1.10 GiB on an H100 machine). Plain memory
of the exact size, registered with ``cudaHostRegister``, costs its bytes and nothing more, and
DMA reads it at full pinned bandwidth.

Large buffers are anonymous mappings advised to use transparent huge pages: registering
faults every page in, and with 2 MiB pages that took 1.09 s instead of 2.30-2.45 s for 5.7 GB
on the H100 machine (``benchmarks/pinning_probe.py``), the largest part of a lazy load.

Every tensor of a unit sits at an aligned offset inside the unit's one ``uint8`` buffer, so one
copy moves the whole unit, and the same :class:`PackedLayout` gives typed views into the host
buffer and into any GPU slot.
"""

from __future__ import annotations

import ctypes
import gc
import logging
import mmap
import sys
import threading
from dataclasses import dataclass
from typing import Iterable

import torch

from .errors import BlockSwapError

logger = logging.getLogger(__name__)

# 256 bytes keeps every view aligned for vectorised kernels and for every dtype's element size.
ALIGNMENT = 256
_CUDA_HOST_REGISTER_PORTABLE = 1
# Below this a buffer comes from torch's CPU allocator; above, from its own huge-page mapping.
HUGE_PAGE_MIN_BYTES = 32 * 2**20
_MADV_HUGEPAGE = 14  # Linux; elsewhere madvise is skipped
_PAGE_BYTES = 4096  # one write per (small) page faults every page in

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


def _host_bytes(nbytes: int) -> torch.Tensor:
    """``nbytes`` of host memory; large ones on transparent huge pages where the OS has them.

    The tensor keeps its mapping alive (``torch.frombuffer`` holds a reference), so views
    outliving the :class:`HostBuffer` stay valid and the pages go back when the last one dies.
    """
    if nbytes < HUGE_PAGE_MIN_BYTES or not hasattr(mmap, "MAP_ANONYMOUS"):
        return torch.empty(nbytes, dtype=torch.uint8)
    region = mmap.mmap(-1, nbytes, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    tensor = torch.frombuffer(region, dtype=torch.uint8)
    _advise_huge_pages(tensor.data_ptr(), nbytes)
    return tensor


def _advise_huge_pages(address: int, nbytes: int) -> None:
    if not sys.platform.startswith("linux"):  # the advice number is Linux's
        return
    madvise = getattr(_libc(), "madvise", None)
    if madvise is None:
        return
    madvise.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)
    if madvise(address, nbytes, _MADV_HUGEPAGE) != 0:  # THP off: plain pages, still correct
        logger.debug("madvise(MADV_HUGEPAGE) failed; using normal pages")


def return_freed_host_memory() -> None:
    """Hand heap memory freed by a removed swap back to the OS (glibc only; else no-op).

    Restoring or dropping weights frees many tensors under 32 MiB, which glibc serves from
    its heap and keeps after they are freed: on the H100 machine a 20-cycle apply/remove soak
    left RSS 1.14 GiB above its baseline until ``malloc_trim`` returned all of it. Costs a few
    milliseconds, once per removal.
    """
    if not sys.platform.startswith("linux"):
        return
    trim = getattr(_libc(), "malloc_trim", None)
    if trim is not None:
        trim(0)


_libc_handle: ctypes.CDLL | None = None


def _libc() -> ctypes.CDLL:
    global _libc_handle
    if _libc_handle is None:
        _libc_handle = ctypes.CDLL(None, use_errno=True)
    return _libc_handle


def _element_size(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


class DeviceBuffer:
    """Exact-size memory on a donor device (another GPU) holding a swap unit's weights: the
    same face as :class:`HostBuffer`, never pinned. Copies from it into the compute GPU's
    slots go peer to peer; torch runs a cross-device copy on the source device's current
    stream, fenced both ways against the destination's (our copy stream), so the ready
    events recorded after it cover it."""

    pinned = False

    def __init__(self, nbytes: int, device: torch.device) -> None:
        self.nbytes = nbytes
        self.tensor: torch.Tensor | None = torch.empty(
            max(1, nbytes), dtype=torch.uint8, device=device
        )

    def free(self) -> None:
        """Drop the memory (idempotent); the caller makes sure no copy still reads it."""
        self.tensor = None


class HostBuffer:
    """Exact-size host memory (a swap unit's, or a loader's staging), page-locked when ``pin``
    is true.

    ``free()`` unregisters before the memory is released; it is idempotent. The caller must
    make sure no copy still reads the buffer (the engine synchronises its copy stream first).
    """

    def __init__(self, nbytes: int, pin: bool) -> None:
        self.nbytes = nbytes
        # max(1, ...) because cudaHostRegister rejects a zero-length range.
        self.tensor: torch.Tensor | None = _host_bytes(max(1, nbytes))
        self.pinned = False
        if pin:
            # Fault the pages in here, on the caller's thread: cudaHostRegister faults in
            # whatever is missing under a lock that serialises every thread (8 threads took
            # 1.11 s to register 5.7 GB, the same as one), while faulting scales with threads
            # and leaves registering only 0.21 s of pinning (benchmarks/pinning_probe.py).
            self.tensor[::_PAGE_BYTES].fill_(0)
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

    def __del__(self) -> None:
        # Last resort (the engine frees explicitly): the buffer of a model dropped without
        # remove(). A prefetch for its next forward may still be reading it; unregistering and
        # unmapping under a running copy would fault, so wait for the device first.
        try:
            if self.pinned:
                torch.cuda.synchronize()
        except Exception:  # interpreter shutdown, or a collection during graph capture
            pass
        try:
            if self.tensor is not None:
                self.free()
                _trim_after_collection()
        except Exception:  # interpreter shutdown: CUDA may already be gone
            pass


# A model dropped without remove() frees its buffers here, in __del__, and nothing of ours
# runs afterwards to hand the heap that its loading and packing left behind back to the OS
# (remove() does, see return_freed_host_memory): the RSS of a session that drops models
# creeps up although nothing is live. So a buffer freed that way asks for one trim at the
# end of the next garbage collection (a model drop usually is one, and collections are
# frequent), once however many buffers went.
_trim_pending = False


def _trim_after_collection() -> None:
    global _trim_pending
    _trim_pending = True


def _trim_if_pending(phase: str, info: dict) -> None:
    global _trim_pending
    if phase == "stop" and _trim_pending:
        _trim_pending = False
        return_freed_host_memory()


gc.callbacks.append(_trim_if_pending)
