"""Streams and events behind one small interface, so the scheduler's code is the same on
CUDA and CPU.

On CUDA there is one copy stream per device, shared by every swapped model on it, so copies
of two models (Wan 2.2 high/low noise) queue instead of competing. On CPU every operation is
synchronous and the stream calls are no-ops: the engine still runs, which lets the test suite
exercise the full mechanism without a GPU.
"""

from __future__ import annotations

import contextlib
import threading
from typing import Any, ContextManager

import torch

# Decode kernels are short, but the copy engine waits for them to free a staging buffer: ahead
# of queued compute blocks they keep it busy (lower numbers are higher priorities in CUDA).
DECODE_STREAM_PRIORITY = -1
_copy_streams: dict[int, "torch.cuda.Stream"] = {}
_decode_streams: dict[int, "torch.cuda.Stream"] = {}
_copy_streams_lock = threading.Lock()


class DeviceStreams:
    """Copy stream, decode stream (compressed transfers), compute stream and events for one
    device."""

    def __init__(self, device: torch.device, timing: bool = False) -> None:
        self.device = device
        self.is_cuda = device.type == "cuda"
        self.timing = timing
        self.copy_stream = self._shared_stream(_copy_streams) if self.is_cuda else None
        # A third stream, so the copy engine never waits for a decode kernel, nor compute for
        # a copy queued behind one.
        self.decode_stream = (
            self._shared_stream(_decode_streams, DECODE_STREAM_PRIORITY) if self.is_cuda else None
        )

    def _shared_stream(
        self, streams: dict[int, "torch.cuda.Stream"], priority: int = 0
    ) -> "torch.cuda.Stream":
        index = self.device.index if self.device.index is not None else torch.cuda.current_device()
        with _copy_streams_lock:
            if index not in streams:
                # 0 is CUDA's lowest priority: copies must never delay the compute kernels
                # they feed. The decode stream asks for more (DECODE_STREAM_PRIORITY).
                streams[index] = torch.cuda.Stream(device=index, priority=priority)
            return streams[index]

    def compute_stream(self) -> Any:
        return torch.cuda.current_stream(self.device) if self.is_cuda else None

    def new_event(self, timing: bool | None = None) -> Any:
        if not self.is_cuda:
            return None
        return torch.cuda.Event(enable_timing=self.timing if timing is None else timing)

    def on_copy_stream(self) -> ContextManager[Any]:
        return self.on(self.copy_stream)

    def on(self, stream: Any) -> ContextManager[Any]:
        """Queue work on ``stream`` (no-op on CPU)."""
        if stream is None:
            return contextlib.nullcontext()
        return torch.cuda.stream(stream)

    @staticmethod
    def record(event: Any, stream: Any) -> None:
        if event is not None:
            event.record(stream)

    @staticmethod
    def wait(stream: Any, event: Any) -> None:
        """``stream`` waits for ``event`` on the GPU; the host does not block."""
        if stream is not None and event is not None:
            stream.wait_event(event)

    def synchronize(self) -> None:
        if self.is_cuda:
            self.copy_stream.synchronize()
            self.decode_stream.synchronize()
            torch.cuda.current_stream(self.device).synchronize()
