"""Where lazy-load time goes: allocating host buffers, page-locking them and reading the file
into them, each timed alone, for several ways of getting the memory (plain ``torch.empty``,
anonymous ``mmap`` with transparent huge pages, ``MAP_POPULATE``) and 1 or 8 reader threads.

    python benchmarks/pinning_probe.py FILE [--units 8] [--output probe.json]
"""

from __future__ import annotations

import argparse
import ctypes
import json
import mmap
import os
import time
from concurrent.futures import ThreadPoolExecutor

import torch

MADV_HUGEPAGE = 14
_libc = ctypes.CDLL(None, use_errno=True)


def anonymous(nbytes: int, huge: bool, populate: bool) -> tuple[mmap.mmap, torch.Tensor]:
    flags = mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS
    if populate:
        flags |= getattr(mmap, "MAP_POPULATE", 0x8000)
    region = mmap.mmap(-1, nbytes, flags=flags)
    if huge:
        address = ctypes.addressof(ctypes.c_char.from_buffer(region))
        _libc.madvise(ctypes.c_void_p(address), ctypes.c_size_t(nbytes), MADV_HUGEPAGE)
    return region, torch.frombuffer(region, dtype=torch.uint8)


def register(tensor: torch.Tensor) -> None:
    code = int(torch.cuda.cudart().cudaHostRegister(tensor.data_ptr(), tensor.numel(), 1))
    assert code == 0, code


def unregister(tensor: torch.Tensor) -> None:
    torch.cuda.cudart().cudaHostUnregister(tensor.data_ptr())


def read(path: str, tensors: list[torch.Tensor], threads: int) -> None:
    def fill(index: int) -> None:
        tensor = tensors[index]
        view = memoryview((ctypes.c_ubyte * tensor.numel()).from_address(tensor.data_ptr()))
        with open(path, "rb", buffering=0) as handle:
            done = 0
            offset = index * tensor.numel()
            while done < tensor.numel():
                done += os.preadv(handle.fileno(), [view[done:]], offset + done)

    with ThreadPoolExecutor(threads) as pool:
        list(pool.map(fill, range(len(tensors))))


def trial(
    path: str,
    units: int,
    unit_bytes: int,
    kind: str,
    threads: int,
    register_threads: int = 1,
    touch_threads: int = 0,
) -> dict:
    timings = {}
    start = time.perf_counter()
    keep, tensors = [], []
    for _ in range(units):
        if kind == "torch_empty":
            tensors.append(torch.empty(unit_bytes, dtype=torch.uint8))
        else:
            region, tensor = anonymous(unit_bytes, kind == "mmap_huge", kind == "mmap_populate")
            keep.append(region)
            tensors.append(tensor)
    timings["allocate_s"] = time.perf_counter() - start
    start = time.perf_counter()
    if touch_threads:  # fault the pages in on several threads first (one write per 4 KiB)
        with ThreadPoolExecutor(touch_threads) as pool:
            list(pool.map(lambda t: t[::4096].fill_(0), tensors))
    timings["touch_s"] = time.perf_counter() - start
    start = time.perf_counter()
    with ThreadPoolExecutor(register_threads) as pool:
        list(pool.map(register, tensors))
    timings["register_s"] = time.perf_counter() - start
    start = time.perf_counter()
    read(path, tensors, threads)
    timings["read_s"] = time.perf_counter() - start
    for tensor in tensors:
        unregister(tensor)
    # A second read into the same, now faulted-in memory: the reading cost alone.
    start = time.perf_counter()
    read(path, tensors, threads)
    timings["reread_s"] = time.perf_counter() - start
    gpu = torch.empty(unit_bytes, dtype=torch.uint8, device="cuda")
    for tensor in tensors[:1]:
        register(tensor)
        torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(5):
            gpu.copy_(tensor, non_blocking=True)
        torch.cuda.synchronize()
        timings["h2d_gbps"] = 5 * unit_bytes / (time.perf_counter() - start) / 1e9
        unregister(tensor)
    timings["total_s"] = (
        timings["allocate_s"] + timings["touch_s"] + timings["register_s"] + timings["read_s"]
    )
    del tensors, keep
    return {
        "kind": kind,
        "threads": threads,
        "register_threads": register_threads,
        "touch_threads": touch_threads,
        **timings,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("file")
    parser.add_argument("--units", type=int, default=8)
    parser.add_argument("--output")
    args = parser.parse_args()
    size = os.path.getsize(args.file)
    unit_bytes = size // args.units // 4096 * 4096
    torch.cuda.init()
    with open("/sys/kernel/mm/transparent_hugepage/enabled") as handle:
        thp = handle.read().strip()
    rows = []
    trials = [
        ("torch_empty", 8, 1, 0),
        ("mmap_huge", 8, 1, 0),
        ("mmap_huge", 8, 8, 0),
        ("mmap_huge", 8, 1, 8),
        ("mmap_huge", 8, 8, 8),
        ("torch_empty", 8, 8, 0),
    ]
    for kind, threads, register_threads, touch_threads in trials:
        row = trial(
            args.file, args.units, unit_bytes, kind, threads, register_threads, touch_threads
        )
        rows.append(row)
        print(json.dumps(row), flush=True)
    result = {
        "device": torch.cuda.get_device_name(0),
        "file_gib": size / 2**30,
        "units": args.units,
        "unit_mib": unit_bytes / 2**20,
        "transparent_hugepage": thp,
        "rows": rows,
    }
    if args.output:
        with open(args.output, "w") as handle:
            json.dump(result, handle, indent=2)


if __name__ == "__main__":
    main()
