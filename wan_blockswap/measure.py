"""Measuring tools shared by the performance script and the benchmarks: host-to-device
bandwidth, forward timing with CUDA events, and peak memory."""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass
from typing import Callable

import torch

from .storage import HostBuffer


@dataclass(frozen=True)
class Timing:
    """Per-forward milliseconds of a timed run."""

    samples_ms: tuple[float, ...]

    @property
    def median_ms(self) -> float:
        return statistics.median(self.samples_ms)

    @property
    def mean_ms(self) -> float:
        """Total time over count: the steady-state cost per forward of a sampling loop."""
        return statistics.fmean(self.samples_ms)

    @property
    def min_ms(self) -> float:
        return min(self.samples_ms)


def h2d_bandwidth_gbps(
    nbytes: int, device: torch.device, pinned: bool = True, repeats: int = 5
) -> float:
    """Host-to-device copy rate in GB/s (1e9 bytes) for one buffer of ``nbytes``.

    ``pinned`` uses exact-size registered memory, as the engine does; otherwise plain
    pageable memory. Returns the median of ``repeats`` copies.
    """
    if device.type != "cuda":
        raise ValueError("bandwidth is measured on a CUDA device")
    host = HostBuffer(nbytes, pin=pinned)
    try:
        host.tensor.fill_(1)
        target = torch.empty(nbytes, dtype=torch.uint8, device=device)
        rates = []
        for _ in range(repeats + 1):
            start = torch.cuda.Event(enable_timing=True)
            end = torch.cuda.Event(enable_timing=True)
            start.record()
            target.copy_(host.tensor[:nbytes], non_blocking=pinned)
            end.record()
            end.synchronize()
            rates.append(nbytes / (start.elapsed_time(end) / 1e3) / 1e9)
        del target
        return statistics.median(rates[1:])
    finally:
        host.free()


def time_forwards(
    forward: Callable[[], object], device: torch.device, warmup: int = 2, iters: int = 10
) -> Timing:
    """Time ``forward`` ``iters`` times back to back, after ``warmup`` untimed calls.

    On CUDA each forward is bracketed by events on the current stream and no host
    synchronisation happens between forwards, as in a sampling loop; a copy the engine
    prefetches for the next forward overlaps as it would there.
    """
    for _ in range(warmup):
        forward()
    if device.type != "cuda":
        samples = []
        for _ in range(iters):
            start = time.perf_counter()
            forward()
            samples.append((time.perf_counter() - start) * 1e3)
        return Timing(tuple(samples))
    torch.cuda.synchronize(device)
    events = [torch.cuda.Event(enable_timing=True) for _ in range(iters + 1)]
    events[0].record()
    for i in range(iters):
        forward()
        events[i + 1].record()
    torch.cuda.synchronize(device)
    return Timing(tuple(events[i].elapsed_time(events[i + 1]) for i in range(iters)))


def rss_bytes(field: str = "VmRSS") -> int:
    """This process's resident memory from /proc/self/status (0 where that does not exist);
    ``field="VmHWM"`` gives its peak. (``ru_maxrss`` would not do for a child process: Linux
    carries the parent's peak across fork and exec.)"""
    try:
        with open("/proc/self/status") as handle:
            for line in handle:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)


def peak_gib(device: torch.device) -> float:
    """Peak bytes allocated by torch on ``device`` since :func:`reset_peak`, in GiB."""
    if device.type != "cuda":
        return 0.0
    torch.cuda.synchronize(device)
    return torch.cuda.max_memory_allocated(device) / 2**30


def allocated_gib(device: torch.device) -> float:
    if device.type != "cuda":
        return 0.0
    return torch.cuda.memory_allocated(device) / 2**30
